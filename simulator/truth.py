"""Ground truth: the true register of every meter at every hour, and every injected fault.

`build_truth(spec, rates)` runs the pure part of a simulation: fleet, consumption, then
the meter-scope faults of `faults.CATALOGUE` (uplink-scope faults are drawn by
`schedule`). The registers are kept compactly as int64 initial units plus an int32
(N, H) array of signed steps in each meter's smallest unit; `units()` and
`register_ml()` rebuild the (N, H+1) registers on demand. `save`/`load` write and read
`truth.npz` (arrays) and `truth.json` (spec, meters, faults) in one directory.

Hour h is the instant start_s + h*3600; register column h is the register at that instant.
A meter is on its service point for hours installed_h..removed_h (inclusive): an exchange
ends one meter and appends a new one (a new row) that starts at the same hour.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from decoder.columns import Flag
from simulator import consumption, faults
from simulator.districts import District
from simulator.faults import Fault  # in Truth's body `faults` is the field, not the module
from simulator.fleet import Fleet, FleetSpec, Meter, address_for, build_fleet, meter_prefix

Int64s = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Truth:
    """Meters, registers (as steps), per-hour status flags and the injected faults."""

    fleet: Fleet
    rates: dict[str, float]
    initial_units: Int64s  # (N,) register at installed_h, unwrapped, in units
    steps: npt.NDArray[np.int32]  # (N, H) signed unit steps between consecutive hours
    flags: npt.NDArray[np.uint32]  # (N, H+1) decoder.columns.Flag bits the meter reports
    faults: tuple[faults.Fault, ...]
    districts: tuple[District, ...] = ()  # simulator.districts.add_districts

    @property
    def meters(self) -> tuple[Meter, ...]:
        """All meters, including the ones installed by an exchange."""
        return self.fleet.meters

    def units(self) -> Int64s:
        """(N, H+1) unwrapped register in units; constant outside the installed span."""
        cum = np.cumsum(self.steps, axis=1, dtype=np.int64)
        out = np.empty((self.steps.shape[0], self.steps.shape[1] + 1), np.int64)
        out[:, 0] = 0
        out[:, 1:] = cum
        return out + self.initial_units[:, None]

    def register_ml(self) -> Int64s:
        """(N, H+1) register as the meter displays it (wrapped at 10^digits), in mL."""
        modulus = np.array([m.register.modulus_units for m in self.meters], np.int64)
        unit = np.array([m.unit_ml for m in self.meters], np.int64)
        wrapped: Int64s = (self.units() % modulus[:, None]) * unit[:, None]
        return wrapped

    def faults_of(self, kind: str) -> list[Fault]:
        """Faults of one kind, in meter order."""
        return [f for f in self.faults if f.kind == kind]


# The status bit each flag-raising fault sets on the readings of its hours.
FAULT_FLAG: dict[str, Flag] = {
    "leak": Flag.LEAK,
    "burst": Flag.BURST,
    "reverse_flow": Flag.REVERSE_FLOW,
    "tamper": Flag.TAMPER,
    "low_battery": Flag.LOW_BATTERY,
    "valve_closed": Flag.VALVE_CLOSED,
}


def fault_flags(drawn: list[faults.Fault], n: int, hours: int) -> npt.NDArray[np.uint32]:
    """(n, hours+1) status bits the meters report, from the flag-raising faults."""
    flags = np.zeros((n, hours + 1), np.uint32)
    for fault in drawn:
        if fault.kind in FAULT_FLAG:
            flags[fault.meter, fault.start_h : fault.end_h + 1] |= np.uint32(FAULT_FLAG[fault.kind])
    return flags


def _window(rng: np.random.Generator, hours: int, lo: float, hi: float) -> int:
    return int(rng.integers(int(lo * hours), max(int(lo * hours) + 1, int(hi * hours))))


def _draw_meter_faults(fleet: Fleet, rates: dict[str, float]) -> list[faults.Fault]:
    """Meter-scope faults of `rates`; exchange only hits meters without other faults."""
    spec, hours, days = fleet.spec, fleet.spec.hours, fleet.spec.days
    out: list[faults.Fault] = []
    # exchange last: it is drawn among the meters no other fault has touched
    for kind in sorted(faults.CATALOGUE, key=lambda k: k.name == "exchange"):
        if kind.scope is not faults.Scope.METER or kind.name not in rates:
            continue
        rng = faults.fault_rng(spec.seed, kind.name)
        taken = {f.meter for f in out}
        eligible = [
            m.index
            for m in fleet.meters
            if kind.eligible(m) and (kind.name != "exchange" or m.index not in taken)
        ]
        for i in faults.choose(rng, eligible, rates[kind.name]):
            out.append(_one_fault(kind.name, i, fleet, rng, hours, days))
    return out


def _one_fault(
    name: str, i: int, fleet: Fleet, rng: np.random.Generator, hours: int, days: int
) -> faults.Fault:
    def f(start: int, end: int, day: int = -1, **params: int) -> faults.Fault:
        return faults.Fault(name, i, start, end, day, params)

    if name == "leak":
        return f(_window(rng, hours, 0.0, 0.6), hours, flow_ml_h=int(rng.integers(3_000, 30_000)))
    if name == "burst":
        s = _window(rng, hours, 0.05, 0.9)
        return f(s, s + int(rng.integers(0, 6)), flow_ml_h=int(rng.integers(300_000, 1_500_000)))
    if name == "reverse_flow":
        s = _window(rng, hours, 0.05, 0.9)
        return f(s, s + int(rng.integers(1, 8)), flow_ml_h=-int(rng.integers(5_000, 40_000)))
    if name == "tamper":
        s = _window(rng, hours, 0.05, 0.9)
        return f(s, s + int(rng.integers(1, 12)))
    if name == "low_battery":
        return f(_window(rng, hours, 0.0, 0.8), hours)
    if name == "valve_closed":
        return f(_window(rng, hours, 0.2, 0.8), hours)
    if name == "rollover":
        return f(_window(rng, hours, 0.2, 0.7), hours)
    if name == "exchange":
        # mid-cycle, during working hours (a field engineer swaps it)
        day = int(rng.integers(max(1, days // 4), max(2, 3 * days // 4)))
        h = day * 24 + int(rng.integers(9, 17))
        return f(h, h, new_meter=-1)
    if name == "clock_drift":
        cap = max(30, 1200 // days)  # at most ~20 min over the whole run
        return f(
            0, hours, drift_s_per_day=int(rng.integers(30, cap + 1)) * int(rng.choice([-1, 1]))
        )
    if name == "clock_reset":
        day = int(rng.integers(min(2, days), max(min(2, days) + 1, days - 2)))
        span = int(rng.integers(1, 4))
        return f(day * 24, min(hours, (day + span) * 24), day, future=int(rng.integers(0, 2)))
    if name == "missed_days":
        day = int(rng.integers(1, max(2, days - 7)))
        span = int(rng.integers(1, 7))
        return f(day * 24, min(hours, (day + span) * 24), day, days=span, backlog_days=3)
    if name == "identity":
        me = fleet.meters[i]
        victims = [m.index for m in fleet.meters if m.format is me.format and m.index != i]
        victim = int(rng.choice(victims)) if victims else i
        day = int(rng.integers(1, days + 1))
        return f(day * 24, day * 24, day, victim=victim)
    raise AssertionError(f"no generator for meter fault {name}")


def _exchange(
    fleet: Fleet, drawn: list[faults.Fault], seed: int
) -> tuple[Fleet, list[faults.Fault]]:
    """Remove each exchanged meter at its hour and append its successor as a new meter."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xE8C4]))
    meters = list(fleet.meters)
    prefix = meter_prefix(fleet)
    out = []
    for fault in drawn:
        if fault.kind != "exchange":
            out.append(fault)
            continue
        old = meters[fault.meter]
        new_index = len(meters)
        meters[old.index] = dataclasses.replace(old, removed_h=fault.start_h)
        meters.append(
            dataclasses.replace(
                old,
                index=new_index,
                address=address_for(old.format, prefix, new_index),
                seed=int(rng.integers(0, 2**31)),
                initial_units=int(rng.integers(0, 6)),
                installed_h=fault.start_h,
                removed_h=fleet.spec.hours,
                oms_key=bytes(rng.integers(0, 256, 16, dtype=np.uint8)) if old.oms_key else None,
            )
        )
        out.append(dataclasses.replace(fault, params={"new_meter": new_index}))
    return dataclasses.replace(fleet, meters=tuple(meters)), out


def build_truth(spec: FleetSpec, rates: dict[str, float] | None = None) -> Truth:
    """Fleet, registers and meter-scope faults of `spec` with fault `rates` (pure, seeded)."""
    rates = dict(rates or {})
    base = build_fleet(spec)
    flow = consumption.hourly_flow_ml(base, np.random.default_rng([spec.seed, 0xF10]))
    drawn = _draw_meter_faults(base, rates)
    for fault in drawn:
        row = flow[fault.meter]
        span = slice(fault.start_h, fault.end_h + 1)
        if fault.kind in ("leak", "burst"):
            row[span] += fault.params["flow_ml_h"]
        elif fault.kind == "reverse_flow":
            row[span] = fault.params["flow_ml_h"]
        elif fault.kind == "valve_closed":
            row[fault.start_h :] = 0.0
    fleet, drawn = _exchange(base, drawn, spec.seed)
    n, hours = len(fleet.meters), spec.hours
    # the service point's flow continues through an exchange: successors inherit it
    old_of = {f.params["new_meter"]: f.meter for f in drawn if f.kind == "exchange"}
    sp_rows = [old_of.get(i, i) for i in range(n)]
    sp_flow = flow[sp_rows]
    installed = np.array([m.installed_h for m in fleet.meters])
    removed = np.array([m.removed_h for m in fleet.meters])
    hour_idx = np.arange(hours)
    on = (hour_idx[None, :] >= installed[:, None]) & (hour_idx[None, :] < removed[:, None])
    sp_flow = np.where(on, sp_flow, 0.0)
    unit_ml = np.array([m.unit_ml for m in fleet.meters], np.float64)
    rng = np.random.default_rng([spec.seed, 0x0A47])
    # each register starts part-way through its smallest unit, so dials do not tick in step
    phase = rng.random(n)
    cum = np.cumsum(sp_flow, axis=1) / unit_ml[:, None] + phase[:, None]
    ticks = np.floor(np.concatenate([phase[:, None], cum], axis=1)).astype(np.int64)
    steps = np.diff(ticks, axis=1).astype(np.int32)
    initial = np.array([m.initial_units for m in fleet.meters], np.int64)
    for fault in drawn:
        if fault.kind == "rollover":
            m = fleet.meters[fault.meter]
            used = int(steps[fault.meter, : fault.start_h].sum())
            initial[fault.meter] = m.register.modulus_units - max(1, used)
    fleet = dataclasses.replace(
        fleet,
        meters=tuple(
            dataclasses.replace(m, initial_units=int(initial[m.index])) for m in fleet.meters
        ),
    )
    flags = fault_flags(drawn, n, hours)
    return Truth(fleet, rates, initial, steps, flags, tuple(drawn))
