"""The simulated meter's command handling: each command id executed once, repeats answered
from memory, effects on the meter's state, CJ/T 188 meters acting on the write frame, and
the mute fault class that executes but never answers."""

from __future__ import annotations

import json

from decoder.commands import Pending, downlink, parse_results
from simulator.commands import CommandExecutor

ADDRESS = "78330011223344"
NOW_S = 1_796_000_000


def test_cjt188_meter_acts_on_the_frame_once_and_answers_from_memory() -> None:
    """Valve close then clock set: the valve closes, the clock offset is what the transit
    took, the replies parse as this meter's answers; the same envelope again executes
    nothing and gets the same answer bytes."""
    meter = CommandExecutor(ADDRESS, "cjt188")
    meter.state.clock_offset_s = 900  # drifted 15 min
    cmds = [
        Pending(300, "valve", {"action": "close"}, "cjt188", "water", ADDRESS),
        Pending(301, "clock", {}, "cjt188", "water", ADDRESS),
    ]
    envelope = downlink(cmds, NOW_S)
    answer = meter.handle(envelope, NOW_S + 2)
    assert answer is not None
    results = parse_results(answer, ADDRESS)
    assert [(r.command_id, r.ok) for r in results] == [(300, True), (301, True)]
    assert results[0].result["status"] == "0100"  # ST byte0 valve closed
    assert meter.state.valve_closed
    assert meter.state.clock_offset_s == -2
    assert meter.handle(envelope, NOW_S + 60) == answer
    assert dict(meter.executed) == {300: 1, 301: 1}


def test_a_frame_for_another_meter_is_refused_in_the_reply() -> None:
    """A write frame naming another address is not executed: the reply is abnormal (C4)."""
    meter = CommandExecutor(ADDRESS, "cjt188")
    other = Pending(5, "valve", {"action": "close"}, "cjt188", "water", "00000000000001")
    answer = meter.handle(downlink([other], NOW_S), NOW_S)
    assert answer is not None
    frame = bytes.fromhex(json.loads(answer)[0]["frame"])
    assert frame[9] == 0xC4
    assert not meter.state.valve_closed


def test_interval_device_takes_args_and_mute_meter_never_answers() -> None:
    """Reporting interval, valve and clock through args; a mute meter changes state but
    sends no answer (its commands can only expire)."""
    meter = CommandExecutor("m-1", "interval")
    cmds = [
        Pending(
            1, "reporting", {"interval_s": 900, "report_time": "02:30"}, "interval", "water", "m-1"
        ),
        Pending(2, "valve", {"action": "close"}, "interval", "water", "m-1"),
    ]
    answer = meter.handle(downlink(cmds, NOW_S), NOW_S)
    assert answer is not None
    assert [r.ok for r in parse_results(answer, "m-1")] == [True, True]
    assert (meter.state.interval_s, meter.state.report_time) == (900, "02:30")
    mute = CommandExecutor("m-2", "senml", mute=True)
    clock = Pending(3, "clock", {}, "senml", "water", "m-2")
    mute.state.clock_offset_s = -600
    assert mute.handle(downlink([clock], NOW_S), NOW_S) is None
    assert mute.state.clock_offset_s == 0
    assert mute.handle(b"", NOW_S) is None
