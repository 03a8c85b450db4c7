"""District metered areas in the simulated fleet: bulk meters, and pipe leaks between a
bulk meter and its customers (non-revenue water the backend's balance must find).

`add_districts(truth, n, leak_share)` is pure and seeded. It groups `CUSTOMERS` customer
meters per district among the water meters whose daily volume the backend can know
exactly: hourly formats (nbm1 interval, SenML), acknowledged transports (CoAP CON, MQTT
QoS 1) and no meter-scope fault but a leak (a leak is billed water, not a loss). It
appends one bulk meter per district (nbm1 interval, litres, CoAP CON) whose true register
counts the customers' true flow plus, in `round(leak_share * n)` districts, a pipe leak
of `LOSS_SHARE` of their mean flow from a start hour in the first half of the run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from simulator.fleet import REGISTERS, Format, Kind, Meter, Transport, address_for, meter_prefix

if TYPE_CHECKING:
    from simulator.truth import Truth

CUSTOMERS = 6  # customer meters per district
LOSS_SHARE = 0.4  # a pipe leak loses 40 % of what the customers use: NRW ~ 29 % of bulk
_HOURLY = (Format.INTERVAL, Format.SENML)
_ACKED = (Transport.COAP_CON, Transport.MQTT_QOS1)
_HARMLESS = {"leak", "coap_retransmit", "mqtt_redelivery", "overlap", "out_of_order"}


@dataclass(frozen=True)
class District:
    """A bulk meter (its index), its customers' indices, and its pipe leak (0: none)."""

    name: str
    bulk: int
    customers: tuple[int, ...]
    loss_ml_h: int = 0
    loss_start_h: int = 0

    def to_json(self) -> dict[str, Any]:
        """For truth.json."""
        return {**dataclasses.asdict(self), "customers": list(self.customers)}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> District:
        """From truth.json."""
        return cls(**{**obj, "customers": tuple(obj["customers"])})


def _bulk_meter(truth: Truth, index: int, seed: int) -> Meter:
    spec = truth.fleet.spec
    return Meter(
        index=index,
        address=address_for(Format.INTERVAL, meter_prefix(truth.fleet), index),
        service_point=f"sp-{meter_prefix(truth.fleet):07d}-{index:06d}",
        kind=Kind.WATER,
        format=Format.INTERVAL,
        transport=Transport.COAP_CON,
        register=REGISTERS[Format.INTERVAL],
        report_offset_s=spec.report_window_s[0],
        seed=seed,
        initial_units=0,
        installed_h=0,
        removed_h=spec.hours,
    )


def add_districts(truth: Truth, n: int, leak_share: float) -> Truth:
    """`truth` with `n` districts (fewer if too few meters qualify) and their bulk meters."""
    if n <= 0:
        return truth
    spec, hours = truth.fleet.spec, truth.fleet.spec.hours
    rng = np.random.default_rng([spec.seed, 0xD157])
    faulty = {f.meter for f in truth.faults if f.kind not in _HARMLESS}
    pool = [m.index for m in truth.meters
            if m.kind is Kind.WATER and m.format in _HOURLY and m.transport in _ACKED
            and m.index not in faulty and m.removed_h == hours]  # fmt: skip
    n = min(n, len(pool) // CUSTOMERS)
    if n == 0:
        return truth
    chosen = rng.permutation(pool)[: n * CUSTOMERS].reshape(n, CUSTOMERS)
    lossy = (
        set(rng.permutation(n)[: max(1, round(leak_share * n))].tolist()) if leak_share else set()
    )
    units = truth.units()
    unit_ml = np.array([m.unit_ml for m in truth.meters], np.int64)
    meters, steps, flags = list(truth.meters), [truth.steps], [truth.flags]
    initial, districts = [truth.initial_units], []
    for k, members in enumerate(chosen.tolist()):
        used_ml = ((units[members] - units[members, :1]) * unit_ml[members, None]).sum(axis=0)
        loss_ml_h, start_h = 0, 0
        if k in lossy:
            loss_ml_h = int(LOSS_SHARE * used_ml[-1] / hours)
            start_h = int(rng.integers(0, hours // 2))
        lost = loss_ml_h * np.clip(np.arange(hours + 1) - start_h, 0, None)
        litres = (used_ml + lost) // 1000  # the bulk register counts whole litres
        index = len(meters)
        meters.append(_bulk_meter(truth, index, int(rng.integers(0, 2**31))))
        steps.append(np.diff(litres)[None, :].astype(np.int32))
        flags.append(np.zeros((1, hours + 1), np.uint32))
        initial.append(np.zeros(1, np.int64))
        districts.append(District(f"district-{k + 1}", index, tuple(members), loss_ml_h, start_h))
    fleet = dataclasses.replace(truth.fleet, meters=tuple(meters))
    return dataclasses.replace(
        truth, fleet=fleet, steps=np.vstack(steps), flags=np.vstack(flags),
        initial_units=np.concatenate(initial), districts=tuple(districts),
    )  # fmt: skip
