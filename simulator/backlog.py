"""A meter's log of unacknowledged reports, and what its next wake-up sends. Pure.

An NB-IoT meter keeps a report until the backend acknowledges it (CoAP 2.04, MQTT PUBACK)
and sends it again on its next wake-up, as the catch-up after a coverage gap does
(`schedule`'s missed_days): a CON that was never answered, a NON whose response never
came, a 5.03 that outlasted the busy retries, a 5.00, a broker it could not reach. A
refusal (4.xx) is final: sending the same bytes again would be refused again. MQTT QoS 0
is fire-and-forget, so such a meter keeps a report only when it could not connect.

`plan_wake_up(truth, pending, current, ...)` is what one wake-up sends, in order:
- the pending reports the current one can carry: its frame is widened back to the oldest
  of them when the format holds the whole span (`fleet.BATCH_CAPACITY`: a SenML pack holds
  48 hours, a day and its predecessor) and both are the meter's own clean readings;
- every other pending report as a frame of its own, oldest first, `schedule.CATCH_UP_GAP_S`
  apart before the current one (CJ/T 188 and OMS frames hold one register, nbm1 one day);
- the current report (absent in the run's last wake-up, which only empties the logs).

A resent frame carries the readings as first logged (same hours, same clock offset). The
damage of a corrupt frame happened on the way, so its resend is clean and must be stored.
The meter keeps at most `LOG_REPORTS` reports: an older one is dropped from the log.
`category(result)` names what became of an uplink, for the run summary and `verify`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from simulator.faults import BY_NAME, Outcome
from simulator.fleet import BATCH_CAPACITY, Transport
from simulator.network import NetworkModel, draw
from simulator.schedule import CATCH_UP_GAP_S, Uplink
from simulator.truth import Truth

ACKED = "acked"
# A report is kept for the next wake-up after these results (the word before any ":").
KEPT: frozenset[str] = frozenset({"timeout", "lost", "busy", "server_error", "unreachable"})
LOG_REPORTS = 3  # reports a meter's log holds (the missed_days catch-up keeps 3 days too)
_RESEND_STREAM = 0x5E4D  # seeds the network fate of a resend


def category(result: str) -> str:
    """The word a result starts with: `acked`, a kept category, or the refusal's reason."""
    return result.split(":", 1)[0].strip()


def keeps(transport: Transport, result: str) -> bool:
    """True when a meter on `transport` keeps a report that got `result` for a resend."""
    word = category(result)
    if transport is Transport.MQTT_QOS0:
        return word == "unreachable"  # QoS 0 learns only that it could not connect
    return word in KEPT


@dataclass
class DeviceLog:
    """One meter's unacknowledged reports, oldest first, and those it had to drop."""

    pending: list[Uplink] = field(default_factory=list)
    dropped: list[Uplink] = field(default_factory=list)

    def keep(self, up: Uplink) -> None:
        """Log `up` for the next wake-up; a full log drops its oldest report."""
        self.pending.append(up)
        while len(self.pending) > LOG_REPORTS:
            self.dropped.append(self.pending.pop(0))

    def take(self) -> list[Uplink]:
        """Empty the log and return what it held (the next wake-up sends it)."""
        out, self.pending = self.pending, []
        return out


def _content(up: Uplink) -> tuple[Outcome, str]:
    """What the collector must do with the frame's content, whatever befell it on the way.

    The schedule's outcome says what happens to this transmission (lost on the emulated
    network, damaged on the way); the content itself is quarantined only for a reset
    clock or another meter's address, the faults that travel with the frame.
    """
    kind = BY_NAME.get(up.fault)
    if kind is not None and kind.name != "corrupt" and kind.outcome is Outcome.QUARANTINED:
        return kind.outcome, kind.expect
    return Outcome.STORED, ""


def _own_readings(up: Uplink) -> bool:
    """The frame carries the meter's own readings with a valid clock."""
    return _content(up)[0] is Outcome.STORED and up.claimed == up.meter


def _root(up: Uplink) -> int:
    return up.resend_of if up.resend_of >= 0 else up.seq


def resend(
    truth: Truth, up: Uplink, seq: int, send_s: int, network: NetworkModel | None = None
) -> Uplink:
    """`up` sent again as uplink `seq` at `send_s`: the same readings, a fresh network fate.

    Clean (a corrupt frame's damage does not repeat); a quarantined frame (reset clock,
    another meter's address) stays quarantined and keeps its fault for `verify`.
    """
    meter = truth.meters[up.meter]
    fate = draw(
        network or NetworkModel(), meter.transport,
        np.random.default_rng([truth.fleet.spec.seed, _RESEND_STREAM, _root(up), send_s]),
    )  # fmt: skip
    outcome, expect = _content(up)
    return dataclasses.replace(
        up, seq=seq, send_s=send_s, resend_of=_root(up), corrupt=False, copies=1,
        outcome=Outcome.LOST if fate.lost else outcome,
        expect="network" if fate.lost else expect,
        fault=up.fault if outcome is Outcome.QUARANTINED else "",
        lost_transmissions=fate.lost_transmissions, latency_ms=fate.latency_ms,
    )  # fmt: skip


def _widened(truth: Truth, pending: list[Uplink], current: Uplink) -> tuple[Uplink, int]:
    """`current` widened over the newest pending reports it can hold; how many it took."""
    if not _own_readings(current) or current.corrupt or current.outcome is not Outcome.STORED:
        return current, 0
    capacity = BATCH_CAPACITY[truth.meters[current.meter].format]
    first, last, taken = current.first_h, current.last_h, 0
    for up in reversed(pending):  # an out-of-order report may be older than a pending one
        lo, hi = min(first, up.first_h), max(last, up.last_h)
        if not _own_readings(up) or hi - lo + 1 > capacity:
            break
        first, last, taken = lo, hi, taken + 1
    if not taken:
        return current, 0
    oldest = pending[len(pending) - taken]
    return dataclasses.replace(current, first_h=first, last_h=last, resend_of=_root(oldest)), taken


def plan_wake_up(
    truth: Truth,
    pending: list[Uplink],
    current: Uplink | None,
    seqs: Iterator[int],
    *,
    send_s: int | None = None,
    network: NetworkModel | None = None,
) -> list[Uplink]:
    """The uplinks of one wake-up, in sending order (see the module docstring).

    `current` is the scheduled report (None: a wake-up only for the log, at `send_s`);
    resends take their `seq` from `seqs`. The last item is `current`, widened or not.
    """
    if current is None:
        if send_s is None:
            raise ValueError("a wake-up without a current report needs send_s")
        return [
            resend(truth, up, next(seqs), send_s + CATCH_UP_GAP_S * i, network)
            for i, up in enumerate(pending)
        ]
    report, taken = _widened(truth, pending, current)
    alone = pending[: len(pending) - taken]
    gap = CATCH_UP_GAP_S * len(alone)
    out = [
        resend(truth, up, next(seqs), current.send_s - gap + CATCH_UP_GAP_S * i, network)
        for i, up in enumerate(alone)
    ]
    return [*out, report]


def flush_s(truth: Truth, meter: int) -> int:
    """When `meter` wakes up after the simulated period (its first report after the end)."""
    spec = truth.fleet.spec
    return spec.start_s + (spec.days + 1) * 86_400 + truth.meters[meter].report_offset_s
