"""Consumption between two registers of one meter: the rollover rule, in one place.

A register that drops has either rolled over (passed 10^digits units and restarted at 0)
or run backwards (reverse flow). It rolled over only if the wrapped volume fits the
meter kind's maximum plausible flow over the time between the two registers; any other
drop is negative consumption. A meter exchange is not a drop: each meter's consumption
is its own (the cycle read sums the meters' segments).

SQL twin: `nbm_consumption` (migration 0020), used set-wise by the export and by the
interval reads (storage.billing); the interpolation inside `nbm_boundary_read` applies the
same rule (billing.boundary). tests/api/test_boundary_twin.py holds them equal.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Literal

Kind = Literal["water", "gas"]

# Maximum physically plausible flow per meter kind, in mL per hour. A register drop is a
# rollover only if the wrapped volume fits this flow over the time between the readings.
# water: 10 m3/h, above the overload flow Q4 of residential meters (DN25: Q4 = 7.875 m3/h,
# ISO 4064 / OIML R49); gas: 10 m3/h, the Qmax of a G6 diaphragm meter (EN 1359).
MAX_FLOW_ML_H: dict[Kind, int] = {"water": 10_000_000, "gas": 10_000_000}
US_PER_H = 3_600_000_000
_US = timedelta(microseconds=1)


def span_us(start: datetime, end: datetime) -> int:
    """Microseconds from start to end, exactly (SQL: extract(epoch FROM end - start))."""
    return (end - start) // _US


def rolled_over(drop_ml: int, modulus_ml: int, over_us: int, max_flow_ml_h: int) -> bool:
    """True when a register drop of `drop_ml` (< 0) is a rollover: the wrapped volume
    `drop_ml + modulus_ml` could have flowed in `over_us` µs at `max_flow_ml_h`."""
    return drop_ml < 0 and (drop_ml + modulus_ml) * US_PER_H <= max_flow_ml_h * over_us


def consumption(
    open_ml: int | None, close_ml: int | None, over_us: int, modulus_ml: int, max_flow_ml_h: int
) -> int | None:
    """mL used from `open_ml` to `close_ml` over `over_us` µs: the difference, plus one
    register range when the drop is a rollover; negative for reverse flow; None when a
    register is unknown."""
    if open_ml is None or close_ml is None:
        return None
    used = close_ml - open_ml
    if rolled_over(used, modulus_ml, over_us, max_flow_ml_h):
        return used + modulus_ml
    return used
