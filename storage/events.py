"""Meter alarms (`meter_events`): one row per (meter, kind, time), written idempotently.

`write_events(conn, rows)` appends `EventRow`s with binary COPY through a stage
(`storage.staged`), normally on the connection and inside the transaction that stores
the readings the alarms came from. An alarm already recorded (a replayed uplink) is
skipped: the second write of a batch inserts nothing. A row the table refuses (a kind
outside its list) raises RowRefusedError and writes nothing of the call; other errors are
`storage.errors` too (see `storage.pool.translated`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from operator import attrgetter

import asyncpg

from storage.rows import EventRow
from storage.staged import merge_records

_COLUMNS = tuple(f.name for f in fields(EventRow))
_RECORD = attrgetter(*_COLUMNS)  # a row as a tuple (dataclasses.astuple deep-copies)


async def write_events(conn: asyncpg.Connection, rows: Sequence[EventRow]) -> int:
    """Record the alarms not yet recorded; return how many were new. Raises storage errors."""
    return await merge_records(
        conn,
        "meter_events",
        _COLUMNS,
        [_RECORD(row) for row in rows],
        ("meter_id", "kind", "occurred_at"),
        "recording meter events",
    )
