"""Commands during `sim run`: queue through the API, execute on the meter, change the truth.

`plan(truth, oscore, n_valve, mqtt)` picks, deterministically, the commands of a run:
`n_valve` meters without faults and outside districts, taken in turn from the OSCORE CoAP
(CON) meters and the MQTT QoS 1 meters (`mqtt`: the addresses with a broker account), get
a valve close at a third of the period and an open at two thirds; drifting meters of both
kinds get a clock set at the middle; one senml/interval meter gets a reporting interval
change, and one more gets one as a meter of the `mute` fault class (executes, never
answers: its command stays `sent` until its TTL, then `expired`); one OSCORE CoAP OMS
meter gets a rotate_key of its OMS AES key and one other OSCORE CoAP meter a rotate_key of
its OSCORE context, both at half the period. No command is planned for DTLS and platform
meters yet (see the README).

`CommandDriver` acts it out: `events()` queue each command through the API at its virtual
instant (`runner.send_all`'s events); `answer(meter, up, payload)` hands an envelope (a
2.04's payload, or a message on the MQTT down topic) to the meter's
`simulator.commands.CommandExecutor` and returns the answer to send (`POST /c`, or the
MQTT result topic); `adjust(up)` applies the meter's state to an uplink about to be sent;
`awaits(up)` says whether the meter still has a queued command it has not executed (an
MQTT meter then listens a window after its uplink). The ground truth changes from the
hour a command executed (the last hour the carrying uplink reported): a closed valve
freezes the register (no consumption) and sets the valve flag on the following readings,
an open valve restores consumption; a clock set removes the drift accumulated so far from
the later uplinks. A rotate_key switches the meter's keys from then on: `oms_keys` holds
the AES key its later frames are encrypted with, `oscore` the context its later requests
are protected with (the answer itself still goes under the old one: the collector accepts
both until the device confirms).

A reporting change is recorded (`reporting` in `commands.json`: the meter's interval from
the hour it executed) but does not change the schedule's cadence: the schedule is built,
seeded and sorted for the whole run before the first uplink (`simulator.schedule`), every
uplink is one daily report of whole truth hours, and the truth, the billing check and the
backlog model all count in those hours; a meter changing cadence mid-run would need the
schedule rebuilt around it. The readings the truth expects are the same either way.

`lifecycle(records, states)` is what `sim verify` prints and checks (`commands.json`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from decoder.columns import Flag
from simulator.commands import CommandExecutor
from simulator.fleet import Format, Transport
from simulator.schedule import Event, Uplink
from simulator.truth import Truth

COMMANDS_FILE = "commands.json"
MUTE_TTL_S = 60  # the API's shortest TTL: a mute meter's command expires soon after
_TTL_S = 7 * 86_400
_COMMANDABLE = frozenset({Format.CJT188, Format.SENML, Format.INTERVAL})
_REACHABLE = frozenset({Transport.COAP_CON, Transport.MQTT_QOS1})
Queue = Callable[[str, str, dict[str, Any], str, int], Awaitable[int]]


@dataclass
class Planned:
    """One command of the run: to `meter` at virtual `at_s`; `command_id` once queued."""

    meter: int
    address: str
    at_s: int
    kind: str
    args: dict[str, Any]
    key: str
    mute: bool = False
    command_id: int = 0
    executed_h: int = -1  # truth hour it took effect from (-1: never executed)
    executions: int = 0
    reporting: dict[str, int] = field(default_factory=dict)  # the interval from then on
    via: str = ""  # coap or mqtt: how the meter gets it


def plan(
    truth: Truth, oscore: set[str], n_valve: int, mqtt: set[str] | frozenset[str] = frozenset()
) -> list[Planned]:
    """The commands of a run (see the module docstring); [] when `n_valve` is 0."""
    if n_valve <= 0:
        return []
    spec, hours = truth.fleet.spec, truth.fleet.spec.hours
    # a district's meters are left alone: a valve closed on one of its customers (or its
    # bulk meter) after the bulk's register was drawn would read as a district loss
    faulty = {f.meter for f in truth.faults} | {
        i for d in truth.districts for i in (d.bulk, *d.customers)
    }
    drift = {f.meter for f in truth.faults_of("clock_drift")}

    def reachable(m: Any) -> bool:
        return (
            (m.transport is Transport.COAP_CON and m.address in oscore)
            or (m.transport is Transport.MQTT_QOS1 and m.address in mqtt)
        ) and m.installed_h == 0 and m.removed_h >= hours  # fmt: skip

    def fit(m: Any) -> bool:
        return reachable(m) and m.format in _COMMANDABLE

    at = [spec.start_s + hours * 3600 * k // 6 for k in range(7)]
    out: list[Planned] = []
    calm = [m for m in truth.meters if fit(m) and m.index not in faulty]
    coap = [m for m in calm if m.transport is Transport.COAP_CON]
    by_mqtt = [m for m in calm if m.transport is Transport.MQTT_QOS1]
    turns = [m for pair in itertools.zip_longest(coap, by_mqtt) for m in pair if m is not None]
    valve = turns[:n_valve]
    for m in valve:
        for when, action in ((at[2], "close"), (at[4], "open")):
            out.append(Planned(m.index, m.address, when, "valve", {"action": action},
                               f"sim-valve-{action}-{m.address}"))  # fmt: skip
    for m in (m for m in truth.meters if fit(m) and m.index in drift):
        out.append(Planned(m.index, m.address, at[3], "clock", {}, f"sim-clock-{m.address}"))
    taken = {m.index for m in valve}
    plain = [m for m in coap if m.index not in taken and m.format is not Format.CJT188][:2]
    for i, m in enumerate(plain):
        args = {"interval_s": 1800 if i == 0 else 7200}
        out.append(Planned(m.index, m.address, at[1], "reporting", args,
                           f"sim-reporting-{m.address}", mute=i == 1))  # fmt: skip
    taken |= {m.index for m in plain}
    quiet = [m for m in truth.meters if reachable(m) and m.index not in faulty | taken]
    oms = [m for m in quiet if m.format is Format.OMS and m.transport is Transport.COAP_CON]
    other = [m for m in quiet if m.format is not Format.OMS and m.transport is Transport.COAP_CON]
    for m, key in ((oms[:1], "aes"), (other[:1], "oscore")):
        for one in m:
            out.append(Planned(one.index, one.address, at[3], "rotate_key", {"key": key},
                               f"sim-rotate-{key}-{one.address}"))  # fmt: skip
    for p in out:
        p.via = "mqtt" if truth.meters[p.meter].transport.is_mqtt else "coap"
    return sorted(out, key=lambda p: (p.at_s, p.meter))


@dataclass
class CommandDriver:
    """Queues the planned commands, runs each meter's executor, applies the effects."""

    truth: Truth
    planned: list[Planned]
    queue: Queue  # (address, kind, args, idempotency key, ttl_s) -> command id
    registers: np.ndarray[Any, Any] | None = None  # the sender's, updated in place
    executors: dict[int, CommandExecutor] = field(default_factory=dict)
    clock_base_s: dict[int, int] = field(default_factory=dict)
    oms_keys: dict[int, bytes] = field(default_factory=dict)  # a rotated OMS AES key
    oscore: dict[int, dict[str, str]] = field(default_factory=dict)  # a rotated context
    _base_steps: np.ndarray[Any, Any] | None = None

    def __post_init__(self) -> None:
        for p in self.planned:
            if p.meter not in self.executors:
                m = self.truth.meters[p.meter]
                self.executors[p.meter] = CommandExecutor(m.address, str(m.format))
            self.executors[p.meter].mute |= p.mute
        self._base_steps = self.truth.steps.copy()

    def events(self) -> list[Event]:
        """(virtual instant, queue this command) pairs in time order."""
        return [Event(p.at_s, self._queuer(p), frozenset({p.meter})) for p in self.planned]

    def _queuer(self, p: Planned) -> Callable[[], Awaitable[None]]:
        async def go() -> None:
            ttl = MUTE_TTL_S if p.mute else _TTL_S
            p.command_id = await self.queue(p.address, p.kind, p.args, p.key, ttl)

        return go

    def awaits(self, up: Uplink) -> bool:
        """True while `up`'s meter has a command queued (at or before `up`) that it has
        not executed yet: it listens for it after this uplink."""
        return any(
            p.meter == up.meter and p.command_id and not p.executions and p.at_s <= up.send_s
            for p in self.planned
        )

    def adjust(self, up: Uplink) -> Uplink:
        """`up` as the meter sends it now: its clock less the drift a clock set removed."""
        base = self.clock_base_s.get(up.meter)
        if base is None or up.resend_of >= 0:
            return up
        return dataclasses.replace(up, clock_offset_s=up.clock_offset_s - base)

    def answer(self, up: Uplink, payload: bytes) -> bytes | None:
        """Run the commands in a 2.04's `payload` on `up`'s meter; its answer or None."""
        ex = self.executors.get(up.meter)
        if ex is None or not payload:
            return None
        before = dict(ex.executed)
        hour = max(0, (up.send_s - self.truth.fleet.spec.start_s) // 3600)
        hour = min(hour, self.truth.fleet.spec.hours)
        reply = ex.handle(payload, up.send_s)
        for cid, n in ex.executed.items():
            if n > before.get(cid, 0):
                self._took_effect(up, cid, hour, n)
        return reply

    def _took_effect(self, up: Uplink, cid: int, hour: int, n: int) -> None:
        p = next((p for p in self.planned if p.command_id == cid), None)
        if p is None:  # a command the run did not queue (another client's): no truth change
            return
        p.executed_h, p.executions = hour, n
        m, steps, flags = up.meter, self.truth.steps, self.truth.flags
        if p.kind == "valve":
            assert self._base_steps is not None
            closed = p.args["action"] == "close"
            steps[m, hour:] = 0 if closed else self._base_steps[m, hour:]
            if closed:
                flags[m, hour + 1 :] |= np.uint32(Flag.VALVE_CLOSED)
            else:
                flags[m, hour + 1 :] &= ~np.uint32(Flag.VALVE_CLOSED)
            self._refresh(m)
        elif p.kind == "clock":
            self.clock_base_s[m] = up.clock_offset_s + self.clock_base_s.get(m, 0)
        elif p.kind == "rotate_key":
            state = self.executors[m].state
            if state.aes_key is not None:
                self.oms_keys[m] = state.aes_key
            if state.oscore is not None:
                self.oscore[m] = state.oscore
        elif p.kind == "reporting":  # recorded, the cadence stays (module docstring)
            p.reporting = {"interval_s": self.executors[m].state.interval_s, "from_h": hour}

    def _refresh(self, m: int) -> None:
        if self.registers is None:
            return
        meter = self.truth.meters[m]
        units = self.truth.initial_units[m] + np.concatenate(
            ([0], np.cumsum(self.truth.steps[m], dtype=np.int64))
        )
        self.registers[m] = (units % meter.register.modulus_units) * meter.unit_ml

    def save(self, directory: Path) -> None:
        """Write `commands.json`: what was planned, queued and executed."""
        rows = [dataclasses.asdict(p) for p in self.planned]
        (directory / COMMANDS_FILE).write_text(json.dumps(rows, indent=1) + "\n")


def load(directory: Path) -> list[Planned]:
    """The run's commands ([] for a run without)."""
    try:
        rows = json.loads((directory / COMMANDS_FILE).read_text())
    except FileNotFoundError:
        return []
    return [Planned(**r) for r in rows]


@dataclass(frozen=True)
class Lifecycle:
    """`sim verify`'s command table and the problems found (empty: all as expected)."""

    lines: list[str]
    problems: list[str]

    @property
    def ok(self) -> bool:
        """True when every command ended as the truth says it must."""
        return not self.problems


def lifecycle(planned: list[Planned], states: dict[int, dict[str, Any]]) -> Lifecycle:
    """Check each command against the mailbox's view (`states`: command id -> API body).

    An answering meter's command must be executed exactly once and `acknowledged`; a
    mute meter's executed once and still `sent` (TTL not yet passed) or `expired` with
    `ttl_passed_unanswered`; a command never executed must not be acknowledged.
    """
    problems: list[str] = []
    count: dict[str, int] = {}
    for p in planned:
        st = states.get(p.command_id, {})
        state = st.get("state", "missing")
        count[state] = count.get(state, 0) + 1
        what = f"command {p.command_id} {p.kind} {p.args} to {p.address}"
        if not p.command_id:
            problems.append(f"{p.kind} to {p.address}: never queued")
        elif p.executions > 1:
            problems.append(f"{what}: executed {p.executions} times")
        elif p.executions == 0 and state in ("acknowledged", "failed"):
            problems.append(f"{what}: {state} but never executed")
        elif p.mute and p.executions == 1:
            ok = state == "sent" or (
                state == "expired" and st.get("reason") == "ttl_passed_unanswered"
            )
            if not ok:
                problems.append(f"{what}: mute meter, state {state} {st.get('reason')}")
        elif p.executions == 1 and state != "acknowledged":
            problems.append(f"{what}: executed, state {state} {st.get('reason')}")
        elif p.executions == 0:
            problems.append(f"{what}: never delivered (state {state})")
        wanted = p.args.get("interval_s")
        if p.kind == "reporting" and p.reporting and p.reporting["interval_s"] != wanted:
            problems.append(f"{what}: the meter's interval became {p.reporting}")
    mute = sorted({p.address for p in planned if p.mute})
    lines = [
        f"commands      {len(planned)} queued: "
        + ", ".join(f"{k} {v}" for k, v in sorted(count.items())),
        f"  {'kind':<11}{'args':<20}{'via':<6}{'meter':<28}{'id':>6} {'exec h':>6} {'runs':>4}"
        "  state",
    ]
    for p in planned:
        st = states.get(p.command_id, {})
        args = ",".join(f"{k}={v}" for k, v in p.args.items()) or "-"
        state = st.get("state", "missing") + (f" ({st['reason']})" if st.get("reason") else "")
        lines.append(
            f"  {p.kind:<11}{args:<20}{p.via or '-':<6}{p.address:<28}{p.command_id:>6} "
            f"{p.executed_h:>6} {p.executions:>4}  {state}"
        )
    delivered = sum(1 for p in planned if p.executions)
    once = sum(p.executions == 1 for p in planned)
    lines.append(
        f"  delivered {delivered}, executed exactly once {once}, "
        f"acknowledged {count.get('acknowledged', 0)}, expired {count.get('expired', 0)}, "
        f"never-answering meters {len(mute)}" + (f" ({', '.join(mute)})" if mute else "")
    )
    lines += [f"  COMMAND {x}" for x in problems[:20]]
    return Lifecycle(lines, problems)
