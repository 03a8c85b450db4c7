"""The uplink schedule: exactly the uplinks the model and faults call for."""

from __future__ import annotations

import itertools

import numpy as np

from simulator.faults import Outcome, parse_faults
from simulator.fleet import BATCH_CAPACITY, CLOCK_EPOCH_S, FleetSpec, Transport
from simulator.network import MAX_RETRANSMIT, NetworkModel
from simulator.schedule import build_schedule, expected_readings
from simulator.truth import build_truth

SPEC = FleetSpec(meters=200, days=15, seed=5)


def test_clean_fleet_sends_one_uplink_per_meter_day() -> None:
    """Without faults every meter sends exactly one uplink a day, covering all hours."""
    truth = build_truth(SPEC)
    ups = build_schedule(truth)
    assert len(ups) == SPEC.meters * SPEC.days
    assert {(u.meter, u.day) for u in ups} == {
        (i, d) for i in range(SPEC.meters) for d in range(1, SPEC.days + 1)
    }
    held = expected_readings(truth, ups)
    for m in truth.meters:
        if BATCH_CAPACITY[m.format] >= 24:
            assert held[m.index].all()
        else:  # one midnight freeze a day
            assert held[m.index].sum() == SPEC.days + 1


def test_schedule_is_ordered_and_numbered() -> None:
    """Uplinks are in virtual send order and `seq` counts them."""
    ups = build_schedule(build_truth(SPEC, parse_faults("all")))
    assert [u.seq for u in ups] == list(range(len(ups)))
    assert all(a.send_s <= b.send_s for a, b in itertools.pairwise(ups))


def test_send_time_is_after_the_hours_it_carries() -> None:
    """No uplink carries an hour that has not happened yet (except clock faults)."""
    truth = build_truth(SPEC, parse_faults("all"))
    for u in build_schedule(truth):
        assert truth.fleet.spec.start_s + u.last_h * 3600 < u.send_s


def test_schedule_is_reproducible() -> None:
    """The same truth and network model give the same schedule."""
    truth = build_truth(SPEC, parse_faults("all"))
    net = NetworkModel(loss=0.2, latency_ms=50, jitter_ms=20)
    assert build_schedule(truth, net) == build_schedule(truth, net)


def test_missed_days_catch_up_the_backlog_only() -> None:
    """After a coverage gap the meter sends at most its backlog, all at the return time."""
    truth = build_truth(SPEC, {"missed_days": 0.2})
    ups = build_schedule(truth)
    for f in truth.faults_of("missed_days"):
        missed = range(f.day + 1, f.day + f.params["days"] + 1)
        sent = sorted(u.day for u in ups if u.meter == f.meter and u.day in missed)
        back = _return_day = f.day + f.params["days"] + 1
        if _return_day > SPEC.days:
            assert sent == []
            continue
        assert sent == [d for d in missed if d >= back - f.params["backlog_days"]]
        ret = next(u for u in ups if u.meter == f.meter and u.day == back)
        late = [u for u in ups if u.meter == f.meter and u.day in missed]
        assert all(ret.send_s - 100 < u.send_s < ret.send_s for u in late)


def test_identity_misuse_is_an_extra_quarantined_uplink() -> None:
    """A device using another meter's address sends one extra frame, to be quarantined."""
    truth = build_truth(SPEC, {"identity": 0.05})
    ups = build_schedule(truth)
    odd = [u for u in ups if u.claimed != u.meter]
    assert len(odd) == len(truth.faults_of("identity")) > 0
    assert all(u.outcome is Outcome.QUARANTINED and u.expect == "identity_mismatch" for u in odd)
    assert len(ups) == SPEC.meters * SPEC.days + len(odd)


def test_clock_reset_uplinks_are_quarantined_with_absurd_clock() -> None:
    """Uplinks sent while the clock is reset carry the format's clock epoch or a far future."""
    truth = build_truth(SPEC, {"clock_reset": 0.1})
    bad = [u for u in build_schedule(truth) if u.fault == "clock_reset"]
    assert bad
    for u in bad:
        device_now = u.send_s + u.clock_offset_s
        epoch = CLOCK_EPOCH_S[truth.meters[u.meter].format]
        assert epoch <= device_now < epoch + 365 * 86_400 or (
            device_now > u.send_s + 20 * 365 * 86_400
        )
        assert u.outcome is Outcome.QUARANTINED


def test_out_of_order_arrives_after_next_day() -> None:
    """An out-of-order uplink is sent after the same meter's next-day uplink."""
    truth = build_truth(SPEC, {"out_of_order": 0.05})
    ups = build_schedule(truth)
    late = [u for u in ups if u.fault == "out_of_order"]
    assert late
    for u in late:
        nxt = next(v for v in ups if v.meter == u.meter and v.day == u.day + 1)
        assert nxt.seq < u.seq


def test_overlap_repeats_earlier_hours() -> None:
    """An overlapping batch starts before the previous batch ended."""
    truth = build_truth(SPEC, {"overlap": 0.1})
    ups = build_schedule(truth)
    over = [u for u in ups if u.fault == "overlap"]
    assert over
    for u in over:
        prev = next(v for v in ups if v.meter == u.meter and v.day == u.day - 1)
        assert u.first_h <= prev.last_h


def test_network_loss_follows_transport_rules() -> None:
    """Loss drops NON/QoS 0 uplinks; CON is lost only after MAX_RETRANSMIT retries; QoS 1 never."""
    truth = build_truth(FleetSpec(meters=400, days=10, seed=5))
    ups = build_schedule(truth, NetworkModel(loss=0.3))
    by_t: dict[Transport, list[int]] = {t: [] for t in Transport}
    for u in ups:
        by_t[truth.meters[u.meter].transport].append(u.outcome is Outcome.LOST)
    assert not any(by_t[Transport.MQTT_QOS1])
    assert 0.2 < np.mean(by_t[Transport.COAP_NON]) < 0.4
    assert 0.2 < np.mean(by_t[Transport.MQTT_QOS0]) < 0.4
    assert np.mean(by_t[Transport.COAP_CON]) < 0.02
    for u in ups:
        if u.outcome is Outcome.LOST and truth.meters[u.meter].transport is Transport.COAP_CON:
            assert u.lost_transmissions == MAX_RETRANSMIT + 1
