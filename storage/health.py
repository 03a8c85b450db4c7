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
from dataclasses import dataclass, fields
from datetime import datetime
from operator import attrgetter

import asyncpg

from storage.staged import merge_records


@dataclass(frozen=True)
class HealthRow:
    """What a modem reported about itself; None is a figure it did not report.

    Units are in the names: millivolts, centi-dBm (-10550 = -105.5 dBm), centi-dB, percent;
    `ecl` is the NB-IoT coverage enhancement level 0..2 (3GPP TS 36.331). Times are aware UTC.
    """

    meter_id: int
    measured_at: datetime
    battery_mv: int | None
    rsrp_cdbm: int | None
    sinr_cdb: int | None
    ecl: int | None
    received_at: datetime
    battery_pct: int | None = None
    battery_low: bool | None = None  # the meter's own low-battery status bit
    meter_error: bool | None = None
    cell_id: int | None = None  # E-UTRAN cell identity


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
