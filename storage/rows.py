"""The rows storage writes and the results it returns: plain dataclasses, no driver.

The writers (`storage.archive`, `storage.events`, `storage.health`, `storage.ingest`) take
these; the collector's pure verdict (`collector.verdict`) builds them without importing
the database driver, which this module must never import (an import contract holds it).

- `RawUplink`, `QuarantineRow`: the archive of received uplinks and of those set aside;
  `pg_text` / `is_pg_text`: text PostgreSQL can hold (no NUL, no unpaired surrogate);
- `EventRow`: a meter alarm; `HealthRow`: what a modem reported about itself;
- `ReadingBatch`: readings as numpy columns; `IngestResult`: what a write did, with its
  `Rejection`s (`RejectReason`: why a row was not written, and its quarantine `Reason`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, NamedTuple

import numpy as np
import numpy.typing as npt

from decoder.columns import Decoded
from storage.copybin import PG_EPOCH_S
from storage.reasons import Reason

Int64s = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]
Path = Literal["copy", "merge", "none"]

# NB-IoT networks opened in 2016 (3GPP Release 13); a meter clock before 2015 is a reset
# RTC (they typically restart at 2000-01-01), not a reading time.
EARLIEST_READ_AT_S = 1_420_070_400  # 2015-01-01T00:00:00Z
# a meter clock may run ahead of ours; a day ahead is a wrong clock, not drift
MAX_CLOCK_AHEAD_S = 86_400
# a reading dated more than this after it was received is stored but flagged
# Flag.CLOCK_AHEAD, which billing leaves out (readings keep no receive time: migration 0049)
FUTURE_TOLERANCE_S = 300
# readings.read_s (migration 0054): int4 whole seconds since 2000-01-01T00:00:00Z, so a
# stored reading lies in [READ_S_MIN_EPOCH, READ_S_MAX_EPOCH] (epoch seconds): 1931-12-13
# .. 2068-01-19. Ingest never gets near either end (EARLIEST_READ_AT_S, MAX_CLOCK_AHEAD_S).
READ_S_EPOCH = PG_EPOCH_S  # PostgreSQL's own epoch, as timestamptz counts
READ_S_MIN_EPOCH = READ_S_EPOCH - 2**31
READ_S_MAX_EPOCH = READ_S_EPOCH + 2**31 - 1


# a meter's installed_at as the reading writer keeps it, in whole epoch seconds rounded
# down (`storage.ingest`; the OSCORE context load reads it alike for the writer to learn)
INSTALLED_S_SQL = "floor(extract(epoch FROM installed_at))::bigint"

UplinkOutcome = Literal["stored", "duplicate", "quarantined", "pending"]


class RawUplink(NamedTuple):
    """One received uplink as archived; `received_at` is timezone-aware UTC.

    A named tuple in the table's column order, not a frozen dataclass: one is built per
    uplink, and the archive's COPY takes it as its record as it is (`storage.archive`)."""

    received_at: datetime
    tenant_id: int | None
    meter_id: int | None
    transport: int
    peer: str | None
    payload: bytes
    format: str | None
    outcome: UplinkOutcome
    n_readings: int = 0
    n_new: int = 0
    error_code: int | None = None
    error_message: str | None = None
    decode_flags: int | None = None  # decoder.columns.FrameFlag bits; None: not decoded


@dataclass(frozen=True)
class QuarantineRow:
    """One uplink or reading set aside; `reason` is a machine-readable code (see 0001)."""

    received_at: datetime
    tenant_id: int | None
    meter_id: int | None
    transport: int
    peer: str | None
    reason: str
    detail: str
    payload: bytes | None = None


def is_pg_text(value: str) -> bool:
    """True if PostgreSQL can store `value` as text as it is (no NUL, valid UTF-8)."""
    if value.isascii():
        return "\x00" not in value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # an unpaired surrogate (JSON "\ud800" decodes to one)
        return False
    return "\x00" not in value


def pg_text(value: str | None) -> str | None:
    """`value` as PostgreSQL text can hold it: NUL becomes the four characters `\\x00`, an
    unpaired surrogate `\\udXXX`; any other text is returned unchanged (and fast)."""
    if value is None or is_pg_text(value):
        return value
    escaped = value.encode("utf-8", "backslashreplace").decode("utf-8")
    return escaped.replace("\x00", "\\x00")


@dataclass(frozen=True)
class EventRow:
    """One alarm a meter reported; times timezone-aware UTC.

    `kind` is one of the names the table's CHECK lists (migration 0001): leak, burst, ...
    """

    meter_id: int
    occurred_at: datetime
    kind: str
    received_at: datetime


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


class RejectReason(enum.IntEnum):
    """Why a row was not written; `.label` is its quarantine `Reason`."""

    UNKNOWN_METER = 1  # no meter row with that id (or the address did not resolve: -1)
    NEGATIVE_REGISTER = 2  # a register is a count of millilitres, never negative
    CLOCK_PAST = 3  # read_at before 2015: the meter's clock was reset
    CLOCK_FUTURE = 4  # read_at more than a day after the collector received it
    BEFORE_INSTALLATION = 5  # read_at before the meter's installation: not its reading here

    @property
    def label(self) -> Reason:
        """The quarantine reason of such a row (`storage.reasons`: the same name)."""
        return Reason(self.name.lower())


@dataclass(frozen=True)
class Rejection:
    """Row `index` of the batch was not written, because of `reason`."""

    index: int
    reason: RejectReason


@dataclass(frozen=True)
class ReadingBatch:
    """Readings to write, as equal-length numpy columns (scalars for per-batch values).

    `meter_id`: int64 database meter ids (-1 for an address that did not resolve);
    `read_at_s`: int64 UTC epoch seconds (the decoder's unit); `register_ml`: int64 mL;
    `flags`: uint32/int32 `decoder.columns.Flag` bits; `received_at_us`: int64 UTC epoch
    microseconds, per row or batch: checked against read_at at ingest (clock_future,
    Flag.CLOCK_AHEAD), not stored with the reading (the uplink's raw archive row keeps it,
    and its transport). Raises ValueError if the array columns differ in length.
    """

    meter_id: Int64s
    read_at_s: Int64s
    register_ml: Int64s
    flags: npt.NDArray[np.uint32] | npt.NDArray[np.int32]
    received_at_us: int | Int64s

    def __post_init__(self) -> None:
        """Check that every array column has the length of `meter_id`."""
        n = len(self.meter_id)
        for name in ("read_at_s", "register_ml", "flags", "received_at_us"):
            value = getattr(self, name)
            if isinstance(value, np.ndarray) and value.shape != (n,):
                msg = f"ReadingBatch.{name} has shape {value.shape}, meter_id has {n} rows"
                raise ValueError(msg)

    def __len__(self) -> int:
        """Number of rows."""
        return len(self.meter_id)

    @classmethod
    def from_decoded(
        cls, decoded: Decoded, meter_ids: Int64s, *, received_at_us: int
    ) -> ReadingBatch:
        """The readings of `decoded` with their addresses resolved to `meter_ids` (-1: unknown)."""
        return cls(
            meter_id=meter_ids,
            read_at_s=decoded.read_at_s,
            register_ml=decoded.register_ml,
            flags=decoded.flags,
            received_at_us=received_at_us,
        )


@dataclass(frozen=True)
class IngestResult:
    """What one `write` did: per-batch counts for metrics, and which rows were new.

    `rows == new + duplicate + len(rejected)`. `duplicate` counts rows whose key the
    database already had, or that repeat an earlier row of the same batch (the first
    one is kept). `new_mask[i]` is true if row i was inserted by this call. `path` is
    the write path taken; `elapsed_s` the wall time of the whole call.
    """

    rows: int
    new: int
    duplicate: int
    rejected: tuple[Rejection, ...]
    new_mask: Bools = field(repr=False)
    path: Path
    elapsed_s: float

    def rejected_by_reason(self) -> dict[str, int]:
        """Rejected row counts keyed by reason label (only reasons that occurred)."""
        counts: dict[str, int] = {}
        for rejection in self.rejected:
            counts[rejection.reason.label] = counts.get(rejection.reason.label, 0) + 1
        return counts
