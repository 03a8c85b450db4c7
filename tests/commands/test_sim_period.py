"""`nbmeter sim run`'s default period: no meter sends from a time that has not come yet.

Every uplink is sent at the real now and the backend judges a meter clock by its own, so
a reading stamped after its receipt is clock_future and billing leaves it out. The period
used to end at today's midnight: run in the hours after it, the last day's reports (due
1-5 h after midnight) were sent before they were due, and a meter whose clock ran 20 min
fast had its closing read (stamped 00:20) refused and estimated by billing, failing
`sim verify`. Pure: the period is computed for a given now, at any time of day.
"""

from __future__ import annotations

import argparse
from datetime import datetime

import pytest

from nbmeter.commands import sim
from simulator.backlog import flush_s
from simulator.faults import Outcome, parse_faults
from simulator.schedule import CATCH_UP_GAP_S, build_schedule
from simulator.truth import build_truth

DAY_S = 86_400
# fast and slow clocks, catch-up bursts, late uplinks: what reaches past the period's end
FAULTS = "clock_drift=0.5,missed_days=0.2,out_of_order=0.1"


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sim.add_arguments(parser)
    return parser.parse_args(["run", "--meters", "60", "--days", "6", "--seed", "6", *argv])


def _now(clock: str) -> int:
    return int(datetime.fromisoformat(f"2026-12-07T{clock}+00:00").timestamp())


@pytest.mark.parametrize("clock", ["00:00:00", "00:05:00", "00:10:00", "04:59:59", "05:01:00",
                                   "12:00:00", "23:59:59"])  # fmt: skip
def test_default_period_is_over_at_any_time_of_day(clock: str) -> None:
    """Whenever the run starts, every scheduled uplink and the last wake-up (with its
    resends) are due by now, and no stored reading's meter-clock stamp is after now."""
    now_s = _now(clock)
    args = _args("--faults", FAULTS)
    spec = sim._spec(args, now_s)
    assert spec.start_s % DAY_S == 0
    truth = build_truth(spec, parse_faults(args.faults))
    drifting = {f.meter for f in truth.faults_of("clock_drift")}
    assert drifting, "the fleet should hold drifting clocks"
    ups = build_schedule(truth)
    late = [u for u in ups if u.send_s > now_s]
    assert late == [], f"{len(late)} uplinks due after now, first {late[0]}"
    # the final wake-up resends a backlog 20 s apart: an hour covers 180 of them
    last_wake = max(flush_s(truth, m.index) for m in truth.meters)
    assert last_wake + 180 * CATCH_UP_GAP_S <= now_s
    stamps = [
        spec.start_s + u.last_h * 3600 + u.clock_offset_s
        for u in ups
        if u.outcome is Outcome.STORED and u.meter in drifting
    ]
    assert max(stamps) <= now_s
    # the latest such period: one a day later would reach past now
    assert spec.start_s + DAY_S + spec.days * DAY_S + sim.SCHEDULE_AFTER_END_S > now_s


def test_start_whose_schedule_reaches_past_now_is_refused() -> None:
    """--start may name any past period; one whose reports are not all due yet is refused
    with the latest day that would do (a ValueError, which `sim run` reports, exit 1)."""
    now_s = _now("00:10:00")
    # the period 11-30..12-06 ended a day ago: its last wake-up (12-07 01:00-05:00) is not due
    with pytest.raises(ValueError, match=r"start on 2026-11-29 or earlier"):
        sim._spec(_args("--start", "2026-11-30"), now_s)
    assert sim._spec(_args("--start", "2026-11-29"), now_s).start_s == _now("00:00:00") - 8 * DAY_S
