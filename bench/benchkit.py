"""What the CoAP benches share: a raw-UDP load generator, a scratch database, process figures.

- `LoadGenerator` sends CoAP datagrams taken from a `Source` over `sockets` source ports,
  keeping at most `window` CONs outstanding: closed loop (the next one goes as soon as
  one is answered: finds the saturation rate) or paced (`rate` per second, open loop, as
  a fleet that reports on its own schedule). A source gives whole datagrams whose token
  is 4 bytes long; the generator writes its own Message ID and token into each, so
  precomputed messages (OSCORE-protected ones included: RFC 8613 leaves Message ID and
  token outside the protection) can be sent as they are. It records each answer's code
  and its time since the first transmission (retransmissions after 2 s included).
- `scratch_database` / `drop_database`: a migrated database of its own on the server.
- `cpu_s`, `rss_mb`, `batch_stats`, `watcher`: what a process or the collector spent.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import secrets
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit

import asyncpg

ROOT = Path(__file__).resolve().parents[1]
if sys.path[:1] != [str(ROOT)]:  # first: bench/collector.py must not shadow the package
    sys.path.insert(0, str(ROOT))

from storage.migrate import migrate  # noqa: E402

CHANGED = 0x44  # 2.04
SERVICE_UNAVAILABLE = 0xA3  # 5.03
TOKEN = b"\0\0\0\0"  # the placeholder token of a source's datagrams (TKL 4)


def coap_post(payload: bytes, query: bytes = b"", *, path: bytes = b"u") -> bytes:
    """A CON POST to /`path` with `payload` (Message ID 0, token `TOKEN`; RFC 7252 §3)."""
    head = bytes([0x44, 0x02]) + b"\0\0" + TOKEN + bytes([0xB0 | len(path)]) + path
    if query:  # Uri-Query (15): delta 4 after Uri-Path (11), extended length past 12
        head += (
            bytes([0x4D, len(query) - 13]) + query
            if len(query) >= 13
            else bytes([0x40 | len(query)]) + query
        )
    return head + b"\xff" + payload


def stamp(template: bytes, mid: int, token: bytes) -> bytes:
    """`template` (a CoAP message with a 4-byte token) with this Message ID and token."""
    return template[:2] + struct.pack("!H", mid) + token + template[8:]


class Source(Protocol):
    """Datagrams to send, each with a 4-byte token; None when there are no more."""

    def next_datagram(self) -> bytes | None:
        """The next datagram, or None."""

    def remaining(self) -> int:
        """How many are left (any positive number for an endless source)."""


class ListSource:
    """Datagrams from a list, in order (a resent one goes to the end)."""

    def __init__(self, datagrams: list[bytes]) -> None:
        self._items = datagrams[::-1]

    def next_datagram(self) -> bytes | None:
        """The next datagram, or None."""
        return self._items.pop() if self._items else None

    def again(self, datagram: bytes) -> None:
        """Send `datagram` once more, after the others (a device backing off)."""
        self._items.insert(0, datagram)

    def remaining(self) -> int:
        """How many are left."""
        return len(self._items)


class _Loader(asyncio.DatagramProtocol):
    """One UDP socket of the load generator."""

    def __init__(self, gen: LoadGenerator) -> None:
        self.gen = gen
        self.transport: asyncio.DatagramTransport | None = None
        # token -> (first sent, next retransmission due, tries, template, datagram as sent)
        self.outstanding: dict[bytes, tuple[float, float, int, bytes, bytes]] = {}
        self.mids: dict[int, bytes] = {}  # Message ID -> token, for empty ACKs
        # RFC 7252 §4.4: a sender must not reuse a Message ID within EXCHANGE_LIFETIME
        # (247 s), or the server answers it from its deduplication cache; random MIDs
        # collide within seconds at this rate, sequential ones last 65536 / rate per socket
        self.mid = secrets.randbelow(65536)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the socket."""
        self.transport = transport  # type: ignore[assignment]

    def send_next(self) -> bool:
        """Send the source's next datagram; False when it has none."""
        template = self.gen.source.next_datagram()
        if template is None:
            return False
        self.mid = (self.mid + 1) & 0xFFFF
        self.gen.tokens += 1
        token = self.gen.tokens.to_bytes(4, "big")
        datagram = stamp(template, self.mid, token)
        now = time.monotonic()
        self.outstanding[token] = (now, now + _ack_timeout(0), 0, template, datagram)
        self.mids[self.mid] = token
        assert self.transport is not None
        self.transport.sendto(datagram)
        self.gen.sent += 1
        return True

    def datagram_received(self, data: bytes, addr: object) -> None:
        """Count the answer, acknowledge a separate response, refill the window."""
        assert self.transport is not None
        mtype, code = (data[0] >> 4) & 3, data[1]
        if mtype == 0:  # separate response as CON: ACK it
            self.transport.sendto(bytes([0x60, 0]) + data[2:4])
        if code == 0:  # an empty ACK: the answer comes later as a CON; stop retransmitting
            acked = self.mids.pop(int.from_bytes(data[2:4], "big"), None)
            sent = self.outstanding.get(acked or b"")
            if sent is not None and acked is not None:  # wait for it, then give up
                self.outstanding[acked] = (
                    sent[0],
                    time.monotonic() + 60,
                    _MAX_RETRANSMIT,
                    *sent[3:],
                )
            return
        token = data[4 : 4 + (data[0] & 0x0F)]
        sent = self.outstanding.pop(token, None)
        if sent is None:
            return
        self.gen.answered(code, sent[0], sent[3])
        if self.gen.closed_loop and self.gen.running:
            self.send_next()

    def retransmit(self) -> None:
        """Resend unacknowledged CONs as RFC 7252 §4.2 says (ACK_TIMEOUT 2 s, doubling)."""
        now = time.monotonic()
        assert self.transport is not None
        for token, (first, due, tries, template, datagram) in list(self.outstanding.items()):
            if now >= due and tries < _MAX_RETRANSMIT:  # the same Message ID: deduplicated
                self.outstanding[token] = (
                    first,
                    now + _ack_timeout(tries + 1),
                    tries + 1,
                    template,
                    datagram,
                )
                self.transport.sendto(datagram)
                self.gen.retransmitted += 1
            elif now >= due:  # MAX_RETRANSMIT reached: given up (counted as code 0)
                del self.outstanding[token]
                self.gen.answered(0, first, template)


_MAX_RETRANSMIT = 4


def _ack_timeout(tries: int) -> float:
    # RFC 7252 §4.8: ACK_TIMEOUT 2 s times a random factor up to ACK_RANDOM_FACTOR 1.5
    return 2.0 * (1 + random.random() * 0.5) * 2**tries


Watch = Callable[[], Awaitable[dict[str, list[int]]]]


@dataclass
class Measured:
    """What one run of the generator saw: answers, their times, CPU per uplink by group."""

    rate: float  # 2.04 answers per second
    done: int  # 2.04 answers counted
    elapsed_s: float
    cpu_per_uplink_s: dict[str, float]
    latencies_s: list[float] = field(default_factory=list)
    finished: list[float] = field(default_factory=list)  # monotonic time of each 2.04
    answers: dict[int, int] = field(default_factory=dict)
    retransmitted: int = 0

    def us(self, group: str) -> float:
        """CPU µs per answered uplink of process group `group`."""
        return self.cpu_per_uplink_s.get(group, 0.0) * 1e6

    def bulk_rate(self) -> float:
        """2.04s per second between the 10th and the 90th percentile of completions: the
        sustained rate, without the ramp-up and the retransmission tail of a finite run."""
        if len(self.finished) < 20:
            return self.rate
        lo, hi = (
            self.finished[len(self.finished) // 10],
            self.finished[len(self.finished) * 9 // 10],
        )
        return (len(self.finished) * 8 // 10) / max(hi - lo, 1e-9)

    def percentile_ms(self, q: float) -> float:
        """The `q`th percentile of the answer times, in ms."""
        if not self.latencies_s:
            return 0.0
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] * 1e3


class LoadGenerator:
    """Sends a source's datagrams to 127.0.0.1 (see the module docstring)."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.answers: dict[int, int] = {}
        self.latencies: list[float] = []
        self.finished: list[float] = []  # when each 2.04 arrived
        self.running = True
        self.closed_loop = True
        self.tokens = secrets.randbelow(1 << 30)
        self.sent = self.retransmitted = 0

    def answered(self, code: int, first_sent: float, template: bytes) -> None:
        """Count an answer; a 5.03 puts the datagram back (the device retries later)."""
        self.answers[code] = self.answers.get(code, 0) + 1
        if code == CHANGED:
            now = time.monotonic()
            self.latencies.append(now - first_sent)
            self.finished.append(now)
        elif code == SERVICE_UNAVAILABLE and isinstance(self.source, ListSource):
            self.source.again(template)

    async def run(
        self,
        port: int,
        *,
        window: int,
        sockets: int,
        watch: Watch,
        seconds: float | None = None,
        rate: float | None = None,
        warmup_s: float = 0.0,
        limit_s: float = 900.0,
        progress_s: float = 0.0,
    ) -> Measured:
        """Drive 127.0.0.1:`port`; stop after `seconds`, or when the source and the
        window are empty (`limit_s` at most). CPU of the watched pids from after warm-up."""
        loop = asyncio.get_running_loop()
        loaders: list[_Loader] = []
        self.answers, self.latencies, self.finished, self.running = {}, [], [], True
        self.closed_loop = rate is None
        for _ in range(sockets):
            _, proto = await loop.create_datagram_endpoint(
                lambda: _Loader(self), remote_addr=("127.0.0.1", port)
            )
            loaders.append(proto)
        per_socket = max(1, window // sockets)
        if rate is None:
            for proto in loaders:
                for _ in range(per_socket):
                    if not proto.send_next():
                        break
        if warmup_s:
            await asyncio.sleep(warmup_s)
        pids = await watch()
        ok0, lat0, started = self.answers.get(CHANGED, 0), len(self.latencies), time.monotonic()
        cpu0 = {pid: cpu_s(pid) for group in pids.values() for pid in group}
        paced = 0
        last_retransmit = last_progress = started
        while True:
            now = time.monotonic()
            if seconds is not None and now - started >= seconds:
                break
            if now - started > limit_s:
                print(f"# stopped after limit_s={limit_s:.0f}", flush=True)
                break
            outstanding = sum(len(p.outstanding) for p in loaders)
            if rate is not None:
                due = int(rate * (now - started)) - paced
                i = 0
                while due > 0 and outstanding < window:
                    if not loaders[i % sockets].send_next():
                        break  # none left now (a 5.03 may put one back)
                    i, due, paced, outstanding = i + 1, due - 1, paced + 1, outstanding + 1
            elif rate is None and outstanding < window and self.running:
                # answered windows refill in datagram_received; this refills after a 5.03
                for proto in loaders:
                    while len(proto.outstanding) < per_socket and proto.send_next():
                        pass
            if seconds is None and outstanding == 0 and not self.source.remaining():
                break
            if progress_s and now - last_progress > progress_s:
                print(
                    f"# t={now - started:.0f}s sent={self.sent} ok={self.answers.get(CHANGED, 0)}"
                    f" outstanding={outstanding} left={self.source.remaining()}",
                    flush=True,
                )
                last_progress = now
            if now - last_retransmit > 0.5:
                for proto in loaders:
                    proto.retransmit()
                last_retransmit = now
            await asyncio.sleep(0.005 if rate is not None else 0.1)
        elapsed = time.monotonic() - started
        done = self.answers.get(CHANGED, 0) - ok0
        # backends connected during the run count whole (their connection set-up too)
        for g, group in (await watch()).items():
            pids[g] = sorted({*pids.get(g, []), *group})
        cpu = {g: sum(cpu_s(p) - cpu0.get(p, 0.0) for p in group) for g, group in pids.items()}
        self.running = False
        await asyncio.sleep(0.5)
        for proto in loaders:
            assert proto.transport is not None
            proto.transport.close()
        return Measured(
            done / elapsed,
            done,
            elapsed,
            {g: c / max(done, 1) for g, c in cpu.items()},
            self.latencies[lat0:],
            self.finished[lat0:],
            dict(self.answers),
            self.retransmitted,
        )


def cpu_s(pid: int) -> float:
    """utime + stime of `pid` in seconds (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int, field: str = "VmHWM") -> float:
    """VmHWM (peak RSS) or VmRSS of `pid`, MiB (0 once it is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    for line in text.splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return 0.0


def load_average() -> str:
    """The machine's 1/5/15-minute load averages."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def free_udp_port() -> int:
    """A free loopback UDP port."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_tcp_port() -> int:
    """A free loopback TCP port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


BARE = """
import asyncio, sys, aiocoap, aiocoap.resource as r
class U(r.Resource):
    async def render_post(self, request):
        return aiocoap.Message(code=aiocoap.CHANGED)
async def main():
    site = r.Site(); site.add_resource(["u"], U())
    await aiocoap.Context.create_server_context(
        site, bind=("127.0.0.1", int(sys.argv[1])), transports=["udp6"])
    await asyncio.get_running_loop().create_future()
asyncio.run(main())
"""


def start_bare_aiocoap(port: int) -> subprocess.Popen[bytes]:
    """A bare aiocoap server whose /u answers 2.04 at once (the ceiling of the CoAP stack)."""
    return subprocess.Popen([sys.executable, "-c", BARE, str(port)])


PROFILE = os.environ.get("NBMETER_BENCH_PROFILE")  # a path: cProfile each collector there
_profiled = itertools.count(1)


def start_collector(
    db_url: str, port: int, metrics_port: int, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """`python -m collector.main` on 127.0.0.1:`port` (CoAP only), JSON logs to /dev/null."""
    full = dict(
        os.environ,
        NBMETER_DATABASE_URL=db_url,
        NBMETER_METRICS_PORT=str(metrics_port),
        NBMETER_COAP__HOST="127.0.0.1",
        NBMETER_COAP__PORT=str(port),
        NBMETER_LOG_JSON="true",
        PYTHONPATH=str(ROOT),
        **(env or {}),
    )
    full.pop("NBMETER_MQTT_URL", None)
    # one stats file per collector process, numbered in start order (PROFILE.1, PROFILE.2…)
    profile = ["-m", "cProfile", "-o", f"{PROFILE}.{next(_profiled)}"] if PROFILE else []
    return subprocess.Popen(
        [sys.executable, *profile, "-m", "collector.main"],
        env=full,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM `proc` and wait for it (the collector drains and exits)."""
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def wait_ready(proc: subprocess.Popen[bytes], metrics_port: int, limit_s: float = 60) -> None:
    """Wait until the collector answers on its metrics port (it binds CoAP before that)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            msg = f"the collector exited with {proc.returncode}"
            raise RuntimeError(msg)
        try:
            batch_stats([metrics_port])
        except OSError:
            await asyncio.sleep(0.2)
            continue
        await asyncio.sleep(0.5)
        return
    msg = f"the collector did not start within {limit_s:.0f} s"
    raise RuntimeError(msg)


def batch_stats(metrics_ports: list[int]) -> tuple[float, float, float, float]:
    """(batches, uplinks) committed and (queries, key ids) of OSCORE context lookups so
    far, summed over the collectors' /metrics."""
    batches = uplinks = lookups = kids = 0.0
    for port in metrics_ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith("nbmeter_collector_batch_uplinks_count"):
                    batches += float(line.split()[-1])
                elif line.startswith("nbmeter_collector_batch_uplinks_sum"):
                    uplinks += float(line.split()[-1])
                elif line.startswith("nbmeter_collector_oscore_lookups_total"):
                    lookups += float(line.split()[-1])
                elif line.startswith("nbmeter_collector_oscore_lookup_kids_total"):
                    kids += float(line.split()[-1])
    return batches, uplinks, lookups, kids


async def scratch_database(server_url: str, prefix: str = "nbmeter_bench") -> tuple[str, str]:
    """(name, url) of a new database `<prefix>_<random>` on `server_url`'s server, migrated."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    db_url = urlunsplit(urlsplit(server_url)._replace(path=f"/{name}"))
    await migrate(db_url)
    return name, db_url


async def drop_database(server_url: str, name: str) -> None:
    """Drop database `name` (its connections too)."""
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def watcher(server_url: str, db_name: str | None, servers: list[int]) -> Watch:
    """The server pids, and the PostgreSQL backends serving `db_name` (same host)."""

    async def watch() -> dict[str, list[int]]:
        groups = {"server": servers}
        if db_name is not None:
            conn = await asyncpg.connect(server_url)
            try:
                rows = await conn.fetch(
                    "SELECT pid FROM pg_stat_activity WHERE datname = $1", db_name
                )
            finally:
                await conn.close()
            groups["db"] = [int(r[0]) for r in rows if cpu_s(int(r[0])) > 0]
        return groups

    return watch
