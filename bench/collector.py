"""Collector throughput: bare aiocoap vs the nbmeter collector (with storage), same load.

    python bench/collector.py [--seconds 10] [--window 256] [--sockets 8] [--rss-seconds 0]

Needs NBMETER_DATABASE_URL (a TimescaleDB server; a scratch database is created and
dropped). The load generator is a raw-UDP CoAP client keeping `window` CONs outstanding
over `sockets` source ports; every uplink is an interval-batch frame (`nbm1`: a register
plus 23 hourly deltas = 24 readings) for a distinct (meter, day), so every reading is new.
It measures, one after the other: a bare aiocoap server whose /u answers 2.04 at once;
the collector in one process; the collector in two processes sharing the port
(SO_REUSEPORT). With `--rss-seconds N` it then runs one collector at full rate for N
seconds and prints its peak RSS every 10 s (to see it level off). Last line:
`ratio_vs_bare_aiocoap=<collector 1 process / bare>`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import socket
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from decoder.interval import encode_interval  # noqa: E402
from storage.migrate import migrate  # noqa: E402

DAY = 86_400


def _post(mid: int, token: bytes, payload: bytes, query: bytes) -> bytes:
    # RFC 7252: CON POST, Uri-Path "u" (11), Uri-Query (15, delta 4, extended length)
    head = bytes([0x40 | len(token), 0x02]) + struct.pack("!H", mid) + token + b"\xb1u"
    q = (
        bytes([0x4D, len(query) - 13]) + query
        if len(query) >= 13
        else bytes([0x40 | len(query)]) + query
    )
    return head + q + b"\xff" + payload


class Loader(asyncio.DatagramProtocol):
    """One UDP socket of the load generator: keeps its share of the window in flight."""

    def __init__(self, gen: LoadGenerator, window: int) -> None:
        self.gen, self.window = gen, window
        self.transport: asyncio.DatagramTransport | None = None
        self.outstanding: dict[bytes, tuple[float, bytes]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Fill the window."""
        self.transport = transport  # type: ignore[assignment]
        for _ in range(self.window):
            self.send_next()

    def send_next(self) -> None:
        """Send a new uplink."""
        token = secrets.token_bytes(4)
        datagram = _post(secrets.randbelow(65536), token, self.gen.next_payload(), self.gen.query)
        self.outstanding[token] = (time.monotonic(), datagram)
        assert self.transport is not None
        self.transport.sendto(datagram)

    def datagram_received(self, data: bytes, addr: object) -> None:
        """Count a 2.04, acknowledge separate responses, refill the window."""
        assert self.transport is not None
        mtype, code = (data[0] >> 4) & 3, data[1]
        if mtype == 0:  # separate response as CON: ACK it
            self.transport.sendto(bytes([0x60, 0]) + data[2:4])
        if code == 0:
            return
        token = data[4 : 4 + (data[0] & 0x0F)]
        if self.outstanding.pop(token, None) is None:
            return
        self.gen.answers[code] = self.gen.answers.get(code, 0) + 1
        if self.gen.running:
            self.send_next()

    def retransmit(self) -> None:
        """Resend CONs unanswered for 2 s (RFC 7252 ACK_TIMEOUT)."""
        now = time.monotonic()
        assert self.transport is not None
        for token, (sent, datagram) in list(self.outstanding.items()):
            if now - sent > 2.0:
                self.outstanding[token] = (now, datagram)
                self.transport.sendto(datagram)


class LoadGenerator:
    """Distinct interval-batch uplinks for `addresses`, a day each, going back in time."""

    def __init__(self, slug: str, addresses: list[str]) -> None:
        self.query = f"t={slug}".encode()
        self.addresses = addresses
        self.n = 0
        self.answers: dict[int, int] = {}
        self.running = True
        self.base = (int(time.time()) // DAY - 2) * DAY

    def next_payload(self) -> bytes:
        """The next uplink: meter n % M, day n // M before the base."""
        m, day = self.n % len(self.addresses), self.n // len(self.addresses)
        self.n += 1
        start = self.base - day * DAY
        return encode_interval(self.addresses[m], start, 1_000_000 + day * 1000, [1000] * 23)

    async def run(self, port: int, seconds: float, window: int, sockets: int) -> float:
        """Drive the server at 127.0.0.1:`port` for `seconds`; return 2.04 answers per second."""
        loop = asyncio.get_running_loop()
        protos = []
        self.answers, self.running = {}, True
        for _ in range(sockets):
            _, proto = await loop.create_datagram_endpoint(
                lambda: Loader(self, window // sockets), remote_addr=("127.0.0.1", port)
            )
            protos.append(proto)
        await asyncio.sleep(min(2.0, seconds / 5))  # warm-up
        start_ok, started = self.answers.get(0x44, 0), time.monotonic()
        while time.monotonic() - started < seconds:
            await asyncio.sleep(0.5)
            for p in protos:
                p.retransmit()
        rate = (self.answers.get(0x44, 0) - start_ok) / (time.monotonic() - started)
        self.running = False
        await asyncio.sleep(1.0)
        for p in protos:
            assert p.transport is not None
            p.transport.close()
        return rate


BARE = """
import asyncio, sys, aiocoap, aiocoap.resource as r
class U(r.Resource):
    async def render_post(self, request):
        return aiocoap.Message(code=aiocoap.CHANGED)
async def main():
    site = r.Site(); site.add_resource(["u"], U())
    await aiocoap.Context.create_server_context(site, bind=("127.0.0.1", int(sys.argv[1])))
    await asyncio.get_running_loop().create_future()
asyncio.run(main())
"""


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


PROFILE = os.environ.get("NBMETER_BENCH_PROFILE")  # a path: cProfile the collector there


def _start_collector(db_url: str, port: int) -> subprocess.Popen[bytes]:
    env = dict(
        os.environ,
        NBMETER_DATABASE_URL=db_url,
        NBMETER_METRICS_PORT="0",
        NBMETER_COAP__HOST="127.0.0.1",
        NBMETER_COAP__PORT=str(port),
        NBMETER_LOG_JSON="true",
        PYTHONPATH=str(ROOT),
    )
    env.pop("NBMETER_MQTT_URL", None)
    profile = ["-m", "cProfile", "-o", PROFILE] if PROFILE else []
    return subprocess.Popen(
        [sys.executable, *profile, "-m", "collector.main"],
        env=env,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def _setup(server_url: str) -> tuple[str, str, list[str]]:
    name = f"nbmeter_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(server_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    db_url = urlunsplit(urlsplit(server_url)._replace(path=f"/{name}"))
    await migrate(db_url)
    conn = await asyncpg.connect(db_url)
    slug = "bench"
    tenant = await conn.fetchval(
        "INSERT INTO tenants (slug, name, allow_plain_coap) VALUES"
        " ($1, $1, true) RETURNING tenant_id",
        slug,
    )
    addresses = [f"{i:014d}" for i in range(1, 2001)]
    await conn.copy_records_to_table(
        "meters",
        records=[(tenant, a, "water", "interval") for a in addresses],
        columns=["tenant_id", "address", "kind", "format"],
    )
    await conn.close()
    return name, db_url, addresses


async def _drop(server_url: str, name: str) -> None:
    admin = await asyncpg.connect(server_url)
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.close()


async def _wait_up(port: int) -> None:
    await asyncio.sleep(1.5)
    del port


async def main(args: argparse.Namespace) -> None:
    """Run the three measurements (and the optional RSS run); print the figures."""
    server_url = os.environ["NBMETER_DATABASE_URL"]
    name, db_url, addresses = await _setup(server_url)
    try:
        gen = LoadGenerator("bench", addresses)
        port = _free_udp_port()
        bare = subprocess.Popen([sys.executable, "-c", BARE, str(port)])  # noqa: ASYNC220
        await _wait_up(port)
        bare_rate = await gen.run(port, args.seconds, args.window, args.sockets)
        bare.terminate()
        bare.wait()
        print(f"bare_aiocoap_uplinks_per_s={bare_rate:.0f}", flush=True)

        rates = {}
        for procs in (1, 2):
            port = _free_udp_port()
            servers = [_start_collector(db_url, port) for _ in range(procs)]
            await _wait_up(port)
            rates[procs] = await gen.run(port, args.seconds, args.window, args.sockets)
            rss = max(_peak_rss_mb(s.pid) for s in servers)
            for s in servers:
                s.terminate()
            for s in servers:
                s.wait()
            print(
                f"collector_{procs}proc_uplinks_per_s={rates[procs]:.0f}"
                f" readings_per_s={rates[procs] * 24:.0f} peak_rss_mb={rss:.0f}",
                flush=True,
            )
        if args.rss_seconds > 0:
            port = _free_udp_port()
            server = _start_collector(db_url, port)
            await _wait_up(port)
            task = asyncio.create_task(gen.run(port, args.rss_seconds, args.window, args.sockets))
            while not task.done():
                await asyncio.sleep(10)
                print(
                    f"rss_run t={time.monotonic():.0f} peak_rss_mb={_peak_rss_mb(server.pid):.0f}",
                    flush=True,
                )
            rate = await task
            print(
                f"rss_run_uplinks_per_s={rate:.0f} final_peak_rss_mb="
                f"{_peak_rss_mb(server.pid):.0f}",
                flush=True,
            )
            server.terminate()
            server.wait()
        print(f"ratio_vs_bare_aiocoap={rates[1] / bare_rate:.2f}")
    finally:
        await _drop(server_url, name)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--sockets", type=int, default=8)
    parser.add_argument("--rss-seconds", type=float, default=0.0)
    asyncio.run(main(parser.parse_args()))
