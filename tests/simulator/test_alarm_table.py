"""`sim verify`'s alarm table: incidents from the truth, alarmed / missed / false positive."""

from __future__ import annotations

from simulator import alarm_table, truthfile
from simulator.alarm_table import Incident, Seen
from simulator.districts import add_districts
from simulator.fleet import FleetSpec, Format, Kind
from simulator.truth import build_truth

SPEC = FleetSpec(meters=300, days=10, seed=5)


def test_night_flow_promised_only_for_strong_long_hourly_leaks() -> None:
    """A leak is a promised night_flow incident iff its meter reports hourly, its flow is
    >= 5 L/h + a unit, and it spans 3 whole 02:00-05:00 nights; each leak is also a
    promised `leak` incident (its status bit)."""
    truth = build_truth(SPEC, {"leak": 0.5})
    causes = alarm_table.incidents(truth)
    leaks = truth.faults_of("leak")
    assert len([c for c in causes if c.kind == "leak"]) == len(leaks)
    night = {c.address: c for c in causes if c.kind == "night_flow"}
    promised = 0
    for f in leaks:
        m = truth.meters[f.meter]
        assert m.kind is Kind.WATER
        if m.format not in (Format.INTERVAL, Format.SENML):
            assert m.address not in night
            continue
        # whole nights: day d's 02:00 at or after the start hour, 05:00 at or before the end
        nights = [d for d in range(SPEC.days + 1)
                  if d * 24 + 2 >= f.start_h and d * 24 + 5 <= f.end_h]  # fmt: skip
        want = f.params["flow_ml_h"] >= 5000 + m.unit_ml and len(nights) >= 3
        assert night[m.address].promised is want
        promised += want
    assert promised > 0  # the seed gives the test something to check


def test_table_counts_and_fails() -> None:
    """Two promised incidents, one alarmed 30 h after it began; an alarm without a cause
    is a false positive; an alarm on an unpromised cause is neither."""
    causes = [
        Incident("a", "night_flow", 0),
        Incident("b", "night_flow", 3600),
        Incident("c", "night_flow", 0, promised=False),
    ]
    seen = [
        Seen("a", "night_flow", 30 * 3600),
        Seen("a", "night_flow", 40 * 3600),  # reopened later: the first counts
        Seen("c", "night_flow", 50 * 3600),
        Seen("d", "night_flow", 10),
    ]
    rows, failures = alarm_table.table(causes, seen)
    assert rows == [alarm_table.Row("night_flow", 2, 1, 30 * 3600, 1)]
    assert failures == ["night_flow not alarmed on b", "night_flow alarmed on d without cause"]
    assert alarm_table.lines(rows)[1].split() == ["night_flow", "2", "1", "30.0", "h", "1"]


def test_districts_bulk_counts_customers_and_the_pipe_leak(tmp_path) -> None:
    """A bulk meter's true register is its customers' true use plus the pipe leak, in
    whole litres; customers are clean hourly water meters; truth.json keeps districts;
    a lossy district is a promised district_loss incident, a sound one no cause at all."""
    truth = add_districts(build_truth(SPEC, {"leak": 0.05, "missed_days": 0.05}), 4, 0.5)
    assert len(truth.districts) == 4
    assert sum(1 for d in truth.districts if d.loss_ml_h) == 2
    units, hours = truth.units(), SPEC.hours
    faulty = {f.meter for f in truth.faults if f.kind == "missed_days"}
    for d in truth.districts:
        bulk = truth.meters[d.bulk]
        assert (bulk.format, bulk.kind, bulk.index) == (Format.INTERVAL, Kind.WATER, d.bulk)
        for c in d.customers:
            m = truth.meters[c]
            assert m.format in (Format.INTERVAL, Format.SENML)
            assert c not in faulty
        used = sum((units[c, -1] - units[c, 0]) * truth.meters[c].unit_ml for c in d.customers)
        lost = d.loss_ml_h * (hours - d.loss_start_h)
        assert units[d.bulk, -1] - units[d.bulk, 0] == (used + lost) // 1000
    causes = {(c.address, c.kind): c for c in alarm_table.incidents(truth)}
    for d in truth.districts:
        key = (truth.meters[d.bulk].address, "district_loss")
        assert (key in causes) is bool(d.loss_ml_h)
        if d.loss_ml_h:  # 40 % of the customers' use: 29 % of the bulk, >= 2 days
            assert causes[key].promised is (SPEC.days - d.loss_start_h / 24 >= 3)
    truthfile.save(tmp_path, truth, [])
    again, _, _ = truthfile.load(tmp_path)
    assert again.districts == truth.districts
    assert (again.units()[-1] == units[-1]).all()
