"""Ground-truth files round-trip; `verify.check` passes true reads and catches wrong ones."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from simulator import truthfile
from simulator.backend import m3_text, ml_of
from simulator.faults import parse_faults
from simulator.fleet import FleetSpec, Format
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


def _boundary_reports(truth: Any, ups: list[Any]) -> list[Any]:
    """Clean own reports of CJ/T 188 meters that carry a cycle boundary (hour 240)."""
    return [
        u
        for u in ups
        if u.last_h == 240 and u.fault == "" and u.claimed == u.meter
        and truth.meters[u.meter].format is Format.CJT188
    ]  # fmt: skip


def test_check_requires_only_acknowledged_readings() -> None:
    """A boundary reading never acknowledged may be estimated (counted by its last result);
    one a resend got acknowledged must be actual; one acknowledged and lost fails."""
    truth = build_truth(SPEC)
    ups = build_schedule(truth)
    timed_out, resent, lost = _boundary_reports(truth, ups)[:3]
    again = dataclasses.replace(resent, seq=len(ups), resend_of=resent.seq)
    sent = [*ups, again]
    results = {u.seq: "acked" for u in sent}
    results[timed_out.seq] = "timeout"
    results[resent.seq] = "busy: overloaded"
    # the API as it would answer if the collector stored what it acknowledged
    rows = _rows(truth, sent)
    for row in rows:
        if row["address"] == truth.meters[timed_out.meter].address:
            for b in (row["opening"], row["closing"]):
                if b["at"].startswith(_day(240)):
                    b["method"] = "interpolated"
    report = check(truth, sent, rows, {}, results)
    assert report.ok, report.table()
    assert report.unacked == {"timeout": 1}
    assert report.resent_acked == 1
    assert any("never acked" in line and "timeout 1" in line for line in report.table())
    # acknowledged, but the API has no actual read there: the collector lost it
    for row in rows:
        if row["address"] == truth.meters[lost.meter].address:
            for b in (row["opening"], row["closing"]):
                if b["at"].startswith(_day(240)):
                    b["method"] = "interpolated"
    report = check(truth, sent, rows, {}, results)
    assert not report.ok
    assert {m.meter for m in report.mismatches} == {truth.meters[lost.meter].address}


def _day(h: int) -> str:
    return datetime.fromtimestamp(SPEC.start_s + h * 3600, UTC).isoformat()[:13]


def test_truthfile_keeps_resends(tmp_path: Path) -> None:
    """A resend's link to its first report survives the ground-truth files."""
    truth = build_truth(SPEC)
    ups = build_schedule(truth)
    again = dataclasses.replace(ups[5], seq=len(ups), resend_of=ups[5].seq)
    truthfile.save(tmp_path, truth, [*ups, again])
    _, loaded, _ = truthfile.load(tmp_path)
    assert loaded[-1] == again
    assert all(u.resend_of == -1 for u in loaded[:-1])
