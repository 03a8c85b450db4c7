"""A meter keeps what was not acknowledged and sends it again on its next wake-up."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator

import pytest

from simulator import backlog
from simulator.backlog import LOG_REPORTS, DeviceLog, keeps, plan_wake_up
from simulator.faults import Outcome
from simulator.fleet import BATCH_CAPACITY, FleetSpec, Format, Transport
from simulator.network import NetworkModel
from simulator.schedule import CATCH_UP_GAP_S, Uplink, build_schedule
from simulator.truth import build_truth

TRUTH = build_truth(
    FleetSpec(meters=120, days=6, seed=11), {"clock_reset": 0.2, "corrupt": 0.2, "identity": 0.1}
)
UPLINKS = build_schedule(TRUTH)


def _seqs() -> Iterator[int]:
    return itertools.count(len(UPLINKS))


def _reports(fmt: Format) -> tuple[Uplink, Uplink, Uplink]:
    """Three consecutive clean daily reports of one meter of `fmt`."""
    for m in TRUTH.meters:
        if m.format is not fmt:
            continue
        mine = [u for u in UPLINKS if u.meter == m.index and u.fault == "" and u.claimed == m.index]
        for a, b, c in zip(mine, mine[1:], mine[2:], strict=False):
            if a.day + 1 == b.day and b.day + 1 == c.day:
                return a, b, c
    raise AssertionError(f"no three clean consecutive reports of {fmt}")


@pytest.mark.parametrize(
    ("transport", "result", "kept"),
    [
        (Transport.COAP_CON, "timeout", True),
        (Transport.COAP_CON, "busy: overloaded", True),
        (Transport.COAP_CON, "server_error: 5.00 store_failed", True),
        (Transport.COAP_NON, "lost", True),
        (Transport.MQTT_QOS1, "unreachable: OSError: connection refused", True),
        (Transport.MQTT_QOS1, "timeout: TimeoutError", True),
        (Transport.COAP_CON, "acked", False),
        (Transport.COAP_CON, "undecodable", False),
        (Transport.COAP_CON, "identity_mismatch", False),
        (Transport.MQTT_QOS1, "mqtt_refused: connect refused (5)", False),
        (Transport.MQTT_QOS0, "lost", False),
        (Transport.MQTT_QOS0, "unreachable: OSError", True),
    ],
)
def test_what_a_meter_keeps(transport: Transport, result: str, kept: bool) -> None:
    """No answer, 5.03, 5.00 and an unreachable broker are kept; an ack or refusal is not."""
    assert keeps(transport, result) is kept


def test_log_holds_a_bounded_number_of_reports() -> None:
    """A full log drops its oldest report; take() empties it."""
    log = DeviceLog()
    ups = [u for u in UPLINKS if u.meter == 0][: LOG_REPORTS + 2]
    for u in ups:
        log.keep(u)
    assert log.pending == ups[2:]
    assert log.dropped == ups[:2]
    assert log.take() == ups[2:]
    assert log.pending == []


def test_a_pack_format_carries_yesterdays_report_in_todays_frame() -> None:
    """SenML holds 48 h: the next report is widened back over the pending day, one frame."""
    first, second, _ = _reports(Format.SENML)
    plan = plan_wake_up(TRUTH, [first], second, _seqs())
    assert len(plan) == 1
    (report,) = plan
    assert report.seq == second.seq
    assert (report.first_h, report.last_h) == (first.first_h, second.last_h)
    assert report.last_h - report.first_h + 1 <= BATCH_CAPACITY[Format.SENML]
    assert report.resend_of == first.seq


def test_what_the_frame_cannot_hold_goes_first_in_frames_of_its_own() -> None:
    """CJ/T 188 holds one register: each pending report is resent alone, oldest first."""
    first, second, third = _reports(Format.CJT188)
    seqs = _seqs()
    plan = plan_wake_up(TRUTH, [first, second], third, seqs)
    assert plan[-1] == third
    a, b = plan[:2]
    assert (a.seq, b.seq) == (len(UPLINKS), len(UPLINKS) + 1)
    assert (a.resend_of, b.resend_of) == (first.seq, second.seq)
    for sent, orig in ((a, first), (b, second)):
        assert (sent.first_h, sent.last_h, sent.clock_offset_s) == (
            orig.first_h,
            orig.last_h,
            orig.clock_offset_s,
        )
        assert sent.outcome is Outcome.STORED
    assert a.send_s == third.send_s - 2 * CATCH_UP_GAP_S < b.send_s < third.send_s


def test_a_resend_of_a_resend_names_the_first_report() -> None:
    """However often a report is resent, `resend_of` names the report first scheduled."""
    first, second, third = _reports(Format.OMS)
    (again, _) = plan_wake_up(TRUTH, [first], second, _seqs())
    (twice, _) = plan_wake_up(TRUTH, [again], third, _seqs())
    assert twice.resend_of == first.seq


def test_a_corrupt_report_is_resent_clean_and_a_quarantined_one_stays_quarantined() -> None:
    """The damage on the way does not repeat; a reset clock or a wrong address does."""
    corrupt = next(u for u in UPLINKS if u.fault == "corrupt")
    reset = next(u for u in UPLINKS if u.fault == "clock_reset")
    identity = next(u for u in UPLINKS if u.fault == "identity")
    for bad in (corrupt, reset, identity):
        (again,) = plan_wake_up(TRUTH, [bad], None, _seqs(), send_s=bad.send_s + 86_400)
        if bad is corrupt:
            assert not again.corrupt
            assert (again.outcome, again.fault) == (Outcome.STORED, "")
        else:
            assert (again.outcome, again.expect, again.fault) == (
                bad.outcome,
                bad.expect,
                bad.fault,
            )
            assert again.claimed == bad.claimed
            assert again.clock_offset_s == bad.clock_offset_s


def test_a_corrupt_current_report_carries_no_backlog() -> None:
    """A report the collector will quarantine is not widened: the backlog goes alone."""
    corrupt, prev = next(
        (u, p)
        for u in UPLINKS
        if u.fault == "corrupt" and TRUTH.meters[u.meter].format is Format.SENML
        for p in UPLINKS
        if p.meter == u.meter and p.day == u.day - 1 and p.fault == ""
    )
    plan = plan_wake_up(TRUTH, [prev], corrupt, _seqs())
    assert [u.seq for u in plan] == [len(UPLINKS), corrupt.seq]
    assert plan[-1] == corrupt


def test_the_last_wake_up_sends_the_log_alone() -> None:
    """Without a current report the wake-up sends only the log, from `send_s` on."""
    first, second, _ = _reports(Format.INTERVAL)
    plan = plan_wake_up(TRUTH, [first, second], None, _seqs(), send_s=10**9)
    assert [u.send_s for u in plan] == [10**9, 10**9 + CATCH_UP_GAP_S]
    assert [u.resend_of for u in plan] == [first.seq, second.seq]
    with pytest.raises(ValueError, match="send_s"):
        plan_wake_up(TRUTH, [first], None, _seqs())


def test_a_resend_meets_the_emulated_network_reproducibly() -> None:
    """Resends of a lossy run draw their fate from the seed: some are lost, the same ones."""
    lossy = NetworkModel(loss=0.5)
    non = [
        u for u in UPLINKS if TRUTH.meters[u.meter].transport is Transport.COAP_NON and not u.fault
    ]
    once = [backlog.resend(TRUTH, u, 0, u.send_s + 86_400, lossy) for u in non]
    again = [backlog.resend(TRUTH, u, 0, u.send_s + 86_400, lossy) for u in non]
    assert once == again
    lost = [u.outcome is Outcome.LOST for u in once]
    assert any(lost)
    assert not all(lost)


@pytest.mark.parametrize("fmt", list(Format))
def test_every_format_resends_what_it_carried(fmt: Format) -> None:
    """The wake-up's frames carry every pending reading and the current report unchanged."""
    first, second, third = _reports(fmt)
    plan = plan_wake_up(TRUTH, [first, second], third, _seqs())
    carried = set().union(*(set(u.hours) for u in plan))
    assert set(first.hours) | set(second.hours) | set(third.hours) <= carried
    assert dataclasses.replace(plan[-1], first_h=third.first_h, resend_of=-1) == third


def test_a_report_lost_on_the_way_is_resent_with_what_it_carried() -> None:
    """A lost report's resend is stored (a plain report) or quarantined (a reset clock, a
    wrong address): the loss was the network's, not the frame's."""
    lossy = build_schedule(TRUTH, NetworkModel(loss=0.4))
    lost = [u for u in lossy if u.outcome is Outcome.LOST]
    assert {u.fault for u in lost} >= {"", "clock_reset"}
    for u in lost:
        again = backlog.resend(TRUTH, u, len(lossy), u.send_s + 86_400)
        if u.fault in ("clock_reset", "identity"):
            assert (again.outcome, again.fault) == (Outcome.QUARANTINED, u.fault)
        else:
            assert (again.outcome, again.expect, again.fault) == (Outcome.STORED, "", "")
