"""Send a schedule to a real collector: bounded concurrency, a rate, a virtual clock.

`send_all(truth, uplinks, creds, config)` acts out every uplink on the real transports
(CoAP via `simulator.coap`, MQTT via `simulator.mqtt`) and returns a `Summary`: sent,
acknowledged, retried, lost by the emulated network, timed out, and rejected by reason.

Pacing, in order of precedence:
- `herd`: every uplink of one virtual day is released at once (thundering herd);
- `rate`: uplink i is released at t0 + i / rate (load mode, uplinks per second);
- `speed`: virtual seconds per real second (86400: one simulated day per second);
- none of these: as fast as `concurrency` allows.
One device never has two uplinks in flight (a meter sends one at a time).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from simulator import frames
from simulator.coap import CoapEndpoint, CoapResult, DeviceContext, OscoreCredentials
from simulator.fleet import SECONDS_PER_DAY, Transport
from simulator.mqtt import MqttCredentials, publish
from simulator.network import Delivery
from simulator.schedule import Uplink
from simulator.truth import Truth

BUSY_RETRIES = 3


@dataclass(frozen=True)
class DeviceCredentials:
    """What one simulated device authenticates with (either may be absent)."""

    oscore: OscoreCredentials | None = None
    mqtt: MqttCredentials | None = None


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


@dataclass
class Summary:
    """Counts of what happened on the wire, and per-uplink results by `seq`."""

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

    @property
    def rate(self) -> float:
        """Uplinks handled per real second."""
        return self.total / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def lines(self) -> list[str]:
        """A human summary, one fact per line."""
        rejected = ", ".join(f"{k} {v}" for k, v in sorted(self.rejected.items())) or "none"
        return [
            f"uplinks       {self.total} in {self.elapsed_s:.1f} s ({self.rate:.0f}/s)",
            f"sent          {self.sent} ({self.transmissions} transmissions)",
            f"acknowledged  {self.acknowledged}",
            f"retried       {self.retried} (CoAP retransmissions, MQTT re-deliveries)",
            f"lost          {self.lost} (emulated network)",
            f"timed out     {self.timeouts}",
            f"busy retries  {self.busy}",
            f"rejected      {sum(self.rejected.values())}: {rejected}",
        ]


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


class Sender:
    """Holds the sockets, OSCORE contexts and device locks of one run."""

    def __init__(
        self, truth: Truth, creds: dict[str, DeviceCredentials], config: RunConfig
    ) -> None:
        self.truth, self.creds, self.config = truth, creds, config
        self.registers = truth.register_ml()
        self.endpoints: list[CoapEndpoint] = []
        self.contexts: dict[int, DeviceContext] = {}
        self.locks: dict[int, asyncio.Lock] = {}
        self.summary = Summary()

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
        """Act out one uplink; returns its result word (acked, lost, timeout, reason)."""
        lock = self.locks.setdefault(up.meter, asyncio.Lock())
        async with lock:
            return await self._send(up)

    async def _send(self, up: Uplink) -> str:
        s, meter = self.summary, self.truth.meters[up.meter]
        payload = frames.encode(self.truth, up, self.registers)
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
                s.lost += 1 if up.outcome == "lost" else 0
                s.timeouts += 0 if up.outcome == "lost" else 1
                return "lost" if up.outcome == "lost" else "timeout"
            if result.code.startswith("2."):
                s.acknowledged += 1
                return "acked"
            reason = _reason(result)
            s.rejected[reason] += 1
            return reason
        if up.outcome == "lost":  # MQTT QoS 0 dropped by the emulated network
            s.lost += 1
            return "lost"
        cred = self.creds.get(meter.address)
        if cred is None or cred.mqtt is None:
            s.rejected["no_mqtt_credentials"] += 1
            return "no_mqtt_credentials"
        qos = 1 if meter.transport is Transport.MQTT_QOS1 else 0
        res = await publish(self.config.mqtt_url, cred.mqtt, payload, qos=qos, copies=up.copies)
        s.sent += 1 if res.sent else 0
        s.transmissions += res.sent
        s.retried += max(0, res.sent - 1)
        if res.error:
            s.rejected[res.error.split(" ")[0]] += 1
            return res.error
        s.acknowledged += 1
        return "acked"


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
    events: list[tuple[int, Callable[[], Awaitable[None]]]] | None = None,
) -> Summary:
    """Send every uplink (in schedule order) and return the summary.

    `events` are (virtual instant, action) pairs in time order, such as a meter exchange
    registered with the backend: before the first uplink sent at or after an event's
    instant, every earlier uplink is finished and then the action is awaited.
    """
    sender = Sender(truth, creds, config)
    todo = list(events or [])
    running: set[asyncio.Task[None]] = set()
    await sender.open()
    bar = Progress(len(uplinks), progress)
    release = _release_at(uplinks, config)
    slots = asyncio.Semaphore(config.concurrency)
    started = time.monotonic()

    async def one(i: int, up: Uplink) -> None:
        delay = started + release(i) - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            sender.summary.results[up.seq] = await sender.send(up)
        except Exception as exc:
            sender.summary.rejected[type(exc).__name__] += 1
            sender.summary.results[up.seq] = f"error: {exc}"
        finally:
            slots.release()
            bar.step(sender.summary)

    try:
        async with asyncio.TaskGroup() as tg:
            for i, up in enumerate(uplinks):
                while todo and todo[0][0] <= up.send_s:
                    if running:
                        await asyncio.wait(running)
                    await todo.pop(0)[1]()
                await slots.acquire()
                task = tg.create_task(one(i, up), name=f"uplink-{up.seq}")
                running.add(task)
                task.add_done_callback(running.discard)
    finally:
        sender.close()
    sender.summary.total = len(uplinks)
    sender.summary.elapsed_s = time.monotonic() - started
    return sender.summary
