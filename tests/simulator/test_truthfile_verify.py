"""Ground-truth files round-trip; `verify.check` passes true reads and catches wrong ones."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from simulator import truthfile
from simulator.backend import m3_text, ml_of
from simulator.faults import parse_faults
from simulator.fleet import FleetSpec
from simulator.schedule import build_schedule, expected_readings
from simulator.truth import build_truth
from simulator.verify import check

SPEC = FleetSpec(meters=60, days=12, seed=4)


def _rows(truth: Any, ups: Any, every_h: int = 240) -> list[dict[str, Any]]:
    """Cycle rows as the API would give them if it stored exactly the truth."""
    reg, held = truth.register_ml(), expected_readings(truth, ups)
    rows = []
    for m in truth.meters:
        for h0 in range(0, SPEC.hours - every_h + 1, every_h):
            sides = {}
            for side, h in (("opening", h0), ("closing", h0 + every_h)):
                at = datetime.fromtimestamp(SPEC.start_s + h * 3600, UTC).isoformat()
                inside = m.installed_h <= h <= m.removed_h
                method = "actual" if inside and held[m.index, h] else "interpolated"
                value = m3_text(int(reg[m.index, h]), m.register.scale)
                sides[side] = {"at": at, "method": method, "register_m3": value}
            rows.append({"address": m.address, **sides})
    return rows


def test_truthfile_roundtrip(tmp_path: Path) -> None:
    """Saved truth and schedule load back equal."""
    truth = build_truth(SPEC, parse_faults("all"))
    ups = build_schedule(truth)
    truthfile.save(tmp_path, truth, ups, {"tenant": "t"})
    t2, u2, extra = truthfile.load(tmp_path)
    assert t2.meters == truth.meters
    assert t2.faults == truth.faults
    assert np.array_equal(t2.steps, truth.steps)
    assert u2 == ups
    assert extra == {"tenant": "t"}


def test_m3_text_is_exact() -> None:
    """Register text keeps every digit of the scale and converts back exactly."""
    assert m3_text(1_234_560_000, -2) == "1234.56"
    assert m3_text(5_000, -3) == "0.005"
    assert ml_of("999999.99") == 999_999_990_000


def test_check_passes_the_truth() -> None:
    """Rows that equal the truth verify OK, with every fault accounted for."""
    truth = build_truth(SPEC, parse_faults("rollover=0.1,exchange=0.05,overlap=0.1"))
    ups = build_schedule(truth)
    report = check(truth, ups, _rows(truth, ups), {}, {})
    assert report.ok, report.table()


def test_check_catches_a_wrong_actual_read() -> None:
    """One litre off on an actual read fails verification and names the meter."""
    truth = build_truth(SPEC)
    ups = build_schedule(truth)
    rows = _rows(truth, ups)
    row = next(r for r in rows if r["closing"]["method"] == "actual")
    row["closing"]["register_m3"] = str(ml_of(row["closing"]["register_m3"]) / 1e6 + 0.01)
    report = check(truth, ups, rows, {}, {})
    assert not report.ok
    assert report.mismatches[0].meter == row["address"]


def test_check_wants_an_alarm_for_a_flagged_fault() -> None:
    """A stored leak without a leak alarm is an unaccounted fault."""
    truth = build_truth(SPEC, {"leak": 0.2})
    ups = build_schedule(truth)
    rows = _rows(truth, ups)
    assert not check(truth, ups, rows, {}, {}).ok
    alarms = {truth.meters[f.meter].address: {"leak"} for f in truth.faults}
    assert check(truth, ups, rows, alarms, {}).ok


def test_check_wants_quarantine_of_corrupt_coap_uplinks() -> None:
    """A corrupt CoAP uplink acknowledged as stored is a mismatch."""
    truth = build_truth(SPEC, {"corrupt": 0.05})
    ups = build_schedule(truth)
    rows = _rows(truth, ups)
    bad = [u for u in ups if u.corrupt and truth.meters[u.meter].transport.is_coap]
    assert bad
    assert check(truth, ups, rows, {}, {u.seq: "undecodable" for u in bad}).ok
    assert not check(truth, ups, rows, {}, {bad[0].seq: "acked"}).ok
