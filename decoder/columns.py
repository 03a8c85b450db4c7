"""Columnar decode results: what every format decoder returns for a batch of frames.

A batch of N input frames yields M register readings (a frame may carry several: an
interval batch expands to N+1 readings, an M-Bus frame may carry a billing-date register).
Every reading column has length M; every per-frame column has length N. Register values
are exact integers of millilitres (1e-6 m3): the decoder never produces a float for a
billing quantity.

Per-frame failure is a code, never an exception: `error_code[i] != 0` marks frame i as
rejected, `error_message[i]` says why in words a field engineer can act on.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

Int64s = npt.NDArray[np.int64]
Int32s = npt.NDArray[np.int32]
UInt32s = npt.NDArray[np.uint32]
UInt16s = npt.NDArray[np.uint16]
Objects = npt.NDArray[np.object_]

ML_PER_M3 = 1_000_000


class ErrorCode(enum.IntEnum):
    """Why a frame was rejected. 0 is success; codes are stable (stored in quarantine)."""

    OK = 0
    EMPTY = 1  # no bytes at all
    UNKNOWN_FORMAT = 2  # no registered format recognises the frame
    TRUNCATED = 3  # shorter than its length field or layout says
    BAD_START_STOP = 4  # start/stop byte missing
    BAD_CHECKSUM = 5  # CS / CRC mismatch
    BAD_LENGTH = 6  # length field disagrees with the frame
    BAD_BCD = 7  # a BCD nibble > 9 where a digit is required
    UNSUPPORTED = 8  # recognised format, but a variant we do not decode (say which)
    NO_KEY = 9  # encrypted frame, no key for this meter
    DECRYPT_FAILED = 10  # wrong key or corrupt ciphertext (2F2F check failed)
    BAD_RECORD = 11  # malformed DIF/VIF record, SenML record, JSON/CBOR
    BAD_UNIT = 12  # unit code not a volume, or a scale not exact in millilitres
    BAD_TIME = 13  # unparseable or impossible timestamp
    NO_REGISTER = 14  # decoded fine but carries no volume register
    UNKNOWN_COMPACT = 15  # compact frame whose format signature was never learned
    TOO_LARGE = 16  # frame longer than any layout allows
    INTERNAL = 17  # a format decoder raised (a bug): frame kept for re-decode, batch goes on


class Flag(enum.IntFlag):
    """Per-reading status bits, normalised across formats (stored as an int in the DB)."""

    NONE = 0
    VALVE_CLOSED = 1 << 0
    VALVE_ABNORMAL = 1 << 1
    LOW_BATTERY = 1 << 2
    LEAK = 1 << 3
    BURST = 1 << 4
    REVERSE_FLOW = 1 << 5
    TAMPER = 1 << 6
    DRY = 1 << 7  # empty pipe / no water
    METER_ERROR = 1 << 8  # meter reports a generic error / alarm
    CLOCK_MISSING = 1 << 9  # read time taken from the receive time, not the meter
    BILLING_DATE = 1 << 10  # a settlement-day / storage>=1 register, not the current one
    INTERVAL = 1 << 11  # expanded from an interval batch (not the head register)


@dataclass(frozen=True)
class Decoded:
    """Readings and per-frame outcomes of one decoded batch.

    Reading columns (length M): `frame_index` (which input frame), `meter_id` (address as
    the meter reports it, str), `read_at_s` (UTC epoch seconds), `register_ml` (int64 mL),
    `flags` (uint32 of `Flag`).
    Frame columns (length N): `format` (str key of the format that decoded it, or ""),
    `meter_of_frame` (str or ""), `error_code` (uint16 of `ErrorCode`), `error_message`
    (str or ""), `extra` (dict of other decoded fields with units in their names, e.g.
    `battery_v`, `rsrp_dbm`, `settlement_m3`; values are int, str, Decimal or bool).
    """

    frame_index: Int32s
    meter_id: Objects
    read_at_s: Int64s
    register_ml: Int64s
    flags: UInt32s
    format: Objects
    meter_of_frame: Objects
    error_code: UInt16s
    error_message: Objects
    extra: list[dict[str, object]] = field(default_factory=list)

    @property
    def n_frames(self) -> int:
        """Number of input frames."""
        return len(self.error_code)

    @property
    def n_readings(self) -> int:
        """Number of decoded register readings."""
        return len(self.register_ml)

    @property
    def ok(self) -> npt.NDArray[np.bool_]:
        """Per-frame success mask."""
        return self.error_code == ErrorCode.OK


def empty(n_frames: int = 0) -> Decoded:
    """A result with no readings and `n_frames` frames all marked OK (to be filled in)."""
    return Decoded(
        frame_index=np.zeros(0, np.int32),
        meter_id=np.zeros(0, object),
        read_at_s=np.zeros(0, np.int64),
        register_ml=np.zeros(0, np.int64),
        flags=np.zeros(0, np.uint32),
        format=np.full(n_frames, "", object),
        meter_of_frame=np.full(n_frames, "", object),
        error_code=np.zeros(n_frames, np.uint16),
        error_message=np.full(n_frames, "", object),
        extra=[{} for _ in range(n_frames)],
    )


def concat(parts: list[tuple[npt.NDArray[np.int64], Decoded]], n_frames: int) -> Decoded:
    """Merge per-group results back into input order.

    `parts` holds (input frame indices of the group, the group's Decoded, whose frame
    indices are local to the group). Frames covered by no part are UNKNOWN_FORMAT.
    """
    out_format = np.full(n_frames, "", object)
    out_meter = np.full(n_frames, "", object)
    out_code = np.full(n_frames, ErrorCode.UNKNOWN_FORMAT, np.uint16)
    out_msg = np.full(n_frames, "no known meter format recognises this frame", object)
    out_extra: list[dict[str, object]] = [{} for _ in range(n_frames)]
    cols: dict[str, list[np.ndarray]] = {
        k: [] for k in ("frame_index", "meter_id", "read_at_s", "register_ml", "flags")
    }
    for where, part in parts:
        out_format[where] = part.format
        out_meter[where] = part.meter_of_frame
        out_code[where] = part.error_code
        out_msg[where] = part.error_message
        for local, extra in enumerate(part.extra):
            out_extra[int(where[local])] = extra
        cols["frame_index"].append(where[part.frame_index].astype(np.int32))
        cols["meter_id"].append(part.meter_id)
        cols["read_at_s"].append(part.read_at_s)
        cols["register_ml"].append(part.register_ml)
        cols["flags"].append(part.flags)
    dtypes = {
        "frame_index": np.int32,
        "meter_id": object,
        "read_at_s": np.int64,
        "register_ml": np.int64,
        "flags": np.uint32,
    }
    merged = {
        k: (np.concatenate(v) if v else np.zeros(0, dtypes[k])) for k, v in cols.items()
    }
    order = np.argsort(merged["frame_index"], kind="stable")
    return Decoded(
        frame_index=merged["frame_index"][order],
        meter_id=merged["meter_id"][order],
        read_at_s=merged["read_at_s"][order],
        register_ml=merged["register_ml"][order],
        flags=merged["flags"][order],
        format=out_format,
        meter_of_frame=out_meter,
        error_code=out_code,
        error_message=out_msg,
        extra=out_extra,
    )
