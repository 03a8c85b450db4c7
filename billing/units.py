"""The one conversion between millilitres and cubic metres, and the register's arithmetic.

Inside nbmeter a register or a volume is an int of millilitres (exact, numpy int64 in the
pipeline); it becomes a `Decimal` of m3 only where a person or a billing system reads it
(the API's responses and messages), and m3 given by them becomes mL once on the way in.
A register counts units of 10^scale m3 (scale -3: litres) and rolls over to 0 at
10^digits units.

SQL twin: `storage.billing._m3` renders `round(ml / 1e6, -scale)` in the export; held
equal to `m3` by tests/api/test_boundary_twin.py.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

import numpy as np
import numpy.typing as npt

ML_PER_M3 = 1_000_000
_ML_EXPONENT = -6  # 1 mL = 10^-6 m3


class ResolutionError(ValueError):
    """A volume finer than the register (or than 1 mL) can hold; the message says which."""


def unit_ml(scale: int) -> int:
    """The register's smallest unit in mL (scale -3: 1,000 mL)."""
    return int(10 ** (scale - _ML_EXPONENT))  # int(): mypy types int ** int as Any


def modulus_ml(digits: int, scale: int) -> int:
    """The register's range in mL: it rolls over to 0 here."""
    return int(10**digits) * unit_ml(scale)


def m3(ml: int, scale: int) -> Decimal:
    """`ml` in m3 with the register's number of decimals, half away from zero, never -0.

    Exact when `ml` is a whole number of register units, which every stored register is.
    """
    value = Decimal(ml).scaleb(_ML_EXPONENT).quantize(Decimal(1).scaleb(scale), ROUND_HALF_UP)
    return abs(value) if value.is_zero() else value


def m3_or_none(ml: int | None, scale: int) -> Decimal | None:
    """`m3(ml, scale)`, None staying None (an absent read or consumption)."""
    return None if ml is None else m3(ml, scale)


def ml(value: Decimal | str) -> int:
    """Whole millilitres in `value` m3, toward zero (as `int()`): for reading the API's own
    text, which never holds a fraction of a millilitre."""
    return int(Decimal(value) * ML_PER_M3)


def register_ml(value: Decimal | str, scale: int) -> int:
    """Exact mL of `value` m3; ResolutionError if finer than the register's unit."""
    volume = Decimal(value) * ML_PER_M3
    if volume != volume.to_integral_value() or int(volume) % unit_ml(scale):
        msg = f"{value} m3 is finer than the register's resolution (10^{scale} m3)"
        raise ResolutionError(msg)
    return int(volume)


def total_m3(parts: list[tuple[int | None, int]]) -> Decimal | None:
    """The sum of volumes (mL, register scale) each rounded as `m3`, with the most decimals
    any of them has; None if there are none or one is absent (a meter exchange's segments)."""
    if not parts or any(v is None for v, _ in parts):
        return None
    total = sum((m3(v, scale) for v, scale in parts if v is not None), Decimal(0))
    return total.quantize(Decimal(1).scaleb(min(scale for _, scale in parts)))


def negative(registers_ml: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
    """Which registers are negative: a register counts millilitres, it is never below 0."""
    return registers_ml < 0
