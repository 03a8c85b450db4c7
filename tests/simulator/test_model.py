"""Fleet model and ground truth: reproducible, exact integer registers, honest profiles."""

from __future__ import annotations

import numpy as np
import pytest

from simulator import consumption
from simulator.faults import parse_faults
from simulator.fleet import (
    BATCH_CAPACITY,
    DEFAULT_START_S,
    REGISTERS,
    FleetSpec,
    Format,
    Kind,
    build_fleet,
)
from simulator.truth import build_truth

SPEC = FleetSpec(meters=300, days=21, seed=7)
REVERSING = {"reverse_flow", "rollover"}


def test_same_seed_same_fleet_and_registers() -> None:
    """Two builds from one spec give identical meters and registers."""
    a, b = build_truth(SPEC, parse_faults("all")), build_truth(SPEC, parse_faults("all"))
    assert a.meters == b.meters
    assert np.array_equal(a.steps, b.steps)
    assert np.array_equal(a.flags, b.flags)
    assert a.faults == b.faults


def test_other_seed_other_fleet() -> None:
    """A different seed changes the registers."""
    a = build_truth(SPEC)
    b = build_truth(FleetSpec(meters=300, days=21, seed=8))
    assert not np.array_equal(a.steps, b.steps)


def test_consumption_does_not_depend_on_fault_rates() -> None:
    """Switching faults on leaves the fault-free meters' registers untouched."""
    clean = build_truth(SPEC)
    faulty = build_truth(SPEC, parse_faults("all"))
    touched = {f.meter for f in faulty.faults}
    untouched = [i for i in range(SPEC.meters) if i not in touched]
    assert untouched
    assert np.array_equal(clean.steps[untouched], faulty.steps[untouched])


def test_addresses_unique_and_shaped_by_format() -> None:
    """Every address is unique; CJ/T 188 has 14 digits and OMS 8."""
    fleet = build_fleet(FleetSpec(meters=2000, seed=3))
    addresses = [m.address for m in fleet.meters]
    assert len(set(addresses)) == len(addresses)
    for m in fleet.meters:
        if m.format is Format.CJT188:
            assert len(m.address) == 14
            assert m.address.isdigit()
        elif m.format is Format.OMS:
            assert len(m.address) == 8
            assert m.address.isdigit()
            assert m.oms_key is not None
            assert len(m.oms_key) == 16


def test_mix_has_both_kinds_and_gas_never_uses_interval() -> None:
    """Water and gas are mixed near the asked share; gas meters never use the W1 format."""
    fleet = build_fleet(FleetSpec(meters=2000, seed=3, gas_share=0.3))
    gas = [m for m in fleet.meters if m.kind is Kind.GAS]
    assert 0.25 < len(gas) / 2000 < 0.35
    assert all(m.format is not Format.INTERVAL for m in gas)


def test_report_offsets_spread_over_window() -> None:
    """Daily report times are spread over the window, not bunched (peak shifting)."""
    spec = FleetSpec(meters=2000, seed=3)
    offsets = np.array([m.report_offset_s for m in build_fleet(spec).meters])
    lo, hi = spec.report_window_s
    assert offsets.min() >= lo
    assert offsets.max() < hi
    counts, _ = np.histogram(offsets, bins=8, range=(lo, hi))
    assert counts.min() > 0.6 * counts.mean()


def test_registers_move_only_in_smallest_unit() -> None:
    """Every register value is a whole number of its meter's smallest unit."""
    truth = build_truth(SPEC, parse_faults("all"))
    reg = truth.register_ml()
    for m in truth.meters:
        assert np.all(reg[m.index] % m.unit_ml == 0)
    assert REGISTERS[Format.CJT188].unit_ml == 10_000


def test_registers_monotonic_except_reversing_faults() -> None:
    """Displayed registers never fall unless reverse flow, rollover or exchange explains it."""
    truth = build_truth(SPEC, parse_faults("all"))
    reg = truth.register_ml()
    excused = {f.meter for f in truth.faults if f.kind in REVERSING}
    for m in truth.meters:
        span = reg[m.index, m.installed_h : m.removed_h + 1]
        falls = np.flatnonzero(np.diff(span) < 0)
        if m.index not in excused:
            assert falls.size == 0, f"meter {m.index} falls at {falls}"


def test_rollover_wraps_to_small_value() -> None:
    """A rollover meter's displayed register drops from near 10^digits to near zero once."""
    truth = build_truth(SPEC, parse_faults("rollover=0.05"))
    reg = truth.register_ml()
    assert truth.faults_of("rollover")
    for f in truth.faults_of("rollover"):
        m = truth.meters[f.meter]
        drops = np.flatnonzero(np.diff(reg[f.meter]) < 0)
        assert drops.size == 1
        assert reg[f.meter, drops[0]] > (m.register.modulus_units - 2000) * m.unit_ml
        assert truth.units()[f.meter, -1] >= m.register.modulus_units


def test_exchange_appends_successor_on_same_service_point() -> None:
    """An exchange removes the old meter at its hour and installs a new one there."""
    truth = build_truth(SPEC, parse_faults("exchange=0.05"))
    exchanges = truth.faults_of("exchange")
    assert len(truth.meters) == SPEC.meters + len(exchanges)
    for f in exchanges:
        old, new = truth.meters[f.meter], truth.meters[f.params["new_meter"]]
        assert old.removed_h == new.installed_h == f.start_h
        assert old.service_point == new.service_point
        assert old.address != new.address
        assert truth.units()[new.index, new.installed_h] == new.initial_units < 6


def test_water_diurnal_and_gas_seasonal() -> None:
    """Water peaks in the morning over the night; gas uses more in January than in July."""
    fleet = build_fleet(FleetSpec(meters=400, days=14, seed=2, gas_share=0.5))
    flow = consumption.hourly_flow_ml(fleet, np.random.default_rng(0))
    water = np.array([m.kind is Kind.WATER for m in fleet.meters])
    by_hour = flow[water].reshape(water.sum(), -1, 24).mean(axis=(0, 1))
    assert by_hour[7] > 5 * by_hour[3]
    jan = consumption.heating_factor(np.array([DEFAULT_START_S + 14 * 86_400]))
    jul = consumption.heating_factor(np.array([DEFAULT_START_S + 195 * 86_400]))
    assert jan[0] > 0.9 > 0.1 > jul[0]


def test_weekday_of_known_dates() -> None:
    """2025-01-01 is a Wednesday and 2025-01-04 a Saturday."""
    days = consumption.weekday_of(np.array([DEFAULT_START_S, DEFAULT_START_S + 3 * 86_400]))
    assert days.tolist() == [2, 5]


@pytest.mark.parametrize("field", ["meters", "days"])
def test_spec_rejects_empty(field: str) -> None:
    """A fleet of zero meters or zero days is refused."""
    with pytest.raises(ValueError, match=field):
        FleetSpec(**{field: 0})


def test_capacity_table_covers_every_format() -> None:
    """Every format states how many hourly readings one uplink carries."""
    assert set(BATCH_CAPACITY) == set(Format)
