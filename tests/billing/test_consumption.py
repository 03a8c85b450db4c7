"""The rollover rule: a drop is a rollover only if the wrapped volume fits the max flow."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from billing.consumption import MAX_FLOW_ML_H, consumption, rolled_over, span_us

MOD = 10**5 * 1_000  # 5 digits of litres: 100 m3
HOUR_US = 3_600_000_000
FLOW = MAX_FLOW_ML_H["water"]  # 10 m3/h


def test_rising_register_is_the_difference() -> None:
    """close >= open: the difference, whatever the time."""
    assert consumption(1_000, 5_000, 0, MOD, FLOW) == 4_000


def test_plausible_drop_is_a_rollover() -> None:
    """99.000 -> 1.900 m3 in a day on a 100 m3 register: 2.9 m3 used."""
    assert consumption(99_000_000, 1_900_000, 24 * HOUR_US, MOD, FLOW) == 2_900_000


def test_implausible_drop_is_reverse_flow() -> None:
    """0.5 m3 less after an hour: a wrap would be 99.5 m3 at 10 m3/h, so it is reverse flow."""
    assert consumption(50_000_000, 49_500_000, HOUR_US, MOD, FLOW) == -500_000


def test_wrap_exactly_at_the_max_flow_is_a_rollover() -> None:
    """The limit is inclusive: 10 m3 wrapped in exactly one hour at 10 m3/h."""
    assert rolled_over(-(MOD - 10_000_000), MOD, HOUR_US, FLOW)
    assert not rolled_over(-(MOD - 10_000_000), MOD, HOUR_US - 1, FLOW)
    assert not rolled_over(0, MOD, HOUR_US, FLOW)


def test_unknown_register_has_no_consumption() -> None:
    """Either register unknown: None."""
    assert consumption(None, 5, HOUR_US, MOD, FLOW) is None
    assert consumption(5, None, HOUR_US, MOD, FLOW) is None


def test_span_us_is_exact() -> None:
    """Microseconds between two instants, exactly."""
    a = datetime(2024, 1, 1, tzinfo=UTC)
    assert span_us(a, a + timedelta(days=40, microseconds=7)) == 40 * 86_400_000_000 + 7
