"""The collector's retention job: every `every_s`, drop the expired raw-archive and
quarantine chunks (storage.retention; one collector at a time does it)."""

from __future__ import annotations

import asyncio

import structlog

from collector.settings import RetentionSettings
from storage import retention
from storage.errors import StorageError
from storage.pool import Pool, connection

log = structlog.get_logger("collector.retention")


async def run(pool: Pool, settings: RetentionSettings) -> None:
    """Drop expired chunks now and every `settings.every_s` until cancelled."""
    if not settings.enabled:
        return
    policy = retention.Retention(settings.raw_uplinks_days, settings.quarantine_days)
    while True:
        try:
            async with connection(pool, "dropping expired chunks", timeout_s=10.0) as conn:
                dropped = await retention.drop_expired(conn, policy)
            if dropped is not None and any(dropped.values()):
                log.info("retention.dropped", **{t: len(c) for t, c in dropped.items()})
        except (StorageError, TimeoutError) as exc:  # the next round tries again
            log.warning("retention.failed", error=str(exc))
        await asyncio.sleep(settings.every_s)
