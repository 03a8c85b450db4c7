"""Fault catalogue, `--faults` parsing and exact fault rates."""

from __future__ import annotations

import pytest

from simulator.faults import (
    BY_NAME,
    CATALOGUE,
    FaultSpecError,
    Outcome,
    Scope,
    format_faults,
    parse_faults,
)
from simulator.fleet import FleetSpec, Kind
from simulator.schedule import build_schedule
from simulator.truth import build_truth

SPEC = FleetSpec(meters=1000, days=20, seed=11)


def test_parse_all_gives_every_default() -> None:
    """`all` switches on every catalogue fault at its default rate."""
    assert parse_faults("all") == {k.name: k.default_rate for k in CATALOGUE}


def test_parse_rates_and_overrides() -> None:
    """Explicit rates win over `all`; a bare name takes its default; dashes are accepted."""
    rates = parse_faults("all,leak=0.1,reverse-flow")
    assert rates["leak"] == 0.1
    assert rates["reverse_flow"] == BY_NAME["reverse_flow"].default_rate
    assert parse_faults("") == parse_faults(None) == parse_faults("none") == {}


@pytest.mark.parametrize("text", ["nosuch=0.1", "leak=2", "leak=-0.1", "leak=lots"])
def test_parse_rejects_bad_items(text: str) -> None:
    """Unknown names, rates outside [0, 1] and non-numbers are refused."""
    with pytest.raises(FaultSpecError):
        parse_faults(text)


def test_format_roundtrip() -> None:
    """`format_faults` is the inverse of `parse_faults`."""
    rates = parse_faults("leak=0.25,corrupt=0.01")
    assert parse_faults(format_faults(rates)) == rates


def test_meter_fault_rates_are_exact() -> None:
    """Each meter fault hits exactly round(rate * eligible) meters, all eligible."""
    rates = {k.name: 0.04 for k in CATALOGUE if k.scope is Scope.METER}
    truth = build_truth(SPEC, rates)
    base = truth.meters[: SPEC.meters]
    for kind in CATALOGUE:
        if kind.scope is not Scope.METER:
            continue
        hit = truth.faults_of(kind.name)
        eligible = [m for m in base if kind.eligible(m)]
        if kind.name == "exchange":  # drawn among meters free of other faults
            others = {f.meter for f in truth.faults if f.kind != "exchange"}
            eligible = [m for m in eligible if m.index not in others]
        assert len(hit) == max(1, round(0.04 * len(eligible))), kind.name
        assert all(kind.eligible(truth.meters[f.meter]) for f in hit)
        assert len({f.meter for f in hit}) == len(hit)


def test_uplink_fault_rates_are_exact() -> None:
    """Uplink faults hit round(rate * eligible) uplinks: retransmissions give 2 copies."""
    truth = build_truth(SPEC, {"coap_retransmit": 0.05, "corrupt": 0.01})
    ups = build_schedule(truth)
    retx = [u for u in ups if u.fault == "coap_retransmit"]
    con = [u for u in ups if truth.meters[u.meter].transport.value == "coap-con"]
    assert len(retx) == round(0.05 * len(con))
    assert all(u.copies == 2 for u in retx)
    corrupt = [u for u in ups if u.corrupt]
    assert len(corrupt) == round(0.01 * (len(ups) - len(retx)))
    assert all(u.outcome is Outcome.QUARANTINED and u.expect == "undecodable" for u in corrupt)


def test_valve_closed_only_on_gas_and_stops_flow() -> None:
    """A closed prepaid valve is a gas meter whose register stands still from then on."""
    truth = build_truth(SPEC, {"valve_closed": 0.1})
    units = truth.units()
    assert truth.faults_of("valve_closed")
    for f in truth.faults_of("valve_closed"):
        assert truth.meters[f.meter].kind is Kind.GAS
        assert units[f.meter, f.start_h] == units[f.meter, -1]


def test_leak_raises_night_flow_and_flags() -> None:
    """A leaking meter never has a zero-flow hour after the leak starts, and is flagged."""
    truth = build_truth(SPEC, {"leak": 0.1})
    for f in truth.faults_of("leak"):
        m = truth.meters[f.meter]
        night = [h for h in range(f.start_h + 1, truth.fleet.spec.hours) if h % 24 == 3]
        per_day = truth.units()[f.meter, night[-1]] - truth.units()[f.meter, night[0]]
        assert per_day * m.unit_ml >= f.params["flow_ml_h"] * 24 * (len(night) - 1) - m.unit_ml
        assert truth.flags[f.meter, f.start_h] != 0


def test_every_fault_has_an_expected_handling() -> None:
    """Every catalogue row names an outcome and what verify must find."""
    for kind in CATALOGUE:
        assert isinstance(kind.outcome, Outcome)
        assert kind.expect
        assert kind.doc
