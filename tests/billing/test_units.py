"""The one mL <-> m3 conversion: exact, rounded as the export's SQL, never a float."""

from __future__ import annotations

from decimal import Decimal

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing import units


@pytest.mark.parametrize(
    ("ml", "scale", "text"),
    [
        (1_234_560_000, -2, "1234.56"),
        (5_000, -3, "0.005"),
        (0, -3, "0.000"),
        (0, 0, "0"),
        (1_500, -3, "0.002"),  # 1.5 L -> 2 L: half away from zero
        (2_500, -3, "0.003"),  # not to even
        (-2_500, -3, "-0.003"),
        (-400, -3, "0.000"),  # never -0, as numeric round() in SQL
        (123_456_789, -6, "123.456789"),
        (999_999_990_000, -2, "999999.99"),
        (7_000_000, 0, "7"),
    ],
)
def test_m3_rounds_to_the_register_decimals(ml: int, scale: int, text: str) -> None:
    """m3 has the register's decimals, rounds half away from zero and never gives -0."""
    assert str(units.m3(ml, scale)) == text


def test_m3_or_none_keeps_none() -> None:
    """An absent volume stays absent."""
    assert units.m3_or_none(None, -3) is None
    assert units.m3_or_none(1_000, -3) == Decimal("0.001")


@given(st.integers(-6, 0), st.integers(0, 10**12))
def test_register_ml_round_trips_whole_units(scale: int, units_count: int) -> None:
    """A register of whole units converts to m3 text and back to the same mL."""
    ml = units_count * units.unit_ml(scale)
    assert units.register_ml(str(units.m3(ml, scale)), scale) == ml
    assert units.ml(str(units.m3(ml, scale))) == ml


@pytest.mark.parametrize(("value", "scale"), [("1.0005", -3), ("0.0000001", -6), ("1.5", 0)])
def test_register_ml_refuses_finer_than_the_register(value: str, scale: int) -> None:
    """A volume finer than the register's unit (or than 1 mL) is a ResolutionError."""
    with pytest.raises(units.ResolutionError, match="finer than the register's resolution"):
        units.register_ml(value, scale)


def test_ml_reads_text_toward_zero() -> None:
    """ml() takes whole millilitres of a decimal text, as int() does."""
    assert units.ml("999999.99") == 999_999_990_000
    assert units.ml("5.1099999999") == 5_109_999


def test_unit_and_modulus() -> None:
    """A register of scale -3 counts litres and, with 8 digits, rolls over at 10^8 L."""
    assert units.unit_ml(-3) == 1_000
    assert units.unit_ml(0) == 1_000_000
    assert units.modulus_ml(8, -3) == 10**8 * 1_000


def test_total_m3_sums_rounded_parts_with_the_most_decimals() -> None:
    """A meter exchange's consumption: each segment rounded, the sum with the finer scale."""
    assert units.total_m3([(1_500_000, -3), (2_000_000, -2)]) == Decimal("3.500")
    assert str(units.total_m3([(1_500_000, -3), (2_000_000, -2)])) == "3.500"
    assert str(units.total_m3([(7_000_000, 0)])) == "7"
    assert str(units.total_m3([(-500_000, -3), (500_000, -3)])) == "0.000"
    assert units.total_m3([(1_000, -3), (None, -3)]) is None
    assert units.total_m3([]) is None


def test_negative_marks_negative_registers() -> None:
    """Only a register below 0 mL is negative."""
    got = units.negative(np.array([-1, 0, 1, -(2**63)], np.int64))
    assert got.tolist() == [True, False, False, True]
