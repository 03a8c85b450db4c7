"""`sim verify`'s alarm table: what was injected, what the backend alarmed, how fast, and
what it alarmed without cause. Pure: truth and alarms in, rows and failures out.

Incidents come from the ground truth:
- every flag-raising fault (leak, burst, ...; `faults.Outcome.FLAGGED`) is an incident of
  its `expect` kind from its start hour; the meter's own status bit raises it;
- a leak on an hourly water meter (nbm1 interval, SenML) whose flow alone reaches the
  night-flow threshold (plus one register unit, as registers move in whole units) and
  lasts `NIGHTS` whole nights (02:00-05:00; the simulated tenant's zone is UTC) is also a
  `night_flow` incident, due at 05:00 of its NIGHTS-th night. A shorter or weaker leak is
  a cause but not a promise: an alarm there is neither missed nor a false positive.

An alarm of a kind on a meter with no cause of that kind is a false positive. The check
fails on a missed `night_flow` or `district_loss` incident and on any false positive; a
flag kind's misses are the fault accounting's business (a fault no stored uplink carried
is unobservable).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from statistics import median

import numpy as np

from simulator.command_run import Planned
from simulator.faults import BY_NAME, Outcome
from simulator.fleet import SECONDS_PER_DAY, SECONDS_PER_HOUR, Format, Kind
from simulator.truth import Truth

# storage.analytics' defaults (migration 0043: night_flow threshold and periods)
NIGHT_FLOW_ML_H = 5000
NIGHTS = 3
NIGHT_START_H, NIGHT_END_H = 2, 5
DISTRICT_LOSS_PCT, DISTRICT_DAYS = 20, 2  # district_loss: % of the bulk volume, days running
_HOURLY = (Format.INTERVAL, Format.SENML)  # formats that report every hour


@dataclass(frozen=True)
class Incident:
    """A cause the backend should alarm: meter address, alarm kind, when it began, and
    whether an alarm is promised (False: a cause, but too weak or short to promise one)."""

    address: str
    kind: str
    start_s: int
    promised: bool = True


@dataclass(frozen=True)
class Seen:
    """An alarm the backend raised: meter address, kind, opened at (epoch seconds)."""

    address: str
    kind: str
    opened_s: int


@dataclass(frozen=True)
class Row:
    """One kind's line of the table."""

    kind: str
    injected: int  # promised incidents
    alarmed: int  # of those, alarmed
    median_to_alarm_s: float | None
    false_positives: int


def _night_flow(truth: Truth) -> list[Incident]:
    spec, out = truth.fleet.spec, []
    for f in truth.faults_of("leak"):
        m = truth.meters[f.meter]
        if m.kind is not Kind.WATER or m.format not in _HOURLY:
            continue
        start_s, end_s = spec.start_s + f.start_h * 3600, spec.start_s + f.end_h * 3600
        first_day = -(-(start_s - NIGHT_START_H * SECONDS_PER_HOUR) // SECONDS_PER_DAY)
        nights = [
            d * SECONDS_PER_DAY + NIGHT_END_H * SECONDS_PER_HOUR
            for d in range(first_day, end_s // SECONDS_PER_DAY + 1)
            if d * SECONDS_PER_DAY + NIGHT_END_H * SECONDS_PER_HOUR <= end_s
        ]
        strong = f.params.get("flow_ml_h", 0) >= NIGHT_FLOW_ML_H + m.unit_ml
        out.append(Incident(m.address, "night_flow", start_s, strong and len(nights) >= NIGHTS))
    return out


def _district_loss(truth: Truth) -> list[Incident]:
    """A pipe leak is promised once DISTRICT_DAYS whole days running lose >= the threshold
    (plus a margin for whole-unit registers) of the bulk volume, by the truth's registers."""
    spec, out = truth.fleet.spec, []
    units = truth.units()
    unit_ml = np.array([m.unit_ml for m in truth.meters], np.int64)
    midnights = np.arange(0, spec.hours + 1, 24)
    for d in truth.districts:
        if not d.loss_ml_h:
            continue
        ml = units[:, midnights] * unit_ml[:, None]
        bulk = np.diff(ml[d.bulk])
        customers = np.diff(ml[list(d.customers)], axis=1).sum(axis=0)
        lossy = (bulk - customers) * 100 >= (DISTRICT_LOSS_PCT + 1) * bulk
        run = max((len(r) for r in "".join("1" if x else "0" for x in lossy).split("0")),
                  default=0)  # fmt: skip
        address = truth.meters[d.bulk].address
        start_s = spec.start_s + d.loss_start_h * 3600
        out.append(Incident(address, "district_loss", start_s, run >= DISTRICT_DAYS))
    return out


def incidents(truth: Truth) -> list[Incident]:
    """Every cause of an alarm the truth holds (see the module docstring)."""
    spec = truth.fleet.spec
    flagged = [
        Incident(truth.meters[f.meter].address, BY_NAME[f.kind].expect,
                 spec.start_s + f.start_h * 3600)
        for f in truth.faults if BY_NAME[f.kind].outcome is Outcome.FLAGGED
    ]  # fmt: skip
    return flagged + _night_flow(truth) + _district_loss(truth)


def commanded(planned: list[Planned]) -> list[Incident]:
    """A valve closed by a command of the run causes its meter's valve_closed alarm (the
    meter reports the closed valve as a real one does); not promised: the flag decides.
    The reopen causes nothing: the backend marks valve_closed cleared at the first reading
    without the valve flag, so a valve_closed_flow after it is a false positive."""
    return [
        Incident(p.address, "valve_closed", p.at_s, promised=False)
        for p in planned
        if p.kind == "valve" and p.executions > 0 and p.args.get("action") == "close"
    ]


def table(causes: list[Incident], seen: list[Seen]) -> tuple[list[Row], list[str]]:
    """(rows by kind, failures): alarmed = a promised incident with an alarm of its kind on
    its meter (time to alarm: opened - start); false positive = an alarm without a cause."""
    first: dict[tuple[str, str], int] = {}
    for s in seen:
        key = (s.address, s.kind)
        first[key] = min(first.get(key, s.opened_s), s.opened_s)
    caused = {(c.address, c.kind) for c in causes}
    by_kind: dict[str, list[Incident]] = defaultdict(list)
    for c in causes:
        if c.promised:
            by_kind[c.kind].append(c)
    fps: dict[str, list[str]] = defaultdict(list)
    for address, kind in first:
        if (address, kind) not in caused:
            fps[kind].append(address)
    rows, failures = [], []
    for kind in sorted(set(by_kind) | set(fps)):
        hit = [c for c in by_kind[kind] if (c.address, c.kind) in first]
        waits = [first[c.address, c.kind] - c.start_s for c in hit]
        rows.append(Row(kind, len(by_kind[kind]), len(hit),
                        median(waits) if waits else None, len(fps[kind])))  # fmt: skip
        if kind in ("night_flow", "district_loss"):
            failures += [f"{kind} not alarmed on {c.address}" for c in by_kind[kind]
                         if c not in hit]  # fmt: skip
        failures += [f"{kind} alarmed on {a} without cause" for a in sorted(fps[kind])]
    return rows, failures


def lines(rows: list[Row]) -> list[str]:
    """The table as text."""
    out = [f"{'alarm':<18}{'injected':>9}{'alarmed':>9}{'median to alarm':>17}{'false +':>9}"]
    for r in rows:
        wait = "-" if r.median_to_alarm_s is None else f"{r.median_to_alarm_s / 3600:.1f} h"
        out.append(f"{r.kind:<18}{r.injected:>9}{r.alarmed:>9}{wait:>17}{r.false_positives:>9}")
    return out
