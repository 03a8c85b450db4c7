"""A decoded frame's health fields -> the `device_health` figures (`storage.health.HealthRow`).

The decoders name their fields with units (`battery_v`, `rsrp_dbm`, `sinr_cdb`, ...;
`decoder.health`, `decoder.senml.HEALTH_FIELDS`, nbm1 v2); this is the one place they are
brought to the table's units. A figure outside what its column holds is no figure: a
device reporting nonsense must not sink the batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import TypedDict, cast

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
                return int(Decimal(str(value)) * factor)
            except (InvalidOperation, ValueError, OverflowError):  # NaN, inf
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
