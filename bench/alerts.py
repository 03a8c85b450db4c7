"""Alert latency: commit-to-webhook p50/p99 while the collector takes the collector bench's load.

    python bench/alerts.py [--seconds 20] [--alarms-per-s 10] [--window 400] [--sockets 16]

Needs NBMETER_DATABASE_URL (a TimescaleDB server; a scratch database is created and
dropped). One collector process (`collector.main`: its alert dispatcher runs inside it, as
deployed) takes bench/collector.py's load (interval batches, a window of CONs
outstanding) for `--seconds`; meanwhile `--alarms-per-s` uplinks carry a status bit that
opens a new alarm (a fresh (meter, kind) each), and a webhook endpoint of the tenant
points at an HTTP receiver in this process.

Printed per delivered alarm.opened event:
- `commit_to_webhook`: receiver arrival minus the event row's time (clock_timestamp()
  inside the transaction that stores the uplink, so it includes the commit itself);
- `uplink_to_webhook`: receiver arrival minus the CoAP POST's first send (batching too).
Last line: `commit_to_webhook_p99_ms=` and whether it meets the 1 s target.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import secrets
import sys
import time
from datetime import datetime
from pathlib import Path

import asyncpg
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from decoder.interval import encode_interval  # noqa: E402
from storage import webhooks  # noqa: E402
from storage.credentials import parse_key  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_collector", ROOT / "bench" / "collector.py")
assert _spec is not None
assert _spec.loader is not None
bc = importlib.util.module_from_spec(_spec)
sys.modules["bench_collector"] = bc  # its dataclasses look their module up
_spec.loader.exec_module(bc)

KIND_FLAGS = {"leak": 8, "burst": 16, "reverse_flow": 32, "tamper": 64, "low_battery": 4,
              "dry": 128, "meter_error": 256, "valve_abnormal": 2}  # fmt: skip


class Receiver:
    """A minimal HTTP/1.1 keep-alive receiver: records (arrival, body), answers 204."""

    def __init__(self) -> None:
        self.got: list[tuple[float, bytes]] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length)
                self.got.append((time.time(), body))
                writer.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


class AlarmSender(asyncio.DatagramProtocol):
    """CON POSTs of alarm uplinks; remembers each one's first send time; retransmits."""

    def __init__(self, query: bytes) -> None:
        self.query = query
        self.transport: asyncio.DatagramTransport | None = None
        self.waiting: dict[bytes, tuple[float, bytes]] = {}
        self.sent_at: dict[tuple[str, str], float] = {}  # (address, kind) -> first send
        self.mid = secrets.randbelow(65536)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, address: str, kind: str, payload: bytes) -> None:
        token = secrets.token_bytes(4)
        self.mid = (self.mid + 1) & 0xFFFF
        datagram = bc._post(self.mid, token, payload, self.query)
        self.waiting[token] = (time.monotonic(), datagram)
        self.sent_at[(address, kind)] = time.time()
        assert self.transport is not None
        self.transport.sendto(datagram)

    def datagram_received(self, data: bytes, addr: object) -> None:
        assert self.transport is not None
        if (data[0] >> 4) & 3 == 0:  # a separate response as CON: ACK it
            self.transport.sendto(bytes([0x60, 0]) + data[2:4])
        if data[1] == 0x44:  # 2.04
            self.waiting.pop(data[4 : 4 + (data[0] & 0x0F)], None)

    def retransmit(self) -> None:
        now = time.monotonic()
        assert self.transport is not None
        for token, (sent, datagram) in list(self.waiting.items()):
            if now - sent > 2.0:
                self.waiting[token] = (now, datagram)
                self.transport.sendto(datagram)


async def _alarms(sender: AlarmSender, addresses: list[str], rate: float, seconds: float) -> int:
    """Send `rate` alarm uplinks a second for `seconds`, each a new (meter, kind)."""
    hour = int(time.time()) // 3600 * 3600 - 3 * 3600
    pairs = [(a, k) for k in KIND_FLAGS for a in addresses[::-1]]
    n, started = 0, time.monotonic()
    while time.monotonic() - started < seconds and n < len(pairs):
        due = int((time.monotonic() - started) * rate) + 1
        while n < due:
            address, kind = pairs[n]
            frame = encode_interval(address, hour, 5_000_000, [1_000] * 3, KIND_FLAGS[kind])
            sender.send(address, kind, frame)
            n += 1
        sender.retransmit()
        await asyncio.sleep(0.01)
    return n


def _ms(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000, q)) if values else float("nan")


async def main(args: argparse.Namespace) -> None:
    """Set up, load, measure, print; the scratch database is dropped at the end."""
    server_url = os.environ["NBMETER_DATABASE_URL"]
    name, db_url, addresses = await bc._setup(server_url)
    receiver = Receiver()
    server = await asyncio.start_server(receiver.handle, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hook"
    collector = None
    try:
        conn = await asyncpg.connect(db_url)
        tenant = await conn.fetchval("SELECT tenant_id FROM tenants WHERE slug = 'bench'")
        key = parse_key(os.environ["NBMETER_CREDENTIALS_KEY"])  # the collector opens it
        await webhooks.create_endpoint(conn, tenant, url, key=key, event_types=["alarm.opened"])
        await conn.close()
        port = bc._free_udp_port()
        collector = bc._start_collector(db_url, port, bc._free_tcp_port())
        await asyncio.sleep(3.0)  # the collector's pools and LISTEN connection
        loop = asyncio.get_running_loop()
        _, sender = await loop.create_datagram_endpoint(
            lambda: AlarmSender(b"t=bench"), remote_addr=("127.0.0.1", port)
        )
        gen = bc.LoadGenerator("bench", addresses)
        watch = bc._watcher(server_url, name, [collector.pid])
        load, sent = await asyncio.gather(
            gen.run(port, args.seconds, args.window, args.sockets, watch),
            _alarms(sender, addresses, args.alarms_per_s, args.seconds),
        )
        deadline = time.monotonic() + 15
        while len(receiver.got) < sent and time.monotonic() < deadline:
            sender.retransmit()
            await asyncio.sleep(0.1)
        commit, uplink = [], []
        for arrived, body in receiver.got:
            event = json.loads(body)
            commit.append(arrived - datetime.fromisoformat(event["created_at"]).timestamp())
            key = (event["data"]["address"], event["data"]["kind"])
            if key in sender.sent_at:
                uplink.append(arrived - sender.sent_at[key])
        print(f"load_uplinks_per_s={load.rate:.0f} alarms_sent={sent} "
              f"webhooks_received={len(receiver.got)}")  # fmt: skip
        print(f"commit_to_webhook_ms p50={_ms(commit, 50):.1f} p99={_ms(commit, 99):.1f} "
              f"max={_ms(commit, 100):.1f}")  # fmt: skip
        print(f"uplink_to_webhook_ms p50={_ms(uplink, 50):.1f} p99={_ms(uplink, 99):.1f} "
              f"max={_ms(uplink, 100):.1f}")  # fmt: skip
        p99 = _ms(commit, 99)
        print(
            f"commit_to_webhook_p99_ms={p99:.1f} target_1000_ms={'met' if p99 < 1000 else 'MISSED'}"
        )
    finally:
        if collector is not None:
            collector.terminate()
            collector.wait(30)
        server.close()
        await bc._drop(server_url, name)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--alarms-per-s", type=float, default=10.0)
    parser.add_argument("--window", type=int, default=400, help="CONs kept outstanding")
    parser.add_argument("--sockets", type=int, default=16)
    asyncio.run(main(parser.parse_args()))
