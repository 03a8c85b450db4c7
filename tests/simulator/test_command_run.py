"""`sim run`'s command side without the network: the plan, the executor behind a 2.04's
payload, and the ground truth changed from the hour a command executed (a closed valve
freezes the register and flags the readings; an open valve restores consumption; a clock
set removes the drift so far). Without commands the truth is untouched."""

from __future__ import annotations

import dataclasses

from decoder.columns import Flag
from decoder.commands import Pending, downlink
from simulator import frames
from simulator.command_run import CommandDriver, Planned, lifecycle, plan
from simulator.fleet import FleetSpec
from simulator.network import NetworkModel
from simulator.schedule import build_schedule
from simulator.truth import build_truth


def _truth():  # type: ignore[no-untyped-def]
    return build_truth(FleetSpec(meters=60, days=12, seed=3), {"clock_drift": 0.2})


async def _never(*_a: object) -> int:
    raise AssertionError("not queued in this test")


def _envelope(p: Planned, truth, cid: int) -> bytes:  # type: ignore[no-untyped-def]
    m = truth.meters[p.meter]
    return downlink([Pending(cid, p.kind, p.args, str(m.format), str(m.kind), m.address)], 0)


def test_no_commands_plans_nothing_and_leaves_the_truth() -> None:
    """`--commands 0`: no plan, so the run is the one it always was."""
    truth = _truth()
    assert plan(truth, {m.address for m in truth.meters}, 0) == []


def test_valve_close_then_open_changes_the_truth_from_the_hour_executed() -> None:
    """The close freezes the register from its hour and flags the next readings; the
    open restores the consumption steps; a repeated envelope executes nothing again."""
    truth = _truth()
    planned = plan(truth, {m.address for m in truth.meters}, 1)
    valve = [p for p in planned if p.kind == "valve"]
    assert [p.args["action"] for p in valve] == ["close", "open"]
    base = truth.steps.copy()
    driver = CommandDriver(truth, planned, _never, registers=truth.register_ml())
    close, reopen = valve
    close.command_id, reopen.command_id = 11, 12
    m, start = close.meter, truth.fleet.spec.start_s
    ups = [u for u in build_schedule(truth, NetworkModel()) if u.meter == m]
    first = next(u for u in ups if u.send_s > close.at_s)
    assert driver.answer(first, _envelope(close, truth, 11)) is not None
    assert driver.answer(first, _envelope(close, truth, 11)) is not None  # from memory
    h1 = (first.send_s - start) // 3600
    later = next(u for u in ups if u.send_s > reopen.at_s)
    driver.answer(later, _envelope(reopen, truth, 12))
    h2 = (later.send_s - start) // 3600
    assert (close.executed_h, close.executions) == (h1, 1)
    assert (reopen.executed_h, reopen.executions) == (h2, 1)
    assert base[m, h1:h2].any()
    assert not truth.steps[m, h1:h2].any()
    assert (truth.steps[m, h2:] == base[m, h2:]).all()
    assert all(truth.flags[m, h1 + 1 : h2 + 1] & Flag.VALVE_CLOSED)
    assert not any(truth.flags[m, h2 + 1 :] & Flag.VALVE_CLOSED)
    assert driver.registers is not None
    assert (driver.registers[m] == truth.register_ml()[m]).all()
    others = [i for i in range(len(truth.meters)) if i != m]
    assert (truth.steps[others] == base[others]).all()


def test_clock_set_removes_the_drift_so_far() -> None:
    """After a clock set a drifting meter's later uplinks carry only the drift since."""
    truth = _truth()
    planned = plan(truth, {m.address for m in truth.meters}, 1)
    clock = next(p for p in planned if p.kind == "clock")
    clock.command_id = 21
    driver = CommandDriver(truth, planned, _never)
    ups = [u for u in build_schedule(truth, NetworkModel()) if u.meter == clock.meter]
    at = next(i for i, u in enumerate(ups) if u.send_s > clock.at_s and u.clock_offset_s)
    driver.answer(ups[at], _envelope(clock, truth, 21))
    nxt = ups[at + 1]
    assert driver.adjust(nxt).clock_offset_s == nxt.clock_offset_s - ups[at].clock_offset_s
    resend = dataclasses.replace(nxt, resend_of=1)
    assert driver.adjust(resend) is resend


def test_lifecycle_table_checks_each_command() -> None:
    """Acknowledged once is fine; twice executed, a mute meter's acknowledgement or an
    executed but unanswered command of an answering meter is a problem."""
    ok = Planned(1, "a1", 0, "valve", {"action": "close"}, "k1", command_id=5, executions=1)
    mute = Planned(2, "a2", 0, "reporting", {"interval_s": 7200}, "k2", mute=True,
                   command_id=6, executions=1)  # fmt: skip
    states = {5: {"state": "acknowledged"}, 6: {"state": "sent"}}
    good = lifecycle([ok, mute], states)
    assert good.ok, good.problems
    assert any("never-answering meters 1" in x for x in good.lines)
    twice = dataclasses.replace(ok, executions=2)
    assert not lifecycle([twice], states).ok
    assert not lifecycle([ok], {5: {"state": "sent"}}).ok
    expired = {6: {"state": "expired", "reason": "ttl_passed_unanswered"}}
    assert lifecycle([mute], expired).ok


def _rollovers():  # type: ignore[no-untyped-def]
    truth = _truth()
    everyone = {m.address for m in truth.meters}
    return truth, plan(truth, everyone, 2, everyone)


def test_plan_takes_mqtt_meters_in_turn_and_rolls_keys() -> None:
    """With broker accounts, valves alternate between OSCORE CoAP and MQTT QoS 1 meters,
    and one OMS meter gets an AES rollover and one other CoAP meter an OSCORE one."""
    truth, planned = _rollovers()
    valve = [p for p in planned if p.kind == "valve" and p.args["action"] == "close"]
    assert sorted(p.via for p in valve) == ["coap", "mqtt"]
    assert {str(truth.meters[p.meter].transport) for p in valve} == {"coap-con", "mqtt-qos1"}
    keys = {p.args["key"]: truth.meters[p.meter] for p in planned if p.kind == "rotate_key"}
    assert set(keys) == {"aes", "oscore"}
    assert str(keys["aes"].format) == "oms"
    assert str(keys["oscore"].format) != "oms"
    assert {str(m.transport) for m in keys.values()} == {"coap-con"}
    only_coap = plan(truth, {m.address for m in truth.meters}, 2)
    assert {p.via for p in only_coap} == {"coap"}


def test_rotate_key_switches_the_meters_keys_from_then_on() -> None:
    """After an executed rotate_key the OMS meter's later frames are sealed with the new
    AES key, and the OSCORE meter's new context is kept for its later requests."""
    truth, planned = _rollovers()
    driver = CommandDriver(truth, planned, _never, registers=truth.register_ml())
    aes, ctx = (next(p for p in planned if p.args.get("key") == k) for k in ("aes", "oscore"))
    aes.command_id, ctx.command_id = 31, 32
    new_key = bytes(range(16))
    oscore = {
        "sender_id": "0a", "recipient_id": "00", "master_secret": "11" * 16,
        "master_salt": "22" * 8, "algorithm": "AES-CCM-16-64-128", "kdf": "HKDF-SHA256",
    }  # fmt: skip
    for p, extra in ((aes, {"aes_key": new_key.hex()}), (ctx, {"oscore": oscore})):
        up = next(u for u in build_schedule(truth, NetworkModel())
                  if u.meter == p.meter and u.send_s > p.at_s)  # fmt: skip
        m = truth.meters[p.meter]
        envelope = downlink([Pending(
            p.command_id, p.kind, {**p.args, **extra}, str(m.format), str(m.kind), m.address
        )], 0)  # fmt: skip
        assert driver.answer(up, envelope) is not None
        assert p.executions == 1
    assert driver.oms_keys == {aes.meter: new_key}
    assert driver.oscore == {ctx.meter: oscore}
    later = next(u for u in build_schedule(truth, NetworkModel())
                 if u.meter == aes.meter and u.send_s > aes.at_s + 86_400)  # fmt: skip
    regs = truth.register_ml()
    assert frames.encode(truth, later, regs, driver.oms_keys) != frames.encode(truth, later, regs)


def test_reporting_change_is_recorded_not_rescheduled() -> None:
    """An executed reporting change records the meter's interval and the hour it took
    effect from; the truth's readings stay as they were (the cadence is not changed)."""
    truth, planned = _rollovers()
    steps = truth.steps.copy()
    driver = CommandDriver(truth, planned, _never)
    p = next(p for p in planned if p.kind == "reporting" and not p.mute)
    p.command_id = 41
    up = next(u for u in build_schedule(truth, NetworkModel())
              if u.meter == p.meter and u.send_s > p.at_s)  # fmt: skip
    assert not driver.awaits(dataclasses.replace(up, send_s=p.at_s - 1))
    assert driver.awaits(up)
    driver.answer(up, _envelope(p, truth, 41))
    assert not driver.awaits(up)
    hour = (up.send_s - truth.fleet.spec.start_s) // 3600
    assert p.reporting == {"interval_s": p.args["interval_s"], "from_h": hour}
    assert (truth.steps == steps).all()
    assert lifecycle([p], {41: {"state": "acknowledged"}}).ok
    wrong = dataclasses.replace(p, reporting={"interval_s": 3600, "from_h": hour})
    assert not lifecycle([wrong], {41: {"state": "acknowledged"}}).ok
