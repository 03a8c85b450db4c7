"""Columnar decode results: what every format decoder returns for a batch of frames.

A batch of N input frames yields M register readings (a frame may carry several: an
interval batch expands to N+1 readings, an M-Bus frame may carry a billing-date register).
Every reading column has length M; every per-frame column has length N. Register values
are exact integers of millilitres (1e-6 m3): the decoder never produces a float for a
billing quantity.

Per-frame failure is a code, never an exception: `error_code[i] != 0` marks frame i as
rejected, `error_message[i]` says why in words a field engineer can act on.

Other decoded fields (battery, settlement total, valve state...) are columnar and lazy:
`Decoded.fields[name]` is a `Column` (one array entry per frame, a presence mask, an exact
integer scale or a label table), `Decoded.sparse[i]` holds the rare per-frame extras that
have no column shape (a SenML pack's records). `Decoded.extra_of(i)` builds frame i's dict
only when asked (the JSON view, tests); a hot path reads the arrays.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal

import numpy as np
import numpy.typing as npt

Int64s = npt.NDArray[np.int64]
Int32s = npt.NDArray[np.int32]
UInt32s = npt.NDArray[np.uint32]
UInt16s = npt.NDArray[np.uint16]
Objects = npt.NDArray[np.object_]
Bools = npt.NDArray[np.bool_]

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
    MALFORMED = 18  # past a parsing limit (JSON/CBOR nesting depth, size, a refused CBOR tag)


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
    # dated more than storage.rows.FUTURE_TOLERANCE_S after the collector received it: a
    # clock running ahead, so billing leaves it out. Set by storage at ingest from the
    # receive time (which readings do not keep), never by a decoder: ingest clears it
    # from decoded flags first (an interval frame's status bits are the device's word).
    CLOCK_AHEAD = 1 << 12


class FrameFlag(enum.IntFlag):
    """Per-frame decode notes: what a decoder tolerated or left out of an accepted frame.

    A frame with a readable current register is accepted; whatever else was odd about it
    is one of these bits (`Decoded.frame_flags`), shown by `nbmeter decode` and stored
    with the raw uplink, never a reason to drop the register. Values are stable (stored).
    """

    NONE = 0
    RECORD_DROPPED = 1 << 0  # a secondary record was unreadable (bad digits, unit): left out
    NO_DATA = 1 << 1  # a record carried a "no data" marker (0x80.., all ones, date FFFF)
    TRAILING_JUNK = 1 << 2  # bytes after the last valid record ignored (FED0, FFFF, ...)
    CUT_RECORD = 1 << 3  # the last record was cut short: ignored
    LENGTH_MISMATCH = 1 << 4  # L field disagrees with the frame length: read as received
    CLEAR_PAYLOAD = 1 << 5  # a security mode is declared, the payload is in clear (2F2F)
    LINK_FIELD_KEPT = 1 << 6  # a data record named like a link-layer field was renamed
    BILLING_UNDATED = 1 << 7  # the billing register's date is invalid: no billing reading
    LINK_CRCS_REMOVED = 1 << 8  # a wM-Bus frame came with its data-link CRCs: checked, removed


def frame_flag_names(bits: int) -> list[str]:
    """The lowercase names of the `FrameFlag` bits set in `bits` (unknown bits as bitN)."""
    names = [f.name.lower() for f in FrameFlag if f and bits & f and f.name]
    known = sum(int(f) for f in FrameFlag)
    names.extend(f"bit{b}" for b in range(32) if bits & ~known & (1 << b))
    return names


RENDERS = ("", "decimal", "hex2", "hex4", "label")


@dataclass(frozen=True)
class Column:
    """One extra field of every frame of a batch: `values[i]` is frame i's, if `present[i]`.

    `values` has one entry per frame: an integer or bool array, a numpy str array, or an
    object array (only where values have no array shape, e.g. M-Bus text records).
    `present` is None when every frame has the field. `render` says what `value(i)` gives:
    ""        the value itself (numpy scalars as Python int/bool/str);
    "decimal" `Decimal(values[i]).scaleb(-scale)` - exact, at the meter's own precision;
              `scale` is an int or a per-frame int array (CJ/T 188 unit codes vary it);
    "hex2"    / "hex4": the integer as 2 / 4 uppercase hex digits ("2C", "901F");
    "label"   `labels[values[i]]` ("open", "closed", ...).
    """

    values: np.ndarray
    present: Bools | None = None
    render: str = ""
    scale: int | np.ndarray = 0
    labels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        """Refuse an unknown render (a typo would otherwise show raw integers)."""
        if self.render not in RENDERS:
            msg = f"unknown render {self.render!r}; one of {RENDERS}"
            raise ValueError(msg)

    def has(self, i: int) -> bool:
        """Whether frame i carries this field."""
        return self.present is None or bool(self.present[i])

    def value(self, i: int) -> object:
        """Frame i's value as a Python object (see the class docstring); no presence check."""
        v = self.values[i]
        if self.render == "decimal":
            scale = self.scale if isinstance(self.scale, int) else int(self.scale[i])
            return Decimal(int(v)).scaleb(-scale)
        if self.render == "hex2":
            return f"{int(v):02X}"
        if self.render == "hex4":
            return f"{int(v):04X}"
        if self.render == "label":
            return self.labels[int(v)]
        return v.item() if isinstance(v, np.generic) else v

    def scales(self) -> np.ndarray:
        """The scale of every frame as an int8 array."""
        if isinstance(self.scale, int):
            return np.full(len(self.values), self.scale, np.int8)
        return np.asarray(self.scale, np.int8)

    def objects(self) -> Objects:
        """Every frame's value as an object array, None where absent (per-frame Python)."""
        out = np.full(len(self.values), None, object)
        rows = range(len(self.values)) if self.present is None else np.flatnonzero(self.present)
        for i in rows:
            out[i] = self.value(int(i))
        return out

    @classmethod
    def of_objects(cls, values: Sequence[object] | Objects) -> Column:
        """An object column from per-frame Python values, None meaning absent."""
        arr = np.empty(len(values), object)
        arr[:] = values
        present = arr != None  # noqa: E711 (elementwise: numpy compares each cell with None)
        return cls(arr, None if present.all() else present)


@dataclass(frozen=True)
class Decoded:
    """Readings and per-frame outcomes of one decoded batch.

    Reading columns (length M): `frame_index` (which input frame), `address` (address as
    the meter reports it: a numpy str or object array, elements compare as str),
    `read_at_s` (UTC epoch seconds), `register_ml` (int64 mL), `flags` (uint32 of `Flag`).
    Frame columns (length N): `format` (str key of the format that decoded it, or ""),
    `address_of_frame` (str or ""), `error_code` (uint16 of `ErrorCode`), `error_message`
    (str or ""), `fields` (name -> `Column`, other decoded fields with units in their
    names, e.g. `battery_v`, `rsrp_dbm`, `settlement_m3`), `sparse` (frame -> dict of
    rare fields) and `frame_flags` (uint32 of `FrameFlag`, or None: no notes; read it
    through `frame_flags_or_zero`). `extra_of(i)` / `extra[i]` merge `fields` and `sparse`
    into one dict of int, str, Decimal or bool values, built on demand.
    """

    frame_index: Int32s
    address: np.ndarray
    read_at_s: Int64s
    register_ml: Int64s
    flags: UInt32s
    format: Objects
    address_of_frame: np.ndarray
    error_code: UInt16s
    error_message: Objects
    fields: dict[str, Column] = field(default_factory=dict)
    sparse: dict[int, Mapping[str, object]] = field(default_factory=dict)
    frame_flags: UInt32s | None = None

    @property
    def frame_flags_or_zero(self) -> UInt32s:
        """`frame_flags`, or zeros (one per frame) when the decoder noted nothing."""
        if self.frame_flags is None:
            return np.zeros(self.n_frames, np.uint32)
        return self.frame_flags

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
        ok: npt.NDArray[np.bool_] = self.error_code == ErrorCode.OK
        return ok

    def extra_of(self, i: int, names: Sequence[str] | None = None) -> dict[str, object]:
        """Frame i's extra fields as one dict (columns, then sparse), only `names` if given."""
        cols = self.fields
        if names is not None:
            cols = {n: self.fields[n] for n in names if n in self.fields}
        out = {name: col.value(i) for name, col in cols.items() if col.has(i)}
        if (rare := self.sparse.get(i)) is not None:
            out.update(rare if names is None else {n: rare[n] for n in names if n in rare})
        return out

    @property
    def extra(self) -> Sequence[dict[str, object]]:
        """Lazy per-frame view: `extra[i]` is `extra_of(i)` (a new dict on every access)."""
        return _ExtraView(self)


class _ExtraView(Sequence[dict[str, object]]):
    """`Decoded.extra`: a read-only sequence that builds each frame's dict on access."""

    def __init__(self, decoded: Decoded) -> None:
        self._decoded = decoded

    def __len__(self) -> int:
        return self._decoded.n_frames

    def __getitem__(self, i: int) -> dict[str, object]:  # type: ignore[override]  # no slices
        n = self._decoded.n_frames
        if not -n <= i < n:
            raise IndexError(i)
        return self._decoded.extra_of(i % n)

    def __iter__(self) -> Iterator[dict[str, object]]:
        return (self._decoded.extra_of(i) for i in range(self._decoded.n_frames))


def empty(n_frames: int = 0) -> Decoded:
    """A result with no readings and `n_frames` frames all marked OK (to be filled in)."""
    return Decoded(
        frame_index=np.zeros(0, np.int32),
        address=np.zeros(0, object),
        read_at_s=np.zeros(0, np.int64),
        register_ml=np.zeros(0, np.int64),
        flags=np.zeros(0, np.uint32),
        format=np.full(n_frames, "", object),
        address_of_frame=np.full(n_frames, "", object),
        error_code=np.zeros(n_frames, np.uint16),
        error_message=np.full(n_frames, "", object),
    )


def _category(values: np.ndarray) -> str:
    """Category "O" object, "U" text or "n" numeric/bool: one category merges as arrays."""
    kind = values.dtype.kind
    return kind if kind in "OU" else ("U" if kind == "S" else "n")


def _merge_fields(parts: list[tuple[Int64s, Decoded]], n_frames: int) -> dict[str, Column]:
    """Scatter each part's columns to input order (a loop over fields, not frames).

    Parts that agree on a field's representation are merged as arrays (differing decimal
    scales become a per-frame scale); a field represented differently by two formats (say
    an M-Bus object column and a CJ/T 188 integer one) falls back to an object column.
    """
    names: dict[str, list[tuple[Int64s, Column]]] = {}
    for where, part in parts:
        for name, col in part.fields.items():
            names.setdefault(name, []).append((where, col))
    out: dict[str, Column] = {}
    for name, cols in names.items():
        kinds = {(c.render, c.labels, _category(c.values)) for _, c in cols}
        if len(kinds) > 1:
            cols = [(w, Column.of_objects(c.objects())) for w, c in cols]
        first = cols[0][1]
        values = np.zeros(n_frames, np.result_type(*(c.values.dtype for _, c in cols)))
        if values.dtype.kind == "O":
            values[:] = None
        present = np.zeros(n_frames, bool)
        for where, col in cols:
            values[where] = col.values
            present[where] = True if col.present is None else col.present
        scale: int | np.ndarray = first.scale
        uniform = len({c.scale if isinstance(c.scale, int) else -1 for _, c in cols}) == 1
        if first.render == "decimal" and not (uniform and isinstance(first.scale, int)):
            scale = np.zeros(n_frames, np.int8)
            for where, col in cols:
                scale[where] = col.scales()
        out[name] = Column(
            values, None if present.all() else present, first.render, scale, first.labels
        )
    return out


def concat(parts: list[tuple[npt.NDArray[np.int64], Decoded]], n_frames: int) -> Decoded:
    """Merge per-group results back into input order (array scatters, no per-frame loop).

    `parts` holds (input frame indices of the group, the group's Decoded, whose frame
    indices are local to the group). Frames covered by no part are UNKNOWN_FORMAT.
    """
    out_format = np.full(n_frames, "", object)
    out_meter = np.full(n_frames, "", object)
    out_code = np.full(n_frames, ErrorCode.UNKNOWN_FORMAT, np.uint16)
    out_msg = np.full(n_frames, "no known meter format recognises this frame", object)
    sparse: dict[int, Mapping[str, object]] = {}
    frame_flags = np.zeros(n_frames, np.uint32)
    cols: dict[str, list[np.ndarray]] = {
        k: [] for k in ("frame_index", "address", "read_at_s", "register_ml", "flags")
    }
    for where, part in parts:
        out_format[where] = part.format
        out_meter[where] = part.address_of_frame
        out_code[where] = part.error_code
        out_msg[where] = part.error_message
        if part.frame_flags is not None:
            frame_flags[where] = part.frame_flags
        if part.sparse:
            local = np.fromiter(part.sparse, np.int64, len(part.sparse))
            sparse.update(zip(where[local].tolist(), part.sparse.values(), strict=True))
        cols["frame_index"].append(where[part.frame_index].astype(np.int32))
        cols["address"].append(part.address)
        cols["read_at_s"].append(part.read_at_s)
        cols["register_ml"].append(part.register_ml)
        cols["flags"].append(part.flags)
    dtypes = {
        "frame_index": np.int32,
        "address": object,
        "read_at_s": np.int64,
        "register_ml": np.int64,
        "flags": np.uint32,
    }
    merged = {k: (np.concatenate(v) if v else np.zeros(0, dtypes[k])) for k, v in cols.items()}
    order = np.argsort(merged["frame_index"], kind="stable")
    return Decoded(
        frame_index=merged["frame_index"][order],
        address=merged["address"][order],
        read_at_s=merged["read_at_s"][order],
        register_ml=merged["register_ml"][order],
        flags=merged["flags"][order],
        format=out_format,
        address_of_frame=out_meter,
        error_code=out_code,
        error_message=out_msg,
        fields=_merge_fields(parts, n_frames),
        sparse=sparse,
        frame_flags=frame_flags if frame_flags.any() else None,
    )
