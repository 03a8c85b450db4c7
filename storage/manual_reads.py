"""Readings entered by people: manual reads (a visit, a customer's photo) and imports.

An entered reading is a row of `readings` with its own ESPI quality in `readings.quality`
(a device reading has NULL there), so boundary reads, exports and VEE use it as any
reading; `manual_reads` (a row at the same key) keeps who entered it, when, from what
source, with which note, and from which import (migration 0033). An entered reading
never replaces a stored one: `store` inserts with ON CONFLICT DO NOTHING, and a row
already there is either the same reading again (a retry: nothing is stored twice) or a
conflict. A whole import is checked first
and stored in one transaction, or refused with every bad row and nothing stored.
Readings are kept to the second (migration 0054): an entered time's fraction of a
second is dropped before anything else, and a time outside 1931-12-13 .. 2068-01-19
(what int4 seconds since 2000 hold) is refused.

StorageError
└── EnteredReadError        the reads cannot be stored as given; `problems` says which
    ├── UnknownMeterError   no such meter for this tenant (another tenant's included)
    └── ReadConflictError   a different reading is stored at that instant
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Literal

import asyncpg

from billing import quality, units
from storage.errors import StorageError
from storage.pool import translated
from storage.rows import READ_S_MAX_EPOCH, READ_S_MIN_EPOCH

# the ESPI codes an entered register reading may carry (billing.quality: 13 mixed and 15
# normalized describe derived quantities, not a register)
QUALITIES = quality.OF_READING
MANUAL_QUALITY = quality.MANUALLY_EDITED  # a reading a person entered: every manual read
Source = Literal["visit", "customer_photo", "other", "import"]
_MAX_INT64 = 2**63 - 1
_FIRST_READ_AT = datetime.fromtimestamp(READ_S_MIN_EPOCH, UTC)
_LAST_READ_AT = datetime.fromtimestamp(READ_S_MAX_EPOCH, UTC)


class EnteredReadError(StorageError):
    """Entered reads refused; `problems` lists (line, reason) of each bad one."""

    def __init__(self, problems: Sequence[tuple[int, str]]) -> None:
        self.problems = sorted(problems)
        first = self.problems[0][1] if self.problems else "refused"
        more = f" (and {len(self.problems) - 1} more rows)" if len(self.problems) > 1 else ""
        super().__init__(first + more)


class UnknownMeterError(EnteredReadError):
    """The meter does not exist for this tenant."""


class ReadConflictError(EnteredReadError):
    """A different reading is stored at the instant of an entered one."""


@dataclass(frozen=True)
class EnteredRead:
    """One reading to enter. `line` numbers it in its file (1 for a single read).

    The meter is named by `meter_id`, or by `address` (the tenant's meter with that
    address in service at `read_at`, so an address reused after an exchange resolves).
    """

    line: int
    meter_id: int | None
    address: str | None
    read_at: datetime
    register_ml: int
    quality: int
    note: str | None = None


@dataclass(frozen=True)
class Stored:
    """An entered reading as stored, with its bookkeeping."""

    meter_id: int
    read_at: datetime
    register_ml: int
    register_scale: int
    quality: int
    source: str
    note: str | None
    entered_by: str
    entered_at: datetime
    import_id: int | None


@dataclass(frozen=True)
class ImportResult:
    """An accepted import: rows in the file, newly stored, already stored (same value)."""

    import_id: int
    rows: int
    stored: int
    duplicates: int
    replayed: bool  # the same file was imported before: nothing was done this time


_METERS_SQL = """
SELECT meter_id, address, installed_at, removed_at, register_scale, register_digits
FROM meters WHERE tenant_id = $1 AND (meter_id = ANY($2::bigint[]) OR address = ANY($3::text[]))
ORDER BY installed_at DESC, meter_id DESC"""
_INSERT_READINGS_SQL = """
INSERT INTO readings (meter_id, read_s, register_ml, flags, quality)
SELECT m, nbm_floor_s(t), r, 0, q FROM unnest($1::bigint[], $2::timestamptz[], $3::bigint[],
    $4::smallint[]) AS u(m, t, r, q)
ORDER BY m, t
ON CONFLICT DO NOTHING RETURNING meter_id, nbm_at(read_s) AS read_at"""
_INSERT_MANUAL_SQL = """
INSERT INTO manual_reads (meter_id, read_at, source, quality, note, entered_by, entered_at,
    import_id)
SELECT m, t, $3, q, n, $4, $5, $6 FROM unnest($1::bigint[], $2::timestamptz[],
    $7::smallint[], $8::text[]) AS u(m, t, q, n)"""
# the stored reading at each (meter, instant), and its bookkeeping if it was entered
_EXISTING_SQL = """
SELECT u.m AS meter_id, u.t AS read_at, r.register_ml, mr.source
FROM unnest($1::bigint[], $2::timestamptz[]) AS u(m, t)
JOIN readings r ON r.meter_id = u.m AND r.read_s = nbm_floor_s(u.t)
LEFT JOIN manual_reads mr ON mr.meter_id = u.m AND mr.read_at = u.t"""
_LIST_SQL = """
SELECT mr.meter_id, mr.read_at, r.register_ml, m.register_scale, mr.quality, mr.source, mr.note,
       mr.entered_by, mr.entered_at, mr.import_id
FROM manual_reads mr
JOIN meters m ON m.meter_id = mr.meter_id AND m.tenant_id = $1
JOIN readings r ON r.meter_id = mr.meter_id AND r.read_s = nbm_floor_s(mr.read_at)
WHERE mr.meter_id = $2 AND ($3::timestamptz IS NULL OR mr.read_at = $3)
ORDER BY mr.read_at DESC LIMIT $4"""


def _m3(ml: int) -> str:
    """`ml` as m3 for a message (exact: mL are 10^-6 m3)."""
    whole, frac = divmod(ml, 1_000_000)
    return f"{whole}.{frac:06d}".rstrip("0").rstrip(".")


def _check(
    read: EnteredRead, meter: asyncpg.Record, now: datetime, tolerance: timedelta
) -> str | None:
    """Why `read` cannot be a reading of `meter`, or None."""
    unit = units.unit_ml(meter["register_scale"])
    modulus = units.modulus_ml(meter["register_digits"], meter["register_scale"])
    at = read.read_at.isoformat()
    if not _FIRST_READ_AT <= read.read_at <= _LAST_READ_AT:
        return (
            f"read_at {at} is outside the times a reading can have"
            f" ({_FIRST_READ_AT.isoformat()} .. {_LAST_READ_AT.isoformat()})"
        )
    if read.read_at > now + tolerance:
        return f"read_at {at} is in the future (now {now.isoformat()}): give the time it was read"
    if read.read_at < meter["installed_at"]:
        return (
            f"read_at {at} is before meter {meter['meter_id']} was installed"
            f" ({meter['installed_at'].isoformat()})"
        )
    if meter["removed_at"] is not None and read.read_at > meter["removed_at"]:
        return (
            f"read_at {at} is after meter {meter['meter_id']} was removed"
            f" ({meter['removed_at'].isoformat()})"
        )
    if read.register_ml % unit:
        return (
            f"register {_m3(read.register_ml)} m3 is finer than the register's resolution"
            f" (10^{meter['register_scale']} m3)"
        )
    if read.register_ml >= modulus:
        return (
            f"register {_m3(read.register_ml)} m3 exceeds the register's range"
            f" ({meter['register_digits']} digits: below {_m3(modulus)} m3)"
        )
    if read.quality not in QUALITIES:
        codes = ", ".join(f"{k} {v}" for k, v in QUALITIES.items())
        return f"quality {read.quality} is not an ESPI code of a register reading ({codes})"
    return None


def _whole(at: datetime) -> datetime:
    """`at` to the second, as readings keep it (down: the reading was taken by then)."""
    return at.replace(microsecond=0)


def _resolve(
    read: EnteredRead, by_id: dict[int, asyncpg.Record], by_address: dict[str, list[asyncpg.Record]]
) -> asyncpg.Record | str:
    """The meter `read` names, or why there is none."""
    if read.meter_id is not None:
        meter = by_id.get(read.meter_id)
        if meter is None:
            return f"no meter {read.meter_id}"
        if read.address is not None and meter["address"] != read.address:
            return f"meter {read.meter_id} has address {meter['address']!r}, not {read.address!r}"
        return meter
    candidates = by_address.get(read.address or "", [])
    if not candidates:
        return f"no meter with address {read.address!r}"
    for meter in candidates:  # newest installation first
        removed = meter["removed_at"]
        if meter["installed_at"] <= read.read_at and (removed is None or read.read_at <= removed):
            return meter
    return candidates[0]  # not in service then: _check says why


async def _meters(
    conn: asyncpg.Connection, tenant_id: int, reads: Sequence[EnteredRead]
) -> tuple[dict[int, asyncpg.Record], dict[str, list[asyncpg.Record]]]:
    ids = sorted({r.meter_id for r in reads if r.meter_id is not None and r.meter_id <= _MAX_INT64})
    addresses = sorted({r.address for r in reads if r.meter_id is None and r.address})
    rows = await conn.fetch(_METERS_SQL, tenant_id, ids, addresses)
    by_id = {r["meter_id"]: r for r in rows}
    by_address: dict[str, list[asyncpg.Record]] = {}
    for r in rows:
        by_address.setdefault(r["address"], []).append(r)
    return by_id, by_address


async def store(
    conn: asyncpg.Connection,
    tenant_id: int,
    reads: Sequence[EnteredRead],
    *,
    source: Source,
    entered_by: str,
    now: datetime,
    tolerance: timedelta,
    problems: Sequence[tuple[int, str]] = (),
    body_sha256: bytes | None = None,
) -> ImportResult:
    """Check every read and store them all in one transaction, or none.

    `problems` are rows the caller found bad already (they are reported with the rest).
    With `body_sha256` (an import), a body imported before is not imported again: its
    earlier result comes back with `replayed`. A read equal to the one stored at its
    instant is a duplicate (not stored again, not an error); a different one is a
    conflict. Raises UnknownMeterError when the only problem is a single read's unknown
    meter, ReadConflictError when all problems are conflicts, else EnteredReadError.
    """
    with translated("storing entered reads"):
        async with conn.transaction():
            import_id = None
            if body_sha256 is not None:
                # first, so that a concurrent post of the same body waits for this one's
                # outcome on the unique key: imported (a replay), or refused (ours goes on)
                import_id = await conn.fetchval(
                    "INSERT INTO read_imports (tenant_id, body_sha256, entered_by, n_rows,"
                    " n_stored) VALUES ($1, $2, $3, $4, 0) ON CONFLICT DO NOTHING"
                    " RETURNING import_id",
                    tenant_id,
                    body_sha256,
                    entered_by,
                    len(reads),
                )
                if import_id is None:
                    return await _imported(conn, tenant_id, body_sha256)
            return await _store(
                conn, tenant_id, reads, source, entered_by, now, tolerance, problems, import_id
            )


async def _imported(conn: asyncpg.Connection, tenant_id: int, sha: bytes) -> ImportResult:
    row = await conn.fetchrow(
        "SELECT import_id, n_rows FROM read_imports WHERE tenant_id = $1 AND body_sha256 = $2",
        tenant_id,
        sha,
    )
    assert row is not None  # called only after the import's unique key was found taken
    return ImportResult(row["import_id"], row["n_rows"], 0, row["n_rows"], replayed=True)


async def _store(
    conn: asyncpg.Connection,
    tenant_id: int,
    reads: Sequence[EnteredRead],
    source: Source,
    entered_by: str,
    now: datetime,
    tolerance: timedelta,
    problems: Sequence[tuple[int, str]],
    import_id: int | None,
) -> ImportResult:
    bad = list(problems)
    reads = [
        r if not r.read_at.microsecond else replace(r, read_at=_whole(r.read_at)) for r in reads
    ]
    by_id, by_address = await _meters(conn, tenant_id, reads)
    good: list[tuple[EnteredRead, int]] = []
    first_line: dict[tuple[int, datetime], int] = {}
    unknown = 0
    for read in reads:
        meter = _resolve(read, by_id, by_address)
        if isinstance(meter, str):
            bad.append((read.line, meter))
            unknown += 1
            continue
        why = _check(read, meter, now, tolerance)
        key = (meter["meter_id"], read.read_at)
        if why is None and key in first_line:
            why = f"meter {key[0]} at {read.read_at.isoformat()} is on line {first_line[key]} too"
        if why is not None:
            bad.append((read.line, why))
            continue
        first_line[key] = read.line
        good.append((read, meter["meter_id"]))
    if bad:
        # refused anyway: list the rows that conflict with stored readings too
        bad += await _conflicts(conn, good, source) if good else []
        kind = UnknownMeterError if unknown == len(bad) == len(reads) == 1 else EnteredReadError
        raise kind(bad)
    ids = [m for _, m in good]
    times = [r.read_at for r, _ in good]
    inserted = await conn.fetch(
        _INSERT_READINGS_SQL,
        ids,
        times,
        [r.register_ml for r, _ in good],
        [r.quality for r, _ in good],
    )
    new = {(r["meter_id"], r["read_at"]) for r in inserted}
    if len(new) < len(good):
        taken = [(r, m) for r, m in good if (m, r.read_at) not in new]
        conflicts = await _conflicts(conn, taken, source)
        if conflicts:
            raise ReadConflictError(conflicts)
    if import_id is not None:
        await conn.execute(
            "UPDATE read_imports SET n_stored = $2 WHERE import_id = $1", import_id, len(new)
        )
    fresh = [(r, m) for r, m in good if (m, r.read_at) in new]
    await conn.execute(
        _INSERT_MANUAL_SQL,
        [m for _, m in fresh],
        [r.read_at for r, _ in fresh],
        source,
        entered_by,
        now,
        import_id,
        [r.quality for r, _ in fresh],
        [r.note for r, _ in fresh],
    )
    return ImportResult(import_id or 0, len(reads), len(new), len(good) - len(new), replayed=False)


async def _conflicts(
    conn: asyncpg.Connection, taken: list[tuple[EnteredRead, int]], source: Source
) -> list[tuple[int, str]]:
    """(line, reason) of each read whose instant holds a reading that is not the same one:
    equal register, and for a manual read an entered one too."""
    # one index probe per instant: runtime chunk exclusion on (off for the API's sessions)
    await conn.execute("SET LOCAL timescaledb.enable_runtime_exclusion = on")
    rows = await conn.fetch(_EXISTING_SQL, [m for _, m in taken], [r.read_at for r, _ in taken])
    found = {(r["meter_id"], r["read_at"]): r for r in rows}
    conflicts = []
    for read, meter_id in taken:
        there = found.get((meter_id, read.read_at))
        if there is None:
            continue
        what = "a manual read" if there["source"] is not None else "a meter reading"
        same = there["register_ml"] == read.register_ml
        if same and (source == "import" or there["source"] is not None):
            continue
        conflicts.append(
            (
                read.line,
                f"{what} of {_m3(there['register_ml'])} m3 is stored for meter {meter_id} at"
                f" {read.read_at.isoformat()}: an entered read never replaces a stored"
                " reading (give another instant, e.g. the minute it was read)",
            )
        )
    return conflicts


async def manual_reads(
    conn: asyncpg.Connection,
    tenant_id: int,
    meter_id: int,
    *,
    read_at: datetime | None = None,
    limit: int = 100,
) -> list[Stored]:
    """The meter's entered reads, newest first (empty for another tenant's meter); with
    `read_at`, the one entered at that second."""
    read_at = None if read_at is None else _whole(read_at)
    with translated("listing entered reads"):
        async with conn.transaction():
            # each read's register is one probe of readings: runtime chunk exclusion on
            await conn.execute("SET LOCAL timescaledb.enable_runtime_exclusion = on")
            rows = await conn.fetch(_LIST_SQL, tenant_id, meter_id, read_at, limit)
    return [Stored(**dict(r)) for r in rows]


def body_digest(body: bytes) -> bytes:
    """The sha256 that identifies an import body (re-posting it imports nothing)."""
    return hashlib.sha256(body).digest()
