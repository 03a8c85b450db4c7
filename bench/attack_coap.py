"""CoAP attack run against one collector process (loopback only, bounded): what it costs.

    python bench/attack_coap.py [--malformed 1000000] [--rate 10000] [--block1 100000]
                                [--kids 60000] [--devices 100] [--phase-s 10]

Needs NBMETER_DATABASE_URL (a scratch database is created and dropped) and uses
NBMETER_CREDENTIALS_KEY (or a fresh key). Starts `python -m collector.main` on free
ports with its log in a temporary file (`--collector-root`: another checkout's collector,
for a before/after comparison), then, one after the other:

1. malformed: `--malformed` datagrams at `--rate`/s, mixed: undecodable OSCORE options,
   random OSCORE options, truncated or invalid CoAP headers, bad options, bad Block1
   (undecodable value, unknown transfer, reserved size). Prints the answers by code, the
   number of 5.00 answers and of tracebacks in the log (both must be 0), and the log
   bytes written.
2. block1: `--block1` first blocks (1 KiB, more to come) of distinct transfers from 250
   loopback source addresses, half with a lab tenant, half without; prints the
   collector's RSS before, at its peak and after, and the Block1 state it held.
3. kid flood: `--devices` provisioned OSCORE devices post uplinks one after the other
   for `--phase-s` seconds alone, then again while `--kids` requests with made-up key
   ids arrive at `--rate`/s; prints the good uplinks' p50/p99 in both, and the database
   queries the flood cost.
The last line repeats the figures the acceptance asks for.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import secrets
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aiocoap
import asyncpg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "collector"))

from collector_testkit import DeviceOscore, cjt188_frame, hour  # noqa: E402

from devices.provision import provision_device  # noqa: E402
from storage.credentials import new_key  # noqa: E402
from storage.migrate import migrate  # noqa: E402

# --- datagrams ----------------------------------------------------------------------------


def _opt(delta: int, value: bytes) -> bytes:
    # RFC 7252 §3.1 option header; deltas and lengths here stay below 269
    def nib(v: int) -> tuple[int, bytes]:
        return (v, b"") if v < 13 else (13, bytes([v - 13]))

    d, dx = nib(delta)
    n, nx = nib(len(value))
    return bytes([(d << 4) | n]) + dx + nx + value


def _request(mid: int, options: list[tuple[int, bytes]], payload: bytes = b"") -> bytes:
    token = secrets.token_bytes(4)
    out = bytes([0x44, 0x02]) + struct.pack("!H", mid & 0xFFFF) + token
    last = 0
    for number, value in sorted(options, key=lambda o: o[0]):
        out += _opt(number - last, value)
        last = number
    return out + (b"\xff" + payload if payload else b"")


_BAD_OSCORE = (b"\xe0", b"\x05\x01", b"\x10", b"\x19\x01\x09", b"\x0f", b"\x1f\x00")


def malformed(mid: int, rng: random.Random) -> bytes:
    """One malformed datagram of a kind chosen by `mid` (the mix is in the docstring)."""
    kind = mid % 10
    u = (11, b"u")
    if kind == 0:  # an OSCORE option that does not decode
        return _request(mid, [(9, _BAD_OSCORE[mid % len(_BAD_OSCORE)]), u], b"\0" * 12)
    if kind == 1:  # a random OSCORE option (often a made-up kid)
        opt = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 12)))
        return _request(mid, [(9, opt), u], bytes(rng.getrandbits(8) for _ in range(16)))
    if kind == 2:  # truncated header
        return bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 3)))
    if kind == 3:  # version 0, or a token length over 8
        first = rng.choice((0x04, 0x0F, 0x4F))
        return bytes([first, 0x02]) + struct.pack("!H", mid & 0xFFFF) + b"\0" * 4
    if kind == 4:  # option delta 15 without the payload marker (a format error)
        return _request(mid, [u]) + b"\xf1\x00"
    if kind == 5:  # a Block1 value too long to decode
        return _request(mid, [u, (15, b"t=nobody"), (27, b"\x01\x02\x03\x04")], b"x" * 16)
    if kind == 6:  # a block of a transfer nobody started
        return _request(mid, [u, (15, b"t=lab"), (27, bytes([(5 << 4) | 8]))], b"x" * 16)
    if kind == 7:  # reserved block size (SZX 7 is BERT, TCP only)
        return _request(mid, [u, (15, b"t=nobody"), (27, bytes([0x0F]))], b"x" * 16)
    if kind == 8:  # Block1 on an OSCORE request with an undecodable option
        return _request(mid, [(9, b"\xe0"), u, (27, b"\x08")], b"x" * 16)
    # garbage after a valid header
    return struct.pack("!BBH", 0x40, 0x02, mid & 0xFFFF) + bytes(
        rng.getrandbits(8) for _ in range(rng.randint(1, 40))
    )


# --- sockets ------------------------------------------------------------------------------


class Counting(asyncio.DatagramProtocol):
    """A socket that counts the answers it gets by code (and ACKs separate answers)."""

    def __init__(self, codes: Counter[str]) -> None:
        self.codes = codes
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: object) -> None:
        if len(data) < 4:
            return
        if (data[0] >> 4) & 3 == 0 and self.transport is not None:
            self.transport.sendto(bytes([0x60, 0]) + data[2:4])
        if data[1]:
            self.codes[f"{data[1] >> 5}.{data[1] & 0x1F:02d}"] += 1


async def _sockets(port: int, n: int, codes: Counter[str], local: str = "127.0.0.1") -> list:
    loop = asyncio.get_running_loop()
    out = []
    for _ in range(n):
        transport, _proto = await loop.create_datagram_endpoint(
            lambda: Counting(codes), local_addr=(local, 0), remote_addr=("127.0.0.1", port)
        )
        out.append(transport)
    return out


async def _paced(send: object, total: int, rate: float) -> float:
    """Call send(i) for i in range(total) at about `rate` per second; return seconds."""
    started = time.monotonic()
    chunk = max(1, int(rate / 100))
    for first in range(0, total, chunk):
        for i in range(first, min(total, first + chunk)):
            send(i)  # type: ignore[operator]
        ahead = (first + chunk) / rate - (time.monotonic() - started)
        await asyncio.sleep(max(0.0, ahead))
    return time.monotonic() - started


# --- the collector process ---------------------------------------------------------------


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _metric(port: int, name: str) -> float:
    """Sum of every sample of metric `name` on the collector's /metrics."""
    total = 0.0
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name) and (line[len(name)] in " {"):
                total += float(line.split()[-1])
    return total


class Collector:
    """`python -m collector.main`, log to a file."""

    def __init__(self, db_url: str, key: str, root: Path = ROOT) -> None:
        self.port = _free_port(socket.SOCK_DGRAM)
        self.metrics_port = _free_port(socket.SOCK_STREAM)
        self.log = Path(tempfile.mkstemp(prefix="attack-coap-", suffix=".log")[1])
        env = dict(
            os.environ,
            NBMETER_DATABASE_URL=db_url,
            NBMETER_CREDENTIALS_KEY=key,
            NBMETER_METRICS_PORT=str(self.metrics_port),
            NBMETER_COAP__HOST="127.0.0.1",
            NBMETER_COAP__PORT=str(self.port),
            NBMETER_LOG_JSON="true",
            PYTHONPATH=str(root),
        )
        env.pop("NBMETER_MQTT_URL", None)
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "collector.main"], env=env, stderr=out, cwd=root
            )

    async def ready(self) -> None:
        for _ in range(200):
            try:
                _metric(self.metrics_port, "nbmeter_collector_queue_depth")
                return
            except OSError:
                await asyncio.sleep(0.1)
        raise SystemExit("the collector did not start; its log: " + str(self.log))

    def log_bytes(self) -> int:
        return self.log.stat().st_size

    def tracebacks(self) -> int:
        return self.log.read_text(errors="replace").count("Traceback")

    def stop(self, *, keep_log: bool) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        if keep_log:
            print("collector log kept:", self.log)
        else:
            self.log.unlink(missing_ok=True)


# --- phases -------------------------------------------------------------------------------


async def phase_malformed(args: argparse.Namespace, col: Collector) -> dict[str, object]:
    codes: Counter[str] = Counter()
    # 64 source ports: a socket's MIDs repeat only after 64 x 65,536 datagrams, so each
    # datagram is a new message to the server (not a duplicate answered from its table)
    socks = await _sockets(col.port, 64, codes)
    rng = random.Random(7)
    log0, tb0 = col.log_bytes(), col.tracebacks()

    def send(i: int) -> None:
        socks[i % len(socks)].sendto(malformed(i // len(socks), rng))

    seconds = await _paced(send, args.malformed, args.rate)
    await asyncio.sleep(3)  # stragglers
    for s in socks:
        s.close()
    processed = _metric(col.metrics_port, "nbmeter_collector_coap_rejected_total")
    out = {
        "sent": args.malformed,
        "send_s": round(seconds, 1),
        "answers": dict(sorted(codes.items())),
        "answers_5_00": codes.get("5.00", 0),
        "rejections_counted": int(processed),
        "tracebacks": col.tracebacks() - tb0,
        "log_bytes": col.log_bytes() - log0,
        "logs_suppressed": int(
            _metric(col.metrics_port, "nbmeter_collector_logs_suppressed_total")
        ),
        "collector_alive": col.proc.poll() is None,
    }
    print("malformed:", out, flush=True)
    return out


async def phase_block1(args: argparse.Namespace, col: Collector) -> dict[str, object]:
    codes: Counter[str] = Counter()
    socks = []
    for n in range(2, 252):  # 250 loopback source addresses, one socket each
        socks += await _sockets(col.port, 1, codes, local=f"127.0.0.{n}")
    rss0 = _rss_mb(col.proc.pid)
    peak = rss0
    mids = itertools.count(1)
    chunk = b"b" * 1024

    def send(i: int) -> None:
        options = [(11, b"u"), (15, f"n={i}".encode()), (27, bytes([0x08 | 6]))]
        if i % 2 == 0:
            options.append((15, b"t=lab"))
        socks[i % len(socks)].sendto(_request(next(mids), options, chunk))

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, _rss_mb(col.proc.pid))
            await asyncio.sleep(0.2)

    watcher = asyncio.create_task(watch())
    seconds = await _paced(send, args.block1, args.rate)
    await asyncio.sleep(2)
    held = _metric(col.metrics_port, "nbmeter_collector_block1_transfers")
    watcher.cancel()
    for s in socks:
        s.close()
    out = {
        "starts": args.block1,
        "send_s": round(seconds, 1),
        "answers": dict(sorted(codes.items())),
        "rss_before_mb": round(rss0, 1),
        "rss_peak_mb": round(peak, 1),
        "rss_growth_mb": round(peak - rss0, 1),
        "rss_after_mb": round(_rss_mb(col.proc.pid), 1),
        "transfers_held": int(held),
        "evicted": int(_metric(col.metrics_port, "nbmeter_collector_block1_evicted_total")),
    }
    print("block1:", out, flush=True)
    return out


class GoodDevice:
    """One provisioned device posting its uplinks one after the other, timing each."""

    def __init__(self, values: dict[str, str], address: str) -> None:
        self.ctx = DeviceOscore(values)
        self.address = address
        self.n = 0
        self.mid = secrets.randbelow(65536)

    async def run(self, port: int, until: float, latencies: list[float], bad: Counter[str]):
        loop = asyncio.get_running_loop()
        waiting: dict[bytes, asyncio.Future[bytes]] = {}

        class Proto(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport

            def datagram_received(self, data: bytes, addr: object) -> None:
                if len(data) >= 4 and (data[0] >> 4) & 3 == 0:
                    # a separate CON answer must be ACKed (RFC 7252 §4.2): until it is,
                    # the server holds our next answers back (NSTART 1)
                    self.transport.sendto(bytes([0x60, 0]) + data[2:4])  # type: ignore[attr-defined]
                if len(data) > 4 and data[1]:
                    fut = waiting.pop(data[4 : 4 + (data[0] & 0xF)], None)
                    if fut is not None and not fut.done():
                        fut.set_result(data)

        transport, _ = await loop.create_datagram_endpoint(Proto, remote_addr=("127.0.0.1", port))
        try:
            while time.monotonic() < until:
                self.n += 1
                frame = cjt188_frame(self.address, 10_000 * self.n, hour(self.n))
                msg = aiocoap.Message(code=aiocoap.POST, uri_path=("u",), payload=frame)
                protected, request_id = self.ctx.protect(msg)
                protected.mtype, protected.token = aiocoap.CON, secrets.token_bytes(4)
                self.mid = (self.mid + 1) % 65536
                protected.mid = self.mid
                data = protected.encode()
                fut = waiting[protected.token] = loop.create_future()
                started = time.monotonic()
                answer = None
                for wait_s in (2, 4, 8, 16):  # RFC 7252 retransmission
                    transport.sendto(data)
                    try:
                        answer = await asyncio.wait_for(asyncio.shield(fut), wait_s)
                        break
                    except TimeoutError:
                        continue
                if answer is None:
                    bad["timeout"] += 1
                    continue
                reply = aiocoap.Message.decode(answer)
                if reply.opt.oscore is None:
                    bad[str(reply.code)] += 1
                    continue
                inner, _ = self.ctx.unprotect(reply, request_id)
                if inner.code != aiocoap.CHANGED:
                    bad[str(inner.code)] += 1
                    continue
                latencies.append(time.monotonic() - started)
        finally:
            transport.close()


def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1000


async def phase_kids(
    args: argparse.Namespace, col: Collector, devices: list[GoodDevice]
) -> dict[str, object]:
    results: dict[str, object] = {}
    for label, flood in (("alone", False), ("with_flood", True)):
        latencies: list[float] = []
        bad: Counter[str] = Counter()
        until = time.monotonic() + args.phase_s
        q0 = _metric(col.metrics_port, "nbmeter_collector_oscore_lookups_total")
        tasks = [asyncio.create_task(d.run(col.port, until, latencies, bad)) for d in devices]
        flood_codes: Counter[str] = Counter()
        if flood:
            socks = await _sockets(col.port, 8, flood_codes)
            mids = itertools.count(1)
            rate = args.kids / args.phase_s

            def send(i: int, socks: list = socks, mids: itertools.count = mids) -> None:
                kid = secrets.token_bytes(6)
                opt = bytes([0x09, 0x01]) + kid
                socks[i % len(socks)].sendto(
                    _request(next(mids), [(9, opt), (11, b"u")], b"\0" * 16)
                )

            await _paced(send, args.kids, rate)
        await asyncio.gather(*tasks)
        if flood:
            for s in socks:
                s.close()
        results[label] = {
            "good_uplinks": len(latencies),
            "p50_ms": round(_pct(latencies, 50), 1),
            "p99_ms": round(_pct(latencies, 99), 1),
            "good_failed": dict(bad),
            "lookup_queries": int(
                _metric(col.metrics_port, "nbmeter_collector_oscore_lookups_total") - q0
            ),
            **({"flood_sent": args.kids, "flood_answers": dict(flood_codes)} if flood else {}),
        }
        print(f"kid flood ({label}):", results[label], flush=True)
    return results


# --- setup --------------------------------------------------------------------------------


async def _setup(server_url: str, key: str, n_devices: int) -> tuple[str, str, list[GoodDevice]]:
    name = f"nbmeter_attack_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(server_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    db_url = urlunsplit(urlsplit(server_url)._replace(path=f"/{name}"))
    await migrate(db_url)
    conn = await asyncpg.connect(db_url)
    await conn.execute(
        "INSERT INTO tenants (slug, name, allow_plain_coap) VALUES ('lab', 'lab', true),"
        " ('fleet', 'fleet', false)"
    )
    await conn.close()
    devices = []
    for i in range(n_devices):
        address = f"{i + 1:014d}"
        got = await provision_device(db_url, "fleet", address, credentials_key=key)
        devices.append(GoodDevice(got.oscore, address))
    return name, db_url, devices


async def _drop(server_url: str, name: str) -> None:
    admin = await asyncpg.connect(server_url)
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.close()


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"loadavg {one:.2f}/{five:.2f} on {os.cpu_count()} cores"


async def main(args: argparse.Namespace) -> None:
    server_url = os.environ.get("NBMETER_DATABASE_URL")
    if not server_url:
        raise SystemExit("set NBMETER_DATABASE_URL (eval $(nbmeter stack env))")
    key = os.environ.get("NBMETER_CREDENTIALS_KEY") or new_key()
    name, db_url, devices = await _setup(server_url, key, args.devices)
    col = Collector(db_url, key, Path(args.collector_root) if args.collector_root else ROOT)
    try:
        await col.ready()
        print("machine before:", _load(), flush=True)
        mal = await phase_malformed(args, col)
        blk = await phase_block1(args, col)
        kids = await phase_kids(args, col, devices)
        print("machine after:", _load(), flush=True)
        flood = kids["with_flood"]
        alone = kids["alone"]
        print(
            f"summary: malformed={mal['sent']} answers_5_00={mal['answers_5_00']}"
            f" tracebacks={mal['tracebacks']} log_bytes={mal['log_bytes']}"
            f" block1_starts={blk['starts']} rss_growth_mb={blk['rss_growth_mb']}"
            f" good_p50_ms={alone['p50_ms']}/{flood['p50_ms']}"  # type: ignore[index]
            f" good_p99_ms={alone['p99_ms']}/{flood['p99_ms']}"  # type: ignore[index]
            f" flood_queries={flood['lookup_queries']}"  # type: ignore[index]
        )
    finally:
        col.stop(keep_log=args.keep)
        if args.keep:
            print("scratch database kept:", name)
        else:
            await _drop(server_url, name)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--malformed", type=int, default=1_000_000)
    parser.add_argument("--rate", type=float, default=10_000, help="datagrams per second")
    parser.add_argument("--block1", type=int, default=100_000)
    parser.add_argument("--kids", type=int, default=60_000)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--phase-s", type=float, default=10.0)
    parser.add_argument("--keep", action="store_true", help="keep the database and the log")
    parser.add_argument(
        "--collector-root",
        help="run the collector of another checkout (e.g. the previous release), same load",
    )
    asyncio.run(main(parser.parse_args()))
