"""Meter health from a decoded batch: which formats carry which health figure, as data.

`annotate(dec)` adds health columns derived from what every format already decoded, in one
vectorized pass (no loop over frames): a frame's status bits are the OR of its readings'
`Flag`s (`np.bitwise_or.at`), and a figure is *present* only for frames of a format that
carries it (a SenML pack that says nothing about its battery has no `battery_low`, rather
than a false "battery fine").

Added columns (units in the names; device figures a format reports itself, such as the
nbm1 v2 radio block or LwM2M objects 3/4, are decoded by that format, not here):

- `battery_low` (bool): CJ/T 188 ST D2 (FORMATS §1.2), OMS TPL STS bit 2 "power low"
  (EN 13757-7, FORMATS §2.2), Qalcosonic status 0x04 and nbm1 status `Flag.LOW_BATTERY`;
- `meter_error` (bool): OMS STS application error / permanent / temporary error bits and
  `FD 17` error-flag records, Qalcosonic 0x08/0x10, CJ/T 188 valve abnormal, nbm1 status.

A frame decoded by a driver file (`decoder.drivers`: a raw `driver` payload, or a wM-Bus
model whose payload is the vendor's, with no OMS status byte) carries a status bit only
if its driver declares an `[[alarm]]` with that flag; its figures (`battery_v`,
`rsrp_dbm`, ...) are its own fields. A frame that failed to decode has no health.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from decoder import drivers
from decoder.columns import Column, Decoded, Flag

# format key -> (Flag bit, column name) pairs its status carries. The decoders map each
# format's own status bits onto `Flag` (decoder.cjt188 StatusMap, decoder.mbus_link
# status_flags, decoder.interval QALCOSONIC_FLAGS / nbm1's Flag word), so the table only
# says which formats have such a status at all.
_CARRIED: Mapping[str, tuple[tuple[Flag, str], ...]] = {
    "cjt188": ((Flag.LOW_BATTERY, "battery_low"), (Flag.VALVE_ABNORMAL, "meter_error")),
    "mbus_wired": ((Flag.LOW_BATTERY, "battery_low"), (Flag.METER_ERROR, "meter_error")),
    "wmbus": ((Flag.LOW_BATTERY, "battery_low"), (Flag.METER_ERROR, "meter_error")),
    "interval": ((Flag.LOW_BATTERY, "battery_low"), (Flag.METER_ERROR, "meter_error")),
}
HEALTH_COLUMNS = ("battery_low", "meter_error")

EXAMPLES: tuple[tuple[str, int, Mapping[str, bool]], ...] = (
    # (format key, a frame's OR-ed reading flags, the health columns annotate adds)
    ("cjt188", int(Flag.LOW_BATTERY | Flag.VALVE_CLOSED),
     {"battery_low": True, "meter_error": False}),
    ("wmbus", int(Flag.METER_ERROR), {"battery_low": False, "meter_error": True}),
    ("interval", int(Flag.INTERVAL), {"battery_low": False, "meter_error": False}),
    ("senml", int(Flag.LOW_BATTERY), {}),
)  # fmt: skip


def frame_flags(dec: Decoded) -> np.ndarray:
    """Per frame (length N): the OR of the `Flag`s of its readings (0 for none)."""
    out = np.zeros(dec.n_frames, np.uint32)
    if dec.n_readings:
        np.bitwise_or.at(out, dec.frame_index.astype(np.int64), dec.flags.astype(np.uint32))
    return out


def _driver_rows(dec: Decoded) -> np.ndarray:
    """Per frame: the index of its driver in the `driver` label column, -1 for none."""
    out = np.full(dec.n_frames, -1, np.int64)
    col = dec.fields.get("driver")
    if col is not None and col.render == "label" and col.values.dtype.kind in "iu":
        has = np.ones(dec.n_frames, bool) if col.present is None else col.present
        out[has] = col.values[has]
    return out


def _declared_flags(name: str) -> Flag:
    """The flags driver `name` (of the current tenant scope) declares alarms for (none if
    it is not installed)."""
    found = Flag.NONE
    driver = drivers.named(name)
    for alarm in driver.alarms if driver is not None else ():
        found |= alarm.flag
    return found


def annotate(dec: Decoded) -> Decoded:
    """`dec` with the health columns of the module docstring added (in place; returned)."""
    n = dec.n_frames
    if n == 0:
        return dec
    formats = dec.format.astype(str)
    ok = dec.ok
    flags = frame_flags(dec)
    values: dict[str, np.ndarray] = {name: np.zeros(n, bool) for name in HEALTH_COLUMNS}
    present: dict[str, np.ndarray] = {name: np.zeros(n, bool) for name in HEALTH_COLUMNS}
    by_driver = _driver_rows(dec)
    for key, carried in _CARRIED.items():  # a loop over formats, not frames
        rows = ok & (formats == key) & (by_driver < 0)
        if not rows.any():
            continue
        for flag, name in carried:
            values[name] |= rows & ((flags & np.uint32(flag)) != 0)
            present[name] |= rows
    driver_col = dec.fields.get("driver")
    for d in np.unique(by_driver[ok & (by_driver >= 0)]).tolist():  # a loop over drivers
        assert driver_col is not None  # by_driver >= 0 only where the column is
        declared = _declared_flags(driver_col.labels[d])
        rows = ok & (by_driver == d)
        for flag, name in ((Flag.LOW_BATTERY, "battery_low"), (Flag.METER_ERROR, "meter_error")):
            if flag in declared:
                values[name] |= rows & ((flags & np.uint32(flag)) != 0)
                present[name] |= rows
    for name in HEALTH_COLUMNS:
        if present[name].any() and name not in dec.fields:
            every = bool(present[name].all())
            dec.fields[name] = Column(values[name], None if every else present[name])
    return dec
