"""Send a schedule to a real collector: bounded concurrency, a rate, a virtual clock.

`send_all(truth, uplinks, creds, config)` acts out every uplink on the real transports
(CoAP via `simulator.coap`, MQTT via `simulator.mqtt`) and returns a `Summary`: sent,
acknowledged, retried, lost by the emulated network, timed out, resent, and refused by
reason. A meter keeps what was not acknowledged and sends it again on its next wake-up
(`simulator.backlog`); after the last scheduled uplink every meter still installed wakes
up once more to empty its log. What is still unacknowledged then is counted by category.

Each uplink's result is one word (`backlog.category`), optionally followed by ": detail":
`acked`; `timeout`, `lost`, `busy`, `server_error`, `unreachable` (the meter keeps the
report); anything else is the collector's refusal reason (final). An exception inside the
simulator is a bug: it is not counted as a result but ends the run with its traceback.

Pacing, in order of precedence:
- `herd`: every uplink of one virtual day is released at once (thundering herd);
- `rate`: uplink i is released at t0 + i / rate (load mode, uplinks per second);
- `speed`: virtual seconds per real second (86400: one simulated day per second);
- none of these: as fast as `concurrency` allows.
One device never has two uplinks in flight (a meter sends one at a time).
"""

from __future__ import annotations

import asyncio
import itertools
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from devices.topics import down_topic, result_topic
from simulator import backlog, frames
from simulator.backlog import ACKED, DeviceLog
from simulator.coap import CoapEndpoint, CoapResult, DeviceContext, OscoreCredentials
from simulator.command_run import CommandDriver
from simulator.dtls import DtlsDevices, describe_exit
from simulator.faults import Outcome
from simulator.fleet import SECONDS_PER_DAY, Transport
from simulator.mqtt import Downlink, MqttCredentials, MqttResult, publish
from simulator.network import Delivery, NetworkModel
from simulator.platform import Message as PlatformMessage
from simulator.platform import PlatformEmulator
from simulator.schedule import Event, Uplink
from simulator.truth import Truth

BUSY_RETRIES = 3
MQTT_WINDOW_S = 10.0  # how long a meter expecting a command listens after its uplink


@dataclass(frozen=True)
class DeviceCredentials:
    """What one simulated device authenticates with (any may be absent)."""

    oscore: OscoreCredentials | None = None
    mqtt: MqttCredentials | None = None
    dtls: tuple[str, str] | None = None  # (PSK identity, PSK text)
    platform_id: str | None = None  # how the operator platform names it (IMEI)


PLATFORM_SECRET = "_platform_secret"  # the tenant's push endpoint secret, in the creds map


@dataclass(frozen=True)
class RunConfig:
    """Where to send and how fast. `time_scale` scales CoAP timeouts and emulated latency."""

    coap_host: str = "127.0.0.1"
    coap_port: int = 5683
    mqtt_url: str = "mqtt://127.0.0.1:1883"
    tenant: str = "sim"
    plain_coap: bool = False
    concurrency: int = 64
    rate: float | None = None
    speed: float | None = None
    herd: bool = False
    time_scale: float = 0.5
    sockets: int = 32
    network: NetworkModel | None = None  # the emulated network resends go through
    coaps_port: int = 5684  # DTLS-PSK meters (coap_host)
    dtls_timeout_s: float = 30.0  # a DTLS meter's wait for its answer (handshake included)
    platform_url: str = "http://127.0.0.1:8443"  # the collector's push endpoint


@dataclass
class Summary:
    """Counts of what happened on the wire, and per-uplink results by `seq`.

    `sent_as` holds the scheduled uplinks that were sent widened over a backlog, and
    `resends` the uplinks added for backlogs: `uplinks(scheduled)` is what was sent.
    `unacked` counts by category the reports still unacknowledged at the end (the last
    result of each); `refused_good` lists refusals of readings the truth expects stored.
    """

    total: int = 0
    sent: int = 0
    transmissions: int = 0
    acknowledged: int = 0
    retried: int = 0
    lost: int = 0
    timeouts: int = 0
    busy: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    results: dict[int, str] = field(default_factory=dict)
    elapsed_s: float = 0.0
    sent_as: dict[int, Uplink] = field(default_factory=dict)
    resends: list[Uplink] = field(default_factory=list)
    unacked: Counter[str] = field(default_factory=Counter)
    refused_good: list[tuple[int, str]] = field(default_factory=list)
    adjusted: dict[int, Uplink] = field(default_factory=dict)  # sent as a command changed it
    # command answers: POSTed to /c (by CoAP code), published on MQTT res ("mqtt res")
    answers: Counter[str] = field(default_factory=Counter)
    # exit status of each DTLS client process that ended unasked (simulator.dtls)
    dtls_crashes: list[int] = field(default_factory=list)

    @property
    def rate(self) -> float:
        """Uplinks handled per real second."""
        return self.total / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def ok(self) -> bool:
        """True when the collector refused no reading the truth expects it to store.

        A timeout, a 5.03 or a 5.00 is not a failure of the run: the meter resends, and
        `sim verify` judges what was stored. Whatever stayed unacknowledged is reported.
        """
        return not self.refused_good

    def uplinks(self, scheduled: list[Uplink]) -> list[Uplink]:
        """What was sent: the schedule (widened where a backlog rode along), then resends."""
        got = self.adjusted
        return [got.get(u.seq) or self.sent_as.get(u.seq, u) for u in scheduled] + sorted(
            self.resends, key=lambda u: u.seq
        )

    def lines(self) -> list[str]:
        """A human summary, one fact per line."""
        rejected = ", ".join(f"{k} {v}" for k, v in sorted(self.rejected.items())) or "none"
        unacked = ", ".join(f"{k} {v}" for k, v in sorted(self.unacked.items())) or "none"
        widened = len({u.seq for u in self.sent_as.values()})
        out = [
            f"uplinks       {self.total} in {self.elapsed_s:.1f} s ({self.rate:.0f}/s)",
            f"sent          {self.sent} ({self.transmissions} transmissions)",
            f"acknowledged  {self.acknowledged}",
            f"retried       {self.retried} (CoAP retransmissions, MQTT re-deliveries)",
            f"lost          {self.lost} (emulated network)",
            f"timed out     {self.timeouts} (no answer; the meter keeps the report)",
            f"busy retries  {self.busy}",
            f"resent        {len(self.resends)} frames of their own, {widened} reports "
            "widened over a backlog (next wake-up)",
            f"unacknowledged {sum(self.unacked.values())} reports at the end: {unacked}",
            f"rejected      {sum(self.rejected.values())}: {rejected}",
        ]
        if self.dtls_crashes:
            how = ", ".join(describe_exit(code) for code in self.dtls_crashes)
            out.append(
                f"DTLS client   {len(self.dtls_crashes)} processes crashed ({how}); the "
                "uplinks each had in flight count as timed out"
            )
        if self.answers:
            out.append(
                "command answers " + ", ".join(f"{k} {v}" for k, v in sorted(self.answers.items()))
            )
        if self.refused_good:
            out.append(
                f"REFUSED       {len(self.refused_good)} uplinks of good readings: "
                + ", ".join(f"#{seq} {why}" for seq, why in self.refused_good[:10])
            )
        return out


class Progress:
    """A single stderr status line, rewritten in place on a terminal (every 10% otherwise)."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total, self.enabled, self.done = total, enabled, 0
        self._tty = sys.stderr.isatty()
        self._started = time.monotonic()
        self._last = 0.0
        self._last_decile = -1

    def step(self, summary: Summary) -> None:
        """Count one finished uplink and maybe redraw."""
        self.done += 1
        if not self.enabled:
            return
        now = time.monotonic()
        decile = 10 * self.done // max(1, self.total)
        if self._tty and now - self._last < 0.2 and self.done < self.total:
            return
        if not self._tty and decile == self._last_decile:
            return
        self._last, self._last_decile = now, decile
        rate = self.done / max(now - self._started, 1e-9)
        line = (
            f"[{self.done:>{len(str(self.total))}}/{self.total}] "
            f"{100 * self.done / max(1, self.total):5.1f}%  {rate:6.0f}/s  "
            f"acked {summary.acknowledged}  rejected {sum(summary.rejected.values())}  "
            f"lost {summary.lost}  timeouts {summary.timeouts}"
        )
        print(("\r" if self._tty else "") + line, end="" if self._tty else "\n", file=sys.stderr)
        if self._tty and self.done >= self.total:
            print(file=sys.stderr)


def _reason(result: CoapResult) -> str:
    """The collector's machine-readable reason (`reason: detail` payload) or the code."""
    text = result.payload.decode("utf-8", "replace")
    head = text.split(":", 1)[0].strip()
    return head if head and " " not in head else f"coap {result.code}"


def _mqtt_result(res: MqttResult) -> str:
    """The result word of a publish (see the module docstring)."""
    if res.acked:  # the broker holds a copy (QoS 1 PUBACK, or QoS 0 written)
        return ACKED
    if res.error.startswith("TimeoutError"):
        return f"timeout: {res.error}"
    if res.error.startswith("connect refused (3)"):  # MQTT 3.1.1: server unavailable
        return f"unreachable: {res.error}"
    if res.error.startswith("connect refused"):  # bad credentials, not authorised
        return f"mqtt_refused: {res.error}"
    return f"unreachable: {res.error}"


class Sender:
    """Holds the sockets, OSCORE contexts, device locks and device logs of one run."""

    def __init__(
        self, truth: Truth, creds: dict[str, DeviceCredentials], config: RunConfig,
        first_resend_seq: int = 1 << 40,
    ) -> None:  # fmt: skip
        self.truth, self.creds, self.config = truth, creds, config
        self.registers = truth.register_ml()
        self.endpoints: list[CoapEndpoint] = []
        self.contexts: dict[int, DeviceContext] = {}
        self.locks: dict[int, asyncio.Lock] = {}
        self.logs: dict[int, DeviceLog] = {}
        self.seqs_start = first_resend_seq  # resends are numbered from here on
        self.seqs = itertools.count(first_resend_seq)
        self.summary = Summary()
        self.commands: CommandDriver | None = None  # the run's commands (simulator.command_run)
        self.rotated: dict[int, dict[str, str]] = {}  # the OSCORE context each meter now uses
        self.dtls = DtlsDevices(config.coap_host, config.coaps_port, config.dtls_timeout_s)
        secret = creds.get(PLATFORM_SECRET)
        self.platform = (
            PlatformEmulator(
                "onenet", config.platform_url, config.tenant, secret.platform_id,
                batch_max=1, time_scale=config.time_scale,
            )
            if secret is not None and secret.platform_id
            else None
        )  # fmt: skip

    async def open(self) -> None:
        """Open the CoAP sockets (each is one device 'address')."""
        for _ in range(self.config.sockets):
            self.endpoints.append(
                await CoapEndpoint.open(self.config.coap_host, self.config.coap_port)
            )

    def close(self) -> None:
        """Close every socket."""
        for ep in self.endpoints:
            ep.close()

    def _context(self, meter: int) -> DeviceContext | None:
        if self.config.plain_coap:
            return None
        if meter not in self.contexts:
            cred = self.creds.get(self.truth.meters[meter].address)
            if cred is None or cred.oscore is None:
                return None
            self.contexts[meter] = DeviceContext(cred.oscore)
        return self.contexts[meter]

    async def send(self, up: Uplink) -> str:
        """One wake-up of `up`'s meter: its backlog, then `up`; returns `up`'s result."""
        async with self.locks.setdefault(up.meter, asyncio.Lock()):
            log = self.logs.setdefault(up.meter, DeviceLog())
            plan = backlog.plan_wake_up(
                self.truth, log.take(), up, self.seqs, network=self.config.network
            )
            result = ""
            for item in plan:
                result = await self._one(item, log)
            return result

    async def flush(self, meter: int) -> None:
        """The meter's wake-up after the run: send its log, keep what fails again."""
        async with self.locks.setdefault(meter, asyncio.Lock()):
            log = self.logs.setdefault(meter, DeviceLog())
            plan = backlog.plan_wake_up(
                self.truth, log.take(), None, self.seqs,
                send_s=backlog.flush_s(self.truth, meter), network=self.config.network,
            )  # fmt: skip
            for item in plan:
                await self._one(item, log)

    async def _one(self, up: Uplink, log: DeviceLog) -> str:
        """Send one planned uplink, record its result and log it again if not acked."""
        s = self.summary
        if self.commands is not None:
            moved = self.commands.adjust(up)
            if moved is not up and up.resend_of < 0:
                s.adjusted[up.seq] = moved
            up = moved
        if up.resend_of >= 0:
            if up.seq >= self.seqs_start:
                s.resends.append(up)
            else:
                s.sent_as[up.seq] = up
        result = await self._send(up)
        s.results[up.seq] = result
        word = backlog.category(result)
        transport = self.truth.meters[up.meter].transport
        if backlog.keeps(transport, result):
            log.keep(up)
        elif word != ACKED and word not in backlog.KEPT:
            s.rejected[word] += 1
            if up.outcome is Outcome.STORED and up.claimed == up.meter and not up.corrupt:
                s.refused_good.append((up.seq, result))
        return result

    async def _send(self, up: Uplink) -> str:
        s, meter = self.summary, self.truth.meters[up.meter]
        keys = self.commands.oms_keys if self.commands is not None else None
        payload = frames.encode(self.truth, up, self.registers, keys)
        if meter.transport is Transport.COAP_DTLS:
            return await self._send_dtls(up, payload)
        if meter.transport is Transport.PLATFORM_ONENET:
            return await self._send_platform(up, payload)
        extra = up.copies - 1
        if meter.transport.is_coap:
            delivery = Delivery(up.lost_transmissions, False, up.outcome == "lost", up.latency_ms)
            if delivery.lost and meter.transport is Transport.COAP_NON:
                s.lost += 1
                return "lost"
            context = self._context(up.meter)
            query = () if context else (f"t={self.config.tenant}",)
            ep = self.endpoints[up.meter % len(self.endpoints)]
            for _ in range(BUSY_RETRIES + 1):
                result = await ep.post(
                    payload, confirmable=meter.transport is Transport.COAP_CON, query=query,
                    context=context, delivery=delivery, extra_copies=extra,
                    time_scale=self.config.time_scale,
                )  # fmt: skip
                s.transmissions += result.transmissions
                s.sent += 1 if result.transmissions else 0
                s.retried += max(0, result.transmissions - 1)
                if result.code != "5.03":
                    break
                s.busy += 1
                await asyncio.sleep((result.max_age_s or 1) * self.config.time_scale)
                delivery, extra = Delivery(latency_ms=up.latency_ms), 0
            if not result.answered:
                if up.outcome == "lost":
                    s.lost += 1
                    return "lost"
                s.timeouts += 1
                return "timeout"
            if result.code.startswith("2."):
                s.acknowledged += 1
                if result.payload and context is not None and self.commands is not None:
                    await self._answer(up, result.payload, ep, context)
                return ACKED
            if result.code == "5.03":
                return f"busy: {_reason(result)}"
            if result.code.startswith("5."):
                return f"server_error: {result.code} {_reason(result)}"
            return _reason(result)
        if up.outcome == "lost":  # MQTT QoS 0 dropped by the emulated network
            s.lost += 1
            return "lost"
        cred = self.creds.get(meter.address)
        if cred is None or cred.mqtt is None:
            return "no_mqtt_credentials"
        qos = 1 if meter.transport is Transport.MQTT_QOS1 else 0
        res = await publish(
            self.config.mqtt_url, cred.mqtt, payload, qos=qos, copies=up.copies,
            downlink=self._downlink(up, cred.mqtt),
        )  # fmt: skip
        if res.answers:
            s.answers["mqtt res"] += res.answers
        s.sent += 1 if res.sent else 0
        s.transmissions += res.sent
        s.retried += max(0, res.sent - 1)
        word = _mqtt_result(res)
        if word == ACKED:
            s.acknowledged += 1
        elif backlog.category(word) == "timeout":
            s.timeouts += 1
        return word

    def _downlink(self, up: Uplink, cred: MqttCredentials) -> Downlink | None:
        """A commandable meter's side of the mailbox for this connection (or None): it
        listens a window after the uplink while it has a command not yet executed."""
        if self.commands is None or up.meter not in self.commands.executors:
            return None
        commands = self.commands
        return Downlink(
            client_id="sim-" + cred.username.replace("/", "-"),
            down=down_topic(cred.topic),
            res=result_topic(cred.topic),
            handle=lambda envelope: commands.answer(up, envelope),
            window_s=MQTT_WINDOW_S * self.config.time_scale if commands.awaits(up) else 0.0,
        )

    async def _answer(
        self, up: Uplink, payload: bytes, ep: CoapEndpoint, context: DeviceContext
    ) -> None:
        """Execute the commands a 2.04 carried; POST the meter's answer to /c (OSCORE)."""
        assert self.commands is not None
        reply = self.commands.answer(up, payload)
        if reply is None:
            return
        result = await ep.post(
            reply, confirmable=True, context=context, time_scale=self.config.time_scale,
            path="c",
        )  # fmt: skip
        # unanswered: the collector sends the command again next window, answered from memory
        self.summary.answers[result.code or "timeout"] += 1
        rotated = self.commands.oscore.get(up.meter)
        if rotated is not None and self.rotated.get(up.meter) is not rotated:
            # the answer went under the old context; from now on the meter speaks the new
            # one (its first request under the new kid confirms it if the answer was lost)
            self.rotated[up.meter] = rotated
            self.contexts[up.meter] = DeviceContext(OscoreCredentials.from_hex(rotated))

    async def _send_dtls(self, up: Uplink, payload: bytes) -> str:
        s, meter = self.summary, self.truth.meters[up.meter]
        cred = self.creds.get(meter.address)
        if cred is None or cred.dtls is None:
            return "no_dtls_credentials"
        for _ in range(BUSY_RETRIES + 1):
            result = await self.dtls.post(meter.address, cred.dtls, payload)
            s.sent += 1
            s.transmissions += 1
            if result.code != "5.03":
                break
            s.busy += 1
            await asyncio.sleep((result.max_age_s or 1) * self.config.time_scale)
        return self._coap_word(result)

    def _coap_word(self, result: CoapResult) -> str:
        s = self.summary
        if not result.answered:
            s.timeouts += 1
            return "timeout"
        if result.code.startswith("2."):
            s.acknowledged += 1
            return ACKED
        if result.code == "5.03":
            return f"busy: {_reason(result)}"
        if result.code.startswith("5."):
            return f"server_error: {result.code} {_reason(result)}"
        return _reason(result)

    async def _send_platform(self, up: Uplink, payload: bytes) -> str:
        s, meter = self.summary, self.truth.meters[up.meter]
        cred = self.creds.get(meter.address)
        if self.platform is None or cred is None or cred.platform_id is None:
            return "no_platform_identity"
        # the meter's CoAP reached the platform (acknowledged there); the push is the
        # platform's: its verdict is what the meter's report became
        got, pushes = await self.platform.send(
            PlatformMessage(cred.platform_id, payload, time.time())
        )
        s.sent += 1
        s.transmissions += pushes
        s.retried += max(0, pushes - 1)
        if got == "acked":
            s.acknowledged += 1
            return ACKED
        if got.startswith("refused: "):  # "refused: 403 identity_mismatch" -> the reason
            return got.split(" ", 2)[-1] or got
        return f"busy: {got}"  # dropped after the platform's retries: resent next wake-up

    async def aclose(self) -> None:
        """Close the sockets and the DTLS sessions."""
        self.close()
        await self.dtls.close()


def _release_at(ups: list[Uplink], config: RunConfig) -> Callable[[int], float]:
    """Seconds after the start at which uplink i may go."""
    first = ups[0].send_s if ups else 0
    if config.herd:
        return lambda i: 0.0 if config.speed is None else (
            (ups[i].send_s - first) // SECONDS_PER_DAY * SECONDS_PER_DAY / config.speed
        )  # fmt: skip
    if config.rate:
        rate = config.rate
        return lambda i: i / rate
    if config.speed:
        speed = config.speed
        return lambda i: (ups[i].send_s - first) / speed
    return lambda _i: 0.0


async def send_all(
    truth: Truth,
    uplinks: list[Uplink],
    creds: dict[str, DeviceCredentials],
    config: RunConfig,
    *,
    progress: bool = True,
    events: list[Event] | None = None,
    commands: CommandDriver | None = None,
) -> Summary:
    """Send every uplink (in schedule order) and return the summary.

    `events` are backend actions at virtual instants, in time order, such as a meter
    exchange registered with the backend: before the first uplink sent at or after an
    event's instant, the earlier uplinks of the meters it concerns are finished (the rest
    of the fleet's keep flowing: waiting for every uplink in flight meant waiting for the
    slowest retransmission each time) and then the action is awaited.
    `commands` (simulator.command_run) adds its queueing events, executes what a 2.04
    carries and answers it over OSCORE `POST /c`.
    """
    sender = Sender(truth, creds, config, first_resend_seq=len(uplinks))
    todo = list(events or [])
    if commands is not None:  # queued through the API at their virtual instants
        commands.registers = sender.registers
        sender.commands = commands
        todo = sorted(todo + commands.events(), key=lambda e: e.at_s)
    running: dict[int, set[asyncio.Task[None]]] = {}  # a meter's uplinks in flight
    await sender.open()
    bar = Progress(len(uplinks), progress)
    release = _release_at(uplinks, config)
    slots = asyncio.Semaphore(config.concurrency)
    started = time.monotonic()

    async def one(i: int, up: Uplink) -> None:
        delay = started + release(i) - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        try:  # an exception is the simulator's own bug: the task group ends the run with it
            await sender.send(up)
        finally:
            slots.release()
            bar.step(sender.summary)

    async def flush(meter: int) -> None:
        try:
            await sender.flush(meter)
        finally:
            slots.release()

    try:
        async with asyncio.TaskGroup() as tg:
            for i, up in enumerate(uplinks):
                while todo and todo[0].at_s <= up.send_s:
                    event = todo.pop(0)
                    earlier = set().union(*(running.get(m, ()) for m in event.meters))
                    if earlier:
                        await asyncio.wait(earlier)
                    await event.action()
                await slots.acquire()
                task = tg.create_task(one(i, up), name=f"uplink-{up.seq}")
                mine = running.setdefault(up.meter, set())
                mine.add(task)
                task.add_done_callback(mine.discard)
        # the wake-up after the period, for the meters still installed (a removed meter
        # is in the workshop: its log is never sent)
        end_h = truth.fleet.spec.hours
        async with asyncio.TaskGroup() as tg:
            for meter, log in sorted(sender.logs.items()):
                if log.pending and truth.meters[meter].removed_h >= end_h:
                    await slots.acquire()
                    tg.create_task(flush(meter), name=f"flush-{meter}")
    except BaseExceptionGroup as group:
        # a task group wraps what it ends with: show the simulator's own error as it is
        raise (group.exceptions[0] if len(group.exceptions) == 1 else group) from None
    finally:
        await sender.aclose()
    summary = sender.summary
    summary.dtls_crashes = list(sender.dtls.crashes)
    for meter, log in sender.logs.items():
        removed = truth.meters[meter].removed_h < truth.fleet.spec.hours
        for up in log.pending:
            word = backlog.category(summary.results.get(up.seq, ""))
            summary.unacked["removed" if removed else word] += 1
        summary.unacked["log_full"] += len(log.dropped)
    summary.unacked = +summary.unacked  # drop zero counts
    summary.total = len(uplinks)
    summary.elapsed_s = time.monotonic() - started
    return summary
