"""Modem health (`device_health`): one row per (meter, time), written idempotently.

`write_health(conn, rows)` appends `HealthRow`s with binary COPY through a stage
(`storage.staged`), normally on the connection and inside the transaction of the uplinks
they came from. A (meter, time) already recorded (a replayed uplink) is skipped: the
second write of a batch inserts nothing. A row the table refuses (ecl outside 0..2, a
figure beyond a 32-bit integer) raises RowRefusedError and writes nothing of the call;
other errors are `storage.errors` too (see `storage.pool.translated`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from operator import attrgetter

import asyncpg

from storage.rows import HealthRow
from storage.staged import merge_records

_COLUMNS = tuple(f.name for f in fields(HealthRow))
_RECORD = attrgetter(*_COLUMNS)  # a row as a tuple (dataclasses.astuple deep-copies)


async def write_health(conn: asyncpg.Connection, rows: Sequence[HealthRow]) -> int:
    """Record the figures not yet recorded; return how many rows were new. Raises storage errors."""
    return await merge_records(
        conn,
        "device_health",
        _COLUMNS,
        [_RECORD(row) for row in rows],
        ("meter_id", "measured_at"),
        "recording device health",
    )
