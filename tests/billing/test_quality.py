"""ESPI quality codes: one table; a derived quantity keeps agreeing codes, else 13 mixed."""

from __future__ import annotations

import pytest

from billing import quality


@pytest.mark.parametrize(
    ("codes", "want"),
    [
        ((0, 0), 0),
        ((7, 7), 7),
        ((7, 0), 13),
        ((9, 8, 9), 13),
        ((0, None), None),
        ((None, None), None),
        ((), None),
        ((12,), 12),
    ],
)
def test_mixed(codes: tuple[int | None, ...], want: int | None) -> None:
    """Equal codes stay, different ones are 13, an unknown one makes it unknown."""
    assert quality.mixed(codes) == want


def test_table_is_one_code_each() -> None:
    """Each code appears once; 13 and 15 are never a register reading's."""
    numbers = [c.code for c in quality.CODES]
    assert len(numbers) == len(set(numbers))
    assert 13 not in quality.OF_READING
    assert 15 not in quality.OF_READING
    assert quality.OF_READING[quality.MANUALLY_EDITED] == "manually edited"
    assert {0, 7, 8, 9, 10, 12} <= set(quality.OF_READING)
