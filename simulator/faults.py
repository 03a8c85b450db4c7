"""The fault catalogue, `--faults` parsing, and the seeded choice of who gets which fault.

Every fault kind is one row of `CATALOGUE`: its scope (a whole meter, or one uplink), its
default rate, which meters can have it, and what the backend must do with what it causes
(`Outcome` plus an `expect` word: the event kind, quarantine reason (`storage.reasons`,
the collector's own table) or correction).
`verify` reads those rows back from the ground truth to account for every fault.

A rate is exact, not a coin flip per item: `round(rate * eligible)` items are chosen
without replacement, so `leak=0.02` on 1000 water meters gives exactly 20 leaks (and at
least one whenever the rate is positive and something is eligible).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from simulator.fleet import Format, Kind, Meter, Transport
from storage.reasons import Reason


class Outcome(enum.StrEnum):
    """What the backend should do with an uplink (or with the readings a fault touches)."""

    STORED = "stored"  # accepted; its readings are new
    DUPLICATE = "duplicate"  # accepted, nothing new stored (dedup)
    FLAGGED = "flagged"  # stored, and the meter gets an event of kind `expect`
    CORRECTED = "corrected"  # stored after a correction named by `expect`
    QUARANTINED = "quarantined"  # kept aside with reason `expect`, no reading stored
    REJECTED = "rejected"  # refused by the transport (authentication)
    LOST = "lost"  # never reached the collector (emulated network loss)


class Scope(enum.StrEnum):
    """Whether a fault is drawn per meter or per scheduled uplink."""

    METER = "meter"
    UPLINK = "uplink"


@dataclass(frozen=True)
class FaultKind:
    """One catalogue row: name, scope, default rate, expected handling and eligibility."""

    name: str
    scope: Scope
    default_rate: float
    outcome: Outcome
    expect: str
    eligible: Callable[[Meter], bool]
    doc: str


def _any(_m: Meter) -> bool:
    return True


def _water(m: Meter) -> bool:
    return m.kind is Kind.WATER


def _formats(*formats: Format) -> Callable[[Meter], bool]:
    return lambda m: m.format in formats


def _rolls_over(m: Meter) -> bool:
    # nbm1 sends whole-litre deltas >= 0 from a base register: a wrap inside a batch is
    # not representable, and a uint32 litre register practically never wraps
    return m.format is not Format.INTERVAL


# Status bits each format can carry (FORMATS.md §5 "Alarms and status bits").
_LEAK_FORMATS = (Format.INTERVAL, Format.SENML)
_BURST_FORMATS = (Format.INTERVAL,)
_REVERSE_FORMATS = (Format.SENML,)  # nbm1 deltas are >= 0
_TAMPER_FORMATS = (Format.SENML,)
_BATTERY_FORMATS = (Format.CJT188, Format.OMS, Format.INTERVAL)

CATALOGUE: tuple[FaultKind, ...] = (
    FaultKind("leak", Scope.METER, 0.02, Outcome.FLAGGED, "leak",
              lambda m: _water(m) and m.format in _LEAK_FORMATS,
              "continuous flow day and night from a start hour, with the leak alarm"),
    FaultKind("burst", Scope.METER, 0.005, Outcome.FLAGGED, "burst",
              lambda m: _water(m) and m.format in _BURST_FORMATS,
              "a few hours of very high flow with the burst alarm"),
    FaultKind("reverse_flow", Scope.METER, 0.01, Outcome.FLAGGED, "reverse_flow",
              lambda m: _water(m) and m.format in _REVERSE_FORMATS,
              "the register runs backwards for a few hours, back-flow alarm"),
    FaultKind("tamper", Scope.METER, 0.005, Outcome.FLAGGED, "tamper",
              _formats(*_TAMPER_FORMATS), "magnetic tamper alarm for a few hours"),
    FaultKind("low_battery", Scope.METER, 0.02, Outcome.FLAGGED, "low_battery",
              _formats(*_BATTERY_FORMATS), "battery-low status from a start hour on"),
    FaultKind("valve_closed", Scope.METER, 0.02, Outcome.FLAGGED, "valve_closed",
              lambda m: m.kind is Kind.GAS and m.format is Format.CJT188,
              "prepaid gas: credit used up, valve closed, no flow from then on"),
    FaultKind("rollover", Scope.METER, 0.01, Outcome.CORRECTED, "rollover",
              _rolls_over, "register starts just below 10^digits and wraps to 0 mid-run"),
    FaultKind("exchange", Scope.METER, 0.01, Outcome.CORRECTED, "exchange",
              _any, "meter replaced mid-cycle: old meter removed, new one installed"),
    FaultKind("clock_drift", Scope.METER, 0.03, Outcome.CORRECTED, "clock_drift",
              _any, "the meter clock drifts (at most 20 min over the run)"),
    FaultKind("clock_reset", Scope.METER, 0.01, Outcome.QUARANTINED, "clock_invalid",
              _any, "the clock resets to 1970 or jumps to the future for 1-3 days"),
    FaultKind("missed_days", Scope.METER, 0.03, Outcome.STORED, "catch_up",
              _any, "no coverage (PSM) for 1-6 days, then a catch-up of the last 3 days"),
    FaultKind("identity", Scope.METER, 0.005, Outcome.QUARANTINED, Reason.IDENTITY_MISMATCH,
              _any, "the device sends one frame with another meter's address"),
    FaultKind("coap_retransmit", Scope.UPLINK, 0.02, Outcome.DUPLICATE, "coap_dedup",
              lambda m: m.transport is Transport.COAP_CON,
              "the ACK is lost, the CON is retransmitted with the same Message ID"),
    FaultKind("mqtt_redelivery", Scope.UPLINK, 0.02, Outcome.DUPLICATE, "mqtt_dedup",
              lambda m: m.transport is Transport.MQTT_QOS1,
              "the PUBLISH is delivered a second time"),
    FaultKind("overlap", Scope.UPLINK, 0.03, Outcome.STORED, "overlap",
              _any, "the batch is sent 1-6 h late and overlaps the next one"),
    FaultKind("out_of_order", Scope.UPLINK, 0.02, Outcome.STORED, "out_of_order",
              _any, "the uplink arrives after the meter's next one"),
    FaultKind("corrupt", Scope.UPLINK, 0.01, Outcome.QUARANTINED, Reason.UNDECODABLE,
              _any, "bytes damaged on the way (checksum, JSON or ciphertext broken)"),
)  # fmt: skip

BY_NAME: dict[str, FaultKind] = {k.name: k for k in CATALOGUE}


class FaultSpecError(ValueError):
    """A `--faults` value names an unknown fault or a rate outside [0, 1]."""


def parse_faults(text: str | None) -> dict[str, float]:
    """`"leak=0.02,burst"`, `"all"` or `"all,leak=0.1"` to {name: rate}; "" or None: none.

    A name without a rate takes its catalogue default. Raises FaultSpecError.
    """
    rates: dict[str, float] = {}
    for raw_item in (text or "").split(","):
        item = raw_item.strip()
        if not item or item == "none":
            continue
        name, _, rate_text = item.partition("=")
        name = name.strip().replace("-", "_")
        if name == "all":
            rates.update({k.name: k.default_rate for k in CATALOGUE})
            continue
        if name not in BY_NAME:
            known = ", ".join(BY_NAME)
            raise FaultSpecError(f"unknown fault {name!r}; known: all, {known}")
        try:
            rate = float(rate_text) if rate_text else BY_NAME[name].default_rate
        except ValueError as exc:
            raise FaultSpecError(f"fault {name}: rate {rate_text!r} is not a number") from exc
        if not 0.0 <= rate <= 1.0:
            raise FaultSpecError(f"fault {name}: rate {rate} is not within [0, 1]")
        rates[name] = rate
    return rates


def format_faults(rates: dict[str, float]) -> str:
    """The inverse of `parse_faults` (catalogue order), for manifests and logs."""
    return ",".join(f"{k.name}={rates[k.name]:g}" for k in CATALOGUE if k.name in rates)


@dataclass(frozen=True)
class Fault:
    """One injected fault: kind, the meter it hits and the hours or uplink it touches.

    `start_h`..`end_h` (inclusive) are truth hours; `day` names the report day for uplink
    faults; `params` holds integers specific to the kind (flow, drift, victim meter, ...).
    """

    kind: str
    meter: int
    start_h: int
    end_h: int
    day: int = -1
    params: dict[str, int] = field(default_factory=dict)

    @property
    def outcome(self) -> Outcome:
        """What the backend should do about it (from the catalogue)."""
        return BY_NAME[self.kind].outcome

    @property
    def expect(self) -> str:
        """The event kind, quarantine reason or correction `verify` looks for."""
        return BY_NAME[self.kind].expect

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict (the manifest format)."""
        return {
            "kind": self.kind,
            "meter": self.meter,
            "start_h": self.start_h,
            "end_h": self.end_h,
            "day": self.day,
            "params": dict(self.params),
            "outcome": str(self.outcome),
            "expect": self.expect,
        }

    @classmethod
    def from_json(cls, obj: dict[str, object]) -> Fault:
        """Inverse of `to_json`."""
        params = obj.get("params") or {}
        assert isinstance(params, dict)
        return cls(
            kind=str(obj["kind"]),
            meter=int(str(obj["meter"])),
            start_h=int(str(obj["start_h"])),
            end_h=int(str(obj["end_h"])),
            day=int(str(obj.get("day", -1))),
            params={str(k): int(v) for k, v in params.items()},
        )


def fault_rng(seed: int, kind: str) -> np.random.Generator:
    """The generator for one fault kind: toggling one kind never moves another's picks."""
    index = [k.name for k in CATALOGUE].index(kind)
    return np.random.default_rng(np.random.SeedSequence([seed, 0xFA17, index]))


def choose(rng: np.random.Generator, eligible: list[int], rate: float) -> list[int]:
    """Exactly round(rate * len(eligible)) items (at least 1 if rate > 0), sorted."""
    if rate <= 0.0 or not eligible:
        return []
    count = min(len(eligible), max(1, round(rate * len(eligible))))
    picked = rng.choice(len(eligible), size=count, replace=False)
    return sorted(eligible[int(i)] for i in picked)
