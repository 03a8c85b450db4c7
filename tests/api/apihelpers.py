"""Helpers shared by the API tests: local-time instants and daily reading series."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo


def utc(*args: int) -> datetime:
    """A UTC datetime."""
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def local(tz: str, *args: int) -> datetime:
    """The UTC instant of a wall-clock time in `tz`."""
    return datetime(*args, tzinfo=ZoneInfo(tz)).astimezone(UTC)  # type: ignore[misc]


def daily(start: datetime, days: int, first_ml: int, per_day_ml: int) -> list[tuple[datetime, int]]:
    """`days` readings one day apart from `start`, growing `per_day_ml` a day."""
    return [(start + timedelta(days=d), first_ml + d * per_day_ml) for d in range(days)]
