"""`sim verify`: compare the backend's billing-cycle reads with the ground truth.

`check(truth, uplinks, rows, alarms, results)` is pure: it takes the API's cycle rows
(NDJSON export objects), the alarm kinds seen per meter address, and the transport result
of each uplink (`sim run`'s results.json), and returns a `Report`. Rules, per boundary:

- installation, removal: the register must equal the true register exactly;
- actual: the register must equal exactly the true register of the hour the reading the
  API names (`read_at`) was taken in, and that reading must be within the API's actual
  window of the boundary (see `ACTUAL_WINDOW_S`);
- interpolated: within max(2 units, the true use over the 24 h either side);
- estimated: within max(5 units, twice the true use over the 72 h either side);
- missing: only acceptable when the truth says no reading of the meter ever arrived;
- where the truth says an actual reading is held at the boundary, the method must be
  actual. Rolled-over registers compare modulo 10^digits.

With the run's results, only readings whose uplink (or a resend of it on a later wake-up)
was acknowledged must be held; the others (no answer, 5.03, 5.00, lost on the emulated
network) are counted by the category of their last result, not failed: where one was
stored anyway, its actual read is still checked exactly. A reading acknowledged and then
not found as the boundary read is a failure.

Every injected fault must be accounted for: a flagged fault by an alarm of its kind (or
by being unobservable: no uplink carrying it was stored); a quarantined one by its
uplinks not being acknowledged as stored over CoAP (the reason is checked when given) and
its meter's reads staying exact; the rest by the exactness of the meter's reads.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from simulator.backend import ml_of
from simulator.faults import CATALOGUE, Outcome
from simulator.fleet import Format
from simulator.schedule import Uplink, expected_readings
from simulator.truth import Truth

EXACT = {"actual", "installation", "removal"}
# The API's boundary read is "actual" when a stored reading lies within +-1 h of the
# boundary (api.settings.actual_window_s, migration 0020: the nearest one, ties: the
# earlier), and it reports that reading's time as `read_at`. Where the boundary's own
# hourly reading never arrived (a lost uplink), that is the next or previous hour's
# reading: exact for the hour it was taken in, not for the boundary. Comparing it with the
# boundary's register would call a true meter reading wrong, so it is compared with the
# register of its own hour (a reading of a drifting clock maps back to its true hour).
ACTUAL_WINDOW_S = 3600


@dataclass(frozen=True)
class Mismatch:
    """One boundary read or fault that does not match the truth."""

    meter: str
    what: str
    want: str
    got: str


@dataclass
class Report:
    """Boundary checks by method and fault accounting by kind; `ok` when nothing failed."""

    reads: Counter[tuple[str, bool]] = field(default_factory=Counter)
    faults: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    mismatches: list[Mismatch] = field(default_factory=list)
    skipped: int = 0
    unacked: Counter[str] = field(default_factory=Counter)  # readings, by last result
    resent_acked: int = 0  # resends (frames or widened reports) the collector acknowledged
    alarm_table: list[str] = field(default_factory=list)  # simulator.alarm_table.lines

    @property
    def ok(self) -> bool:
        """True when every read matched and every fault is accounted for."""
        return not self.mismatches and sum(self.reads.values()) > 0

    def table(self, limit: int = 30) -> list[str]:
        """The report as text lines (reads, faults, then the first mismatches)."""
        out = [f"{'boundary method':<16}{'checked':>9}{'ok':>9}{'wrong':>9}"]
        for method in sorted({m for m, _ in self.reads}):
            good, bad = self.reads[(method, True)], self.reads[(method, False)]
            out.append(f"{method:<16}{good + bad:>9}{good:>9}{bad:>9}")
        out += ["", f"{'fault':<18}{'expected':<28}{'injected':>9}{'accounted':>10}{'not':>6}"]
        for kind in CATALOGUE:
            c = self.faults.get(kind.name)
            if not c:
                continue
            expected = f"{kind.outcome}:{kind.expect}"
            out.append(
                f"{kind.name:<18}{expected:<28}{c['injected']:>9}{c['accounted']:>10}"
                f"{c['injected'] - c['accounted']:>6}"
            )
        unacked = ", ".join(f"{k} {v}" for k, v in sorted(self.unacked.items())) or "none"
        out += [
            "",
            f"resends acknowledged      {self.resent_acked}",
            f"readings never acked      {sum(self.unacked.values())} ({unacked}): "
            "not required, checked exactly where stored",
        ]
        if self.alarm_table:
            out += ["", *self.alarm_table]
        if self.mismatches:
            out += ["", f"{len(self.mismatches)} mismatch(es):"]
            out += [
                f"  {m.meter} {m.what}: want {m.want}, got {m.got}" for m in self.mismatches[:limit]
            ]
        out += ["", "verify: " + ("OK" if self.ok else "FAILED")]
        return out


def _epoch(text: str) -> int:
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp())


def _tolerance_ml(method: str, units: np.ndarray, h: int, unit_ml: int) -> int:
    span = 24 if method == "interpolated" else 72
    lo, hi = max(0, h - span), min(len(units) - 1, h + span)
    used = int(abs(units[hi] - units[lo])) * unit_ml
    return max(2 * unit_ml, used) if method == "interpolated" else max(5 * unit_ml, 2 * used)


def _stamped_hours(truth: Truth, uplinks: list[Uplink]) -> list[dict[int, int]]:
    """Per meter: the time a stored reading is stamped with -> the truth hour it holds."""
    start = truth.fleet.spec.start_s
    out: list[dict[int, int]] = [{} for _ in truth.meters]
    for m in truth.meters:
        for h in (m.installed_h, m.removed_h):
            out[m.index][start + h * 3600] = h
    for u in uplinks:
        if u.outcome is Outcome.STORED and u.claimed == u.meter:
            if truth.meters[u.meter].format is Format.INTERVAL:
                # nbm1 carries a whole-hour base time: the encoder rounds the drifting
                # clock to its nearest hour (simulator.frames._interval), so the stamp does
                out[u.meter].update(
                    ((start + h * 3600 + u.clock_offset_s + 1800) // 3600 * 3600, h)
                    for h in u.hours
                )
            else:
                out[u.meter].update((start + h * 3600 + u.clock_offset_s, h) for h in u.hours)
    return out


def check(
    truth: Truth,
    uplinks: list[Uplink],
    rows: list[dict[str, Any]],
    alarms: dict[str, set[str]],
    results: dict[int, str],
) -> Report:
    """Compare cycle rows and alarms with the truth; see the module docstring."""
    report = Report()
    spec = truth.fleet.spec
    by_address = {m.address: m for m in truth.meters}
    registers, units = truth.register_ml(), truth.units()
    held = expected_readings(truth, uplinks, results or None)
    if results:
        _count_unacked(truth, uplinks, results, held, report)
    hour_of = _stamped_hours(truth, uplinks)
    bad_meters: set[int] = set()
    for row in rows:
        m = by_address.get(row["address"])
        if m is None:
            continue
        for side in ("opening", "closing"):
            b = row[side]
            offset = _epoch(b["at"]) - spec.start_s
            h = offset // 3600
            if offset % 3600 or not m.installed_h <= h <= m.removed_h:
                report.skipped += 1
                continue
            method, got = b["method"], ml_of(b.get("register_m3"))
            want = int(registers[m.index, h])
            read_s = _epoch(b["read_at"]) if method == "actual" and b.get("read_at") else None
            if read_s is not None:  # see ACTUAL_WINDOW_S
                want = int(registers[m.index, hour_of[m.index].get(read_s, h)])
            if method == "missing":
                good = not held[m.index].any()
            elif got is None:
                good = False
            elif read_s is not None and abs(read_s - _epoch(b["at"])) > ACTUAL_WINDOW_S:
                good = False  # not an actual read of this boundary
            else:
                err = (got - want) % (m.register.modulus_units * m.unit_ml)
                err = min(err, m.register.modulus_units * m.unit_ml - err)
                tol = 0 if method in EXACT else _tolerance_ml(method, units[m.index], h, m.unit_ml)
                good = err <= tol and (method in EXACT or not held[m.index, h])
            report.reads[(method, good)] += 1
            if not good:
                bad_meters.add(m.index)
                report.mismatches.append(Mismatch(
                    m.address, f"{side} {b['at']} ({method})",
                    f"{want} mL" + (" (actual held)" if held[m.index, h] else ""),
                    f"{got} mL",
                ))  # fmt: skip
    _account(truth, uplinks, alarms, results, held, bad_meters, report)
    return report


def _count_unacked(
    truth: Truth, uplinks: list[Uplink], results: dict[int, str], held: np.ndarray,
    report: Report,
) -> None:  # fmt: skip
    """Readings the schedule sends but no acknowledged uplink carried, by last result."""
    last: dict[tuple[int, int], str] = {}
    for u in sorted(uplinks, key=lambda u: u.seq):
        got = results.get(u.seq, "not sent")
        if u.resend_of >= 0 and got == "acked":
            report.resent_acked += 1
        if (
            u.outcome in (Outcome.STORED, Outcome.LOST)
            and u.claimed == u.meter
            and (not u.corrupt and got != "acked")
        ):
            for h in u.hours:
                last[(u.meter, h)] = got.split(":", 1)[0].strip()
    report.unacked.update(word for (m, h), word in last.items() if not held[m, h])


def _account(
    truth: Truth, uplinks: list[Uplink], alarms: dict[str, set[str]], results: dict[int, str],
    held: np.ndarray, bad_meters: set[int], report: Report,
) -> None:  # fmt: skip
    """Account for every fault of the truth (see the module docstring)."""
    by_fault: dict[tuple[str, int], list[Uplink]] = defaultdict(list)
    for u in uplinks:
        if u.fault:
            by_fault[(u.fault, u.meter)].append(u)
    stored_hours: dict[int, set[int]] = defaultdict(set)  # held: acknowledged, with results
    for u in uplinks:
        if u.outcome is Outcome.STORED and u.claimed == u.meter:
            stored_hours[u.meter].update(h for h in u.hours if held[u.meter, h])
    items: list[tuple[str, int, int, int, Outcome, str]] = [
        (f.kind, f.meter, f.start_h, f.end_h, f.outcome, f.expect) for f in truth.faults
    ]
    meter_faults = {f.kind for f in truth.faults}
    items += [
        (u.fault, u.meter, u.first_h, u.last_h, u.outcome, u.expect)
        for u in uplinks if u.fault and u.fault not in meter_faults
    ]  # fmt: skip
    for kind, meter, start_h, end_h, outcome, expect in items:
        m = truth.meters[meter]
        c = report.faults[kind]
        c["injected"] += 1
        why = ""
        if outcome is Outcome.FLAGGED:
            seen = any(start_h <= h <= end_h for h in stored_hours[meter])
            if seen and expect not in alarms.get(m.address, set()):
                why = f"no {expect} alarm"
        elif outcome is Outcome.QUARANTINED:
            for u in by_fault.get((kind, meter), []):
                got = results.get(u.seq, "")
                if got == "acked" and m.transport.answers_refusals:
                    why = f"uplink {u.seq} was stored, want quarantine {expect}"
            if meter in bad_meters:
                why = why or "the meter's reads are wrong"
        elif meter in bad_meters:
            why = "the meter's reads are wrong"
        if why:
            report.mismatches.append(Mismatch(m.address, f"fault {kind}", str(outcome), why))
        else:
            c["accounted"] += 1
