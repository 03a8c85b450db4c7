"""The uplink schedule: every uplink the fleet sends, in virtual time, with its expected fate.

`build_schedule(truth, network)` is pure and seeded. Each meter reports once a day at its
own offset after midnight (peak shifting) with the hourly registers of the previous day,
ending at the midnight freeze (hours 24(d-1)+1 .. 24d, trimmed to what its format can
carry and to the meter's installed span). Meter-scope faults from the truth shape this
(missed days and their catch-up, clock faults, identity misuse) and the uplink-scope
faults are drawn here (retransmission, re-delivery, overlap, out of order, corruption).

`Uplink.outcome` is what the backend must do with the first copy that arrives; any further
copies (`copies` > 1: CoAP retransmission, MQTT re-delivery) must be duplicates.
`expected_readings(truth, uplinks)` says which (meter, hour) registers the backend must hold.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from simulator import faults
from simulator.faults import Outcome
from simulator.fleet import BATCH_CAPACITY, CLOCK_EPOCH_S, SECONDS_PER_DAY, Meter
from simulator.network import NetworkModel, draw
from simulator.truth import Truth
from storage.reasons import Reason

FUTURE_CLOCK_S = 30 * 365 * SECONDS_PER_DAY  # a "future" clock reset lands ~30 years ahead
CATCH_UP_GAP_S = 20  # seconds between the uplinks of one catch-up burst
OUT_OF_ORDER_DELAY_S = 60  # a late uplink arrives this long after the meter's next one


@dataclass(frozen=True)
class Uplink:
    """One scheduled uplink.

    `meter` sends it (its credentials); `claimed` is the meter whose address the frame
    carries. `first_h`..`last_h` are the truth hours it carries (inclusive). `clock_offset_s`
    is the device clock minus true time. `expect` names the quarantine reason or handling.
    `resend_of` is the `seq` of the oldest unacknowledged report whose readings this uplink
    carries again (`simulator.backlog`; -1: none).
    """

    send_s: int
    meter: int
    claimed: int
    day: int
    first_h: int
    last_h: int
    outcome: Outcome
    expect: str = ""
    clock_offset_s: int = 0
    corrupt: bool = False
    copies: int = 1
    lost_transmissions: int = 0
    latency_ms: int = 0
    fault: str = ""
    seq: int = -1
    resend_of: int = -1

    @property
    def hours(self) -> range:
        """The truth hours the frame carries."""
        return range(self.first_h, self.last_h + 1)


def _window(m: Meter, day: int) -> tuple[int, int] | None:
    """Hours of day `day`'s report for meter `m`, trimmed to capacity and installed span."""
    last = min(24 * day, m.removed_h)
    first = max(24 * (day - 1) + 1, m.installed_h, last - BATCH_CAPACITY[m.format] + 1)
    return (first, last) if first <= last else None


def _send_s(truth: Truth, m: Meter, day: int) -> int:
    return truth.fleet.spec.start_s + day * SECONDS_PER_DAY + m.report_offset_s


def _base_uplinks(truth: Truth) -> list[Uplink]:
    """The daily uplinks of every meter, with meter-scope faults applied."""
    spec = truth.fleet.spec
    drift = {f.meter: f.params["drift_s_per_day"] for f in truth.faults_of("clock_drift")}
    resets = {f.meter: f for f in truth.faults_of("clock_reset")}
    missed = {f.meter: f for f in truth.faults_of("missed_days")}
    out: list[Uplink] = []
    for m in truth.meters:
        for day in range(1, spec.days + 1):
            send_s = _send_s(truth, m, day)
            send_h = (send_s - spec.start_s) / 3600
            window = _window(m, day)
            if window is None or send_h <= m.installed_h:
                continue
            if m.removed_h < spec.hours and send_h >= m.removed_h:
                continue  # removed by an exchange before this report
            offset = round(drift.get(m.index, 0) * send_h / 24)
            up = Uplink(send_s, m.index, m.index, day, *window, Outcome.STORED, "", offset)
            reset = resets.get(m.index)
            if reset and reset.start_h < send_h <= reset.end_h:
                future = reset.params["future"] == 1
                # a past reset shows the format's clock epoch plus the 3 days since: an OMS
                # clock cannot show 1970 (its years count from 2000), its RTC restarts there
                epoch = CLOCK_EPOCH_S[m.format]
                offset = FUTURE_CLOCK_S if future else epoch - (send_s - 3 * SECONDS_PER_DAY)
                up = dataclasses.replace(
                    up, outcome=Outcome.QUARANTINED, expect="clock_invalid",
                    clock_offset_s=offset, fault="clock_reset",
                )  # fmt: skip
            gap = missed.get(m.index)
            if gap is not None:
                first_missed, last_missed = gap.day + 1, gap.day + gap.params["days"]
                if first_missed <= day <= last_missed:
                    oldest_kept = last_missed + 1 - gap.params["backlog_days"]
                    if day < oldest_kept or last_missed + 1 > spec.days:
                        continue  # out of coverage and dropped from the device's log
                    catch_up = _send_s(truth, m, last_missed + 1) - CATCH_UP_GAP_S * (
                        last_missed + 1 - day
                    )
                    up = dataclasses.replace(up, send_s=catch_up, fault="missed_days")
            out.append(up)
    return out


def _identity_uplinks(truth: Truth) -> list[Uplink]:
    """The extra frames sent by devices that use another meter's address."""
    out = []
    for f in truth.faults_of("identity"):
        m = truth.meters[f.meter]
        first_h, last_h = _window(m, f.day) or (f.start_h, f.start_h)
        send_s = _send_s(truth, m, f.day) + 7
        out.append(
            Uplink(send_s, m.index, f.params["victim"], f.day, first_h, last_h, Outcome.QUARANTINED,
                   Reason.IDENTITY_MISMATCH, fault="identity")
        )  # fmt: skip
    return out


def _can_swap(u: Uplink, days: set[tuple[int, int]]) -> bool:
    # odd days only: a late day d lands after day d+1, which is never late itself
    return u.day % 2 == 1 and (u.meter, u.day + 1) in days


def _can_overlap(truth: Truth, u: Uplink, days: set[tuple[int, int]]) -> bool:
    fmt = truth.meters[u.meter].format
    return BATCH_CAPACITY[fmt] >= 30 and (u.meter, u.day - 1) in days


def _apply_uplink_faults(truth: Truth, ups: list[Uplink]) -> list[Uplink]:
    """Draw the uplink-scope faults (at most one per uplink) and apply them."""
    spec = truth.fleet.spec
    clean = [u.fault == "" and u.outcome is Outcome.STORED for u in ups]
    has_next = {(u.meter, u.day) for u in ups}
    for kind in faults.CATALOGUE:
        if kind.scope is not faults.Scope.UPLINK or kind.name not in truth.rates:
            continue
        eligible = [
            i
            for i, u in enumerate(ups)
            if clean[i] and kind.eligible(truth.meters[u.meter])
            and (kind.name != "out_of_order" or _can_swap(u, has_next))
            and (kind.name != "overlap" or _can_overlap(truth, u, has_next))
        ]  # fmt: skip
        rng = faults.fault_rng(spec.seed, kind.name)
        for i in faults.choose(rng, eligible, truth.rates[kind.name]):
            clean[i] = False
            u = ups[i]
            m = truth.meters[u.meter]
            if kind.name in ("coap_retransmit", "mqtt_redelivery"):
                ups[i] = dataclasses.replace(u, copies=2, fault=kind.name)
            elif kind.name == "overlap":
                first = max(m.installed_h, u.first_h - int(rng.integers(1, 7)))
                ups[i] = dataclasses.replace(u, first_h=first, fault="overlap")
            elif kind.name == "out_of_order":
                late = _send_s(truth, m, u.day + 1) + OUT_OF_ORDER_DELAY_S
                ups[i] = dataclasses.replace(u, send_s=late, fault="out_of_order")
            elif kind.name == "corrupt":
                ups[i] = dataclasses.replace(
                    u, corrupt=True, outcome=Outcome.QUARANTINED, expect=Reason.UNDECODABLE,
                    fault="corrupt",
                )  # fmt: skip
    return ups


def build_schedule(truth: Truth, network: NetworkModel | None = None) -> list[Uplink]:
    """Every uplink of the run, ordered by virtual send time (ties: meter), `seq` numbered."""
    network = network or NetworkModel()
    ups = _apply_uplink_faults(truth, _base_uplinks(truth) + _identity_uplinks(truth))
    rng = np.random.default_rng(np.random.SeedSequence([truth.fleet.spec.seed, 0x4E7]))
    out = []
    for u in ups:
        fate = draw(network, truth.meters[u.meter].transport, rng)
        copies = u.copies + (1 if fate.reply_lost else 0)
        outcome = Outcome.LOST if fate.lost else u.outcome
        expect = "network" if fate.lost else u.expect
        out.append(
            dataclasses.replace(
                u, copies=1 if fate.lost else copies, outcome=outcome, expect=expect,
                lost_transmissions=fate.lost_transmissions, latency_ms=fate.latency_ms,
            )
        )  # fmt: skip
    out.sort(key=lambda u: (u.send_s, u.meter, u.day))
    return [dataclasses.replace(u, seq=i) for i, u in enumerate(out)]


def expected_readings(
    truth: Truth, uplinks: list[Uplink], results: dict[int, str] | None = None
) -> npt.NDArray[np.bool_]:
    """(N, H+1) mask of the registers the backend must hold as actual readings.

    Column `installed_h` of every meter is its provisioned initial register; the rest come
    from uplinks whose outcome stores readings. With the run's `results` (seq -> result
    word) only acknowledged uplinks count: a reading the collector never acknowledged
    (timeout, 5.03, 5.00, resent in vain) may or may not be stored, so it is not required;
    one that a resend got acknowledged later is.
    """
    held = np.zeros((len(truth.meters), truth.fleet.spec.hours + 1), np.bool_)
    for m in truth.meters:
        held[m.index, m.installed_h] = True
        if m.removed_h < truth.fleet.spec.hours:
            held[m.index, m.removed_h] = True  # the final register read at removal
    for u in uplinks:
        if results is not None and results.get(u.seq) != "acked":
            continue
        if u.outcome is Outcome.STORED and u.claimed == u.meter:
            held[u.meter, u.first_h : u.last_h + 1] = True
    return held


class Event(NamedTuple):
    """A backend action at a virtual instant (an exchange registered, a command queued).
    `runner.send_all` finishes the earlier uplinks of `meters` (those the action concerns;
    the rest of the fleet keeps flowing), then awaits `action`."""

    at_s: int
    action: Callable[[], Awaitable[None]]
    meters: frozenset[int]
