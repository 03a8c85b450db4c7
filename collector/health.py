"""A decoded frame's health fields -> the `device_health` figures (`storage.health.HealthRow`).

The decoders name their fields with units (`battery_v`, `rsrp_dbm`, `sinr_cdb`, ...;
`decoder.health`, `decoder.senml.HEALTH_FIELDS`, nbm1 v2); this is the one place they are
brought to the table's units. A figure outside what its column holds is no figure: a
device reporting nonsense must not sink the batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import TypedDict, cast

import numpy as np

from decoder import limits
from decoder.columns import Column, Decoded

# what `_health_fields` asks the decoded columns for
HEALTH_NAMES = (
    "battery_mv", "battery_v", "battery_pct", "battery_low", "meter_error",
    "rsrp_cdbm", "rsrp_dbm", "sinr_cdb", "sinr_db", "ecl", "cell_id",
)  # fmt: skip

_INT4 = (-(2**31), 2**31 - 1)
# column -> ((field, factor to the column's unit), ...) in order of preference, and range
_SCALED: Mapping[str, tuple[tuple[tuple[str, int], ...], tuple[int, int]]] = {
    "battery_mv": ((("battery_mv", 1), ("battery_v", 1000)), _INT4),
    "rsrp_cdbm": ((("rsrp_cdbm", 1), ("rsrp_dbm", 100)), _INT4),
    "sinr_cdb": ((("sinr_cdb", 1), ("sinr_db", 100)), _INT4),
    "ecl": ((("ecl", 1),), (0, 2)),  # 3GPP TS 36.331: CE level 0..2
    "battery_pct": ((("battery_pct", 1),), (0, 100)),
    "cell_id": ((("cell_id", 1),), (0, 2**32 - 1)),  # E-UTRAN cell identity: 28 bits
}
_FLAGS = ("battery_low", "meter_error")


def _scaled(extra: Mapping[str, object], names: tuple[tuple[str, int], ...]) -> int | None:
    for name, factor in names:
        value = extra.get(name)
        if isinstance(value, int | float | Decimal) and not isinstance(value, bool):
            try:
                scaled = Decimal(str(value)) * factor
                # an absurd magnitude (1E+999999) is no figure, and int() of it would
                # take seconds of CPU
                return int(scaled) if abs(scaled) < limits.INT8_END else None
            except (ArithmeticError, ValueError):  # NaN, inf, past the decimal context
                return None
    return None


class Figures(TypedDict):
    """The `storage.health.HealthRow` fields a frame reports (None: not reported)."""

    battery_mv: int | None
    rsrp_cdbm: int | None
    sinr_cdb: int | None
    ecl: int | None
    battery_pct: int | None
    cell_id: int | None
    battery_low: bool | None
    meter_error: bool | None


def health_of(extra: Mapping[str, object]) -> Figures:
    """The device_health figures of a frame's extra fields; None where absent or implausible."""
    out: dict[str, int | bool | None] = {}
    for column, (names, (low, high)) in _SCALED.items():
        value = _scaled(extra, names)
        out[column] = value if value is not None and low <= value <= high else None
    for name in _FLAGS:
        flag = extra.get(name)
        out[name] = bool(flag) if isinstance(flag, bool | int) else None
    return cast("Figures", out)


class HealthColumns:
    """A decoded batch's health figures as per-frame arrays, built once per batch.

    `figures(j)` is frame j's `Figures` (None when it reports none) and equals
    `health_of(dec.extra_of(j, HEALTH_NAMES))`: the same names, precedence, units and
    ranges, read column-wise (tests/collector/test_health_columns.py holds the two equal).
    Frames with sparse fields (SenML packs) and columns of Python objects take the
    per-frame path.
    """

    def __init__(self, dec: Decoded) -> None:
        self._dec = dec
        n = dec.n_frames
        fields: Mapping[str, Column] = getattr(dec, "fields", None) or {}
        self._columnar = hasattr(dec, "fields")
        self._per_frame: set[int] = set(getattr(dec, "sparse", {}) or {})
        self._values: dict[str, np.ndarray] = {}
        self._present: dict[str, np.ndarray] = {}
        for column, (names, (low, high)) in _SCALED.items():
            value, present = np.zeros(n, np.int64), np.zeros(n, bool)
            for name, factor in names:
                col = fields.get(name)
                if col is None:
                    continue
                got = _scaled_column(col, factor)
                if got is None:  # objects: the per-frame path for the frames that have it
                    self._per_frame.update(np.flatnonzero(_has(col, n)).tolist())
                    continue
                v, ok = got
                take = ok & ~present
                value[take], present[take] = v[take], True
            self._values[column] = value
            self._present[column] = present & (value >= low) & (value <= high)
        for name in _FLAGS:
            col = fields.get(name)
            if col is None or col.values.dtype.kind not in "biu":
                if col is not None:
                    self._per_frame.update(np.flatnonzero(_has(col, n)).tolist())
                self._present[name] = np.zeros(n, bool)
                self._values[name] = np.zeros(n, bool)
                continue
            self._present[name] = _has(col, n)
            self._values[name] = col.values.astype(bool)
        self._any: list[bool] = np.logical_or.reduce(list(self._present.values())).tolist()
        # Python lists: indexing them per frame is several times cheaper than numpy scalars
        self._lists = [
            (name, self._values[name].tolist(), present.tolist())
            for name, present in self._present.items()
            if present.any()
        ]
        self._absent: dict[str, None] = dict.fromkeys(self._present)

    def figures(self, j: int) -> Figures | None:
        """Frame j's figures, or None when it reports no health figure."""
        if not self._columnar:
            got = health_of(self._dec.extra[j])
        elif j in self._per_frame:
            got = health_of(self._dec.extra_of(j, HEALTH_NAMES))
        elif not self._any[j]:
            return None
        else:
            out: dict[str, int | bool | None] = dict(self._absent)
            for name, values, present in self._lists:
                if present[j]:
                    out[name] = values[j]
            got = cast("Figures", out)
        return got if any(v is not None for v in got.values()) else None


def _has(col: Column, n: int) -> np.ndarray:
    return np.ones(n, bool) if col.present is None else np.asarray(col.present, bool)


def _scaled_column(col: Column, factor: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(int64 values in the column's unit x factor, truncated as `health_of` does; present)
    or None for a column of Python objects (or text)."""
    if col.values.dtype.kind not in "iu" or col.render not in ("", "decimal"):
        return None
    n = len(col.values)
    num = col.values.astype(np.int64) * factor
    if col.render == "decimal":
        div = np.int64(10) ** col.scales().astype(np.int64)
        num = np.sign(num) * (np.abs(num) // div)  # int(Decimal): toward zero
    return num, _has(col, n)
