"""Collector throughput: bare aiocoap vs the nbmeter collector (with storage), same load.

    python bench/collector.py [--seconds 10] [--window 400] [--sockets 16] [--sustain-s 60]

Needs NBMETER_DATABASE_URL (a TimescaleDB server; a scratch database is created and
dropped). The load generator is a raw-UDP CoAP client keeping `window` CONs outstanding
over `sockets` source ports; every uplink is an interval-batch frame (`nbm1`: a register
plus 23 hourly deltas = 24 readings) for a distinct (meter, day), so every reading is new.
It measures, one after the other: a bare aiocoap server whose /u answers 2.04 at once;
the collector in one process; the collector in two processes sharing the port
(SO_REUSEPORT); then (`--sustain-s`, default 60) one collector at full rate, printing its
RSS every 10 s to show it levels off (the CoAP dedup table is bounded by EXCHANGE_LIFETIME
and `dedup_max_entries`). Each line has CPU time per uplink (server process; for the
collector also its PostgreSQL backends, `db_cpu`), less noisy than rates on a shared
2-core machine, and the collector's mean uplinks per committed batch (from /metrics).
Then `cpu_ratio_vs_bare_aiocoap=` and `ratio_vs_bare_aiocoap=<1 process / bare>`.

The mailbox runs (issue 13; `--downlink-only` runs just these, `--no-downlink` skips them):
the same uplinks protected with OSCORE (every meter gets a context; commands go only to
authenticated devices), one collector, alternating runs with no pending command and with
10 % of the meters holding one (a valve close that stays `sent`, so each of their uplinks
claims it and carries it on its 2.04). Last lines: median uplinks/s and CPU per uplink of
each, `cpu_ratio_10pct_pending_vs_none=` and `ratio_10pct_pending_vs_none=` (target >= 0.9).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiocoap
import asyncpg
import numpy as np
from aiocoap import oscore

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit import (
    Watch,
    batch_stats,
    coap_post,
    cpu_s,
    drop_database,
    free_tcp_port,
    free_udp_port,
    rss_mb,
    scratch_database,
    stamp,
    start_bare_aiocoap,
    start_collector,
    wait_ready,
    watcher,
)

from collector.downlink import Downlinks
from decoder import kernels
from storage import credentials

DAY = 86_400


class Loader(asyncio.DatagramProtocol):
    """One UDP socket of the load generator: keeps its share of the window in flight."""

    def __init__(self, gen: LoadGenerator, window: int) -> None:
        self.gen, self.window = gen, window
        self.transport: asyncio.DatagramTransport | None = None
        self.outstanding: dict[bytes, tuple[float, bytes]] = {}
        # RFC 7252 §4.4: a sender must not reuse a Message ID within EXCHANGE_LIFETIME
        # (247 s), or the server answers it from its deduplication cache; random MIDs
        # collide within seconds at this rate, sequential ones last 65536 / rate per socket
        self.mid = secrets.randbelow(65536)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Fill the window."""
        self.transport = transport  # type: ignore[assignment]
        for _ in range(self.window):
            self.send_next()

    def send_next(self) -> None:
        """Send a new uplink."""
        token = secrets.token_bytes(4)
        self.mid = (self.mid + 1) & 0xFFFF
        datagram = self.gen.datagram(self.mid, token)
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
    """Distinct interval-batch uplinks for `addresses`, a day each, going back in time.

    Payloads are made in bulk with numpy (a chunk at a time), so the generator spends its
    CPU on sockets, not on building frames: the machine has 2 cores for everything.
    """

    def __init__(self, slug: str, addresses: list[str]) -> None:
        self.query = f"t={slug}".encode()
        self.addresses = addresses
        self.n = 0
        self.answers: dict[int, int] = {}
        self.running = True
        self.base = (int(time.time()) // DAY - 2) * DAY
        self._ready: list[bytes] = []
        # nbm1 head per meter: magic, version 1, K=23, BCD address low byte first
        self._heads = np.array(
            [list(b"NI" + bytes([1, 23]) + bytes.fromhex(a)[::-1]) for a in addresses], np.uint8
        )

    def datagram(self, mid: int, token: bytes) -> bytes:
        """The next uplink as a CON POST /u?t=<slug> with this MID and token."""
        return stamp(coap_post(self.next_payload(), self.query), mid, token)

    def next_payload(self) -> bytes:
        """The next uplink: meter n % M, day n // M before the base."""
        if not self._ready:
            self._ready = self._chunk(self.n, 20_000)[::-1]
        self.n += 1
        return self._ready.pop()

    def _chunk(self, first: int, count: int) -> list[bytes]:
        n = np.arange(first, first + count, dtype=np.int64)
        m, day = n % len(self.addresses), n // len(self.addresses)
        a = np.zeros((count, 69), np.uint8)
        a[:, :11] = self._heads[m]
        a[:, 11:15] = _le((self.base - day * DAY).astype("<u4"))
        a[:, 15:19] = _le((1000 + day).astype("<u4"))  # litres (1,000,000 mL + 1 L/day)
        a[:, 21:67] = np.tile(np.frombuffer((1).to_bytes(2, "little") * 23, np.uint8), (count, 1))
        crc = kernels.crc16_ccitt(a, 67).astype(">u2")
        a[:, 67:69] = crc.view(np.uint8).reshape(count, 2)
        return [row.tobytes() for row in a]

    async def run(
        self, port: int, seconds: float, window: int, sockets: int, watch: Watch
    ) -> Measured:
        """Drive 127.0.0.1:`port` for `seconds`; 2.04s per second, CPU of the watched pids."""
        loop = asyncio.get_running_loop()
        protos = []
        self.answers, self.running = {}, True
        for _ in range(sockets):
            _, proto = await loop.create_datagram_endpoint(
                lambda: Loader(self, window // sockets), remote_addr=("127.0.0.1", port)
            )
            protos.append(proto)
        await asyncio.sleep(min(2.0, seconds / 5))  # warm-up
        pids = await watch()  # after the warm-up: the collector's pool connections exist
        start_ok, started = self.answers.get(0x44, 0), time.monotonic()
        cpu0 = {pid: cpu_s(pid) for group in pids.values() for pid in group}
        while time.monotonic() - started < seconds:
            await asyncio.sleep(0.5)
            for p in protos:
                p.retransmit()
        elapsed = time.monotonic() - started
        done = self.answers.get(0x44, 0) - start_ok
        cpu = {g: sum(cpu_s(p) - cpu0[p] for p in group) for g, group in pids.items()}
        self.running = False
        await asyncio.sleep(1.0)
        for p in protos:
            assert p.transport is not None
            p.transport.close()
        return Measured(done / elapsed, {g: c / max(done, 1) for g, c in cpu.items()})


@dataclass(frozen=True)
class Measured:
    """Uplinks answered 2.04 per second; CPU seconds per uplink by process group."""

    rate: float
    cpu_per_uplink_s: dict[str, float]


def _le(values: np.ndarray) -> np.ndarray:
    return values.view(np.uint8).reshape(len(values), -1)


async def _setup(server_url: str) -> tuple[str, str, list[str]]:
    """A scratch database with a lab tenant and 2,000 interval meters: (name, url, addresses)."""
    name, db_url = await scratch_database(server_url)
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


def _us(m: Measured, group: str) -> str:
    return f"{m.cpu_per_uplink_s.get(group, 0.0) * 1e6:.0f}"


async def _collectors(
    args: argparse.Namespace,
    gen: LoadGenerator,
    server_url: str,
    name: str,
    db_url: str,
    n: int,
    label: str = "",
    window: int | None = None,
) -> Measured:
    port = free_udp_port()
    metrics_ports = [free_tcp_port() for _ in range(n)]
    servers = [start_collector(db_url, port, mp) for mp in metrics_ports]
    for server, metrics_port in zip(servers, metrics_ports, strict=True):
        await wait_ready(server, metrics_port)
    watch = watcher(server_url, name, [s.pid for s in servers])
    b0 = batch_stats(metrics_ports)
    got = await gen.run(port, args.seconds, window or args.window, args.sockets, watch)
    b1 = batch_stats(metrics_ports)
    rss = max(rss_mb(s.pid) for s in servers)
    for s in servers:
        s.terminate()
    for s in servers:
        s.wait()
    batches = max(b1[0] - b0[0], 1)
    print(
        f"collector_{n}proc{'_' + label if label else ''}_uplinks_per_s={got.rate:.0f}"
        f" readings_per_s={got.rate * 24:.0f}"
        f" cpu_us_per_uplink={_us(got, 'server')} db_cpu_us_per_uplink={_us(got, 'db')}"
        f" uplinks_per_batch={(b1[1] - b0[1]) / batches:.1f} peak_rss_mb={rss:.0f}",
        flush=True,
    )
    return got


async def _sustain(
    args: argparse.Namespace, gen: LoadGenerator, server_url: str, name: str, db_url: str
) -> None:
    port = free_udp_port()
    server = start_collector(db_url, port, 0)
    await asyncio.sleep(2.0)
    watch = watcher(server_url, None, [server.pid])
    run = asyncio.create_task(gen.run(port, args.sustain_s, args.window, args.sockets, watch))
    started = time.monotonic()
    while not run.done():
        await asyncio.sleep(min(10.0, args.sustain_s / 6))
        print(
            f"sustain t={time.monotonic() - started:.0f}s rss_mb={rss_mb(server.pid, 'VmRSS'):.0f}"
            f" peak_rss_mb={rss_mb(server.pid):.0f} uplinks_sent={gen.n}",
            flush=True,
        )
    got = await run
    print(
        f"sustain_uplinks_per_s={got.rate:.0f} final_peak_rss_mb={rss_mb(server.pid):.0f}",
        flush=True,
    )
    server.terminate()
    server.wait()


# --- the downlink mailbox: OSCORE uplinks, 10 % of meters holding a pending command -----


class _DeviceContext(oscore.CanProtect, oscore.CanUnprotect, oscore.SecurityContextUtils):
    """A meter's side of its OSCORE context (RFC 8613), to protect its uplinks."""

    def __init__(self, kid: bytes, secret: bytes, salt: bytes) -> None:
        self.alg_aead = oscore.algorithms["AES-CCM-16-64-128"]
        self.hashfun = oscore.hashfunctions["sha256"]
        self.sender_id, self.recipient_id, self.id_context = kid, b"\x00", None
        self.derive_keys(salt, secret)
        self.sender_sequence_number = 0
        self.recipient_replay_window = oscore.ReplayWindow(32, lambda: None)
        self.recipient_replay_window.initialize_empty()

    def post_seqnoincrease(self) -> None:
        """Nothing to persist: the bench's contexts live one run."""


class OscoreGenerator(LoadGenerator):
    """The same uplinks, each protected with its meter's OSCORE context, ahead of the run
    (protecting costs the generator ~100 us, which would otherwise load the shared cores);
    the MID and the 4-byte token are outer fields (not protected) and are set at send time.
    """

    def __init__(self, addresses: list[str], contexts: list[_DeviceContext]) -> None:
        super().__init__("bench", addresses)
        self.contexts = contexts
        self._protected: list[bytes] = []

    def prepare(self, count: int) -> None:
        """Protect the next `count` uplinks now."""
        out = []
        for _ in range(count):
            meter = self.n % len(self.addresses)
            msg = aiocoap.Message(code=aiocoap.POST, uri_path=("u",), payload=self.next_payload())
            protected, _ = self.contexts[meter].protect(msg)
            protected.mtype, protected.mid, protected.token = aiocoap.CON, 0, bytes(4)
            out.append(protected.encode())  # Message ID and token: set by `datagram`
        self._protected = out[::-1]

    def datagram(self, mid: int, token: bytes) -> bytes:
        """The next protected uplink with this MID and token."""
        if not self._protected:
            self.prepare(1000)  # ran out: protect more now (counted in the generator's CPU)
        return stamp(self._protected.pop(), mid, token)


async def _provision_oscore(db_url: str, key: bytes) -> list[_DeviceContext]:
    """An OSCORE context for every bench meter (stored sealed, as provisioning does)."""
    conn = await asyncpg.connect(db_url)
    try:
        rows = await conn.fetch("SELECT meter_id, tenant_id FROM meters ORDER BY address")
        contexts = []
        for r in rows:
            kid, secret, salt = (
                secrets.token_bytes(6),
                secrets.token_bytes(16),
                secrets.token_bytes(8),
            )
            await credentials.store_oscore(
                conn, key, credentials.MeterRef(r["meter_id"], r["tenant_id"], ""), kid=kid,
                sender_id=b"\x00", master_secret=secret, master_salt=salt,
            )  # fmt: skip
            contexts.append(_DeviceContext(kid, secret, salt))
        return contexts
    finally:
        await conn.close()


async def _claim_path(db_url: str, rounds: int = 200, per_round: int = 30) -> None:
    """The mailbox's own cost, without the network and the machine's other load: the
    collector's claim (collector.downlink.Downlinks) for rounds of `per_round` meters, as
    a committed batch answers them, with no pending command and with 10 % holding one."""
    pool = await asyncpg.create_pool(db_url, min_size=2, max_size=4)
    downlinks = Downlinks(pool)
    ids = [r[0] for r in await pool.fetch("SELECT meter_id FROM meters ORDER BY meter_id")]
    figures = {}
    for label in ("none", "ten_percent", "none", "ten_percent"):
        if label == "none":
            await pool.execute(
                "UPDATE commands SET state = 'cancelled', finished_at = now()"
                " WHERE state IN ('queued', 'sent')"
            )
        else:
            await pool.execute(
                "INSERT INTO commands (tenant_id, meter_id, kind, setting, args, created_by,"
                " expires_at) SELECT tenant_id, meter_id, 'valve', 'valve',"
                " '{\"action\": \"close\"}', 'bench', now() + interval '1 hour'"
                " FROM meters WHERE meter_id % 10 = 0"
            )
        cpu0, wall0, envelopes = time.process_time(), time.perf_counter(), 0
        for k in range(rounds):
            first = k * per_round % len(ids)
            got = await asyncio.gather(
                *(downlinks.for_meter(m) for m in ids[first : first + per_round])
            )
            envelopes += sum(1 for g in got if g)
        n = rounds * per_round
        cpu_us, wall_us = (
            (time.process_time() - cpu0) / n * 1e6,
            (time.perf_counter() - wall0) / n * 1e6,
        )
        figures.setdefault(label, []).append((cpu_us, wall_us))
        print(
            f"claim_path_{label} cpu_us_per_uplink={cpu_us:.0f}"
            f" wall_us_per_uplink={wall_us:.0f} envelopes={envelopes}",
            flush=True,
        )
    await pool.close()
    cpu = {k: min(c for c, _ in v) for k, v in figures.items()}
    print(f"claim_path_cpu_ratio_none_vs_10pct={cpu['none'] / max(cpu['ten_percent'], 1e-9):.2f}")


async def _downlinks(args: argparse.Namespace, server_url: str, name: str, db_url: str) -> None:
    """Collector uplinks/s over OSCORE with no pending command and with 10 % of the meters
    holding one (each of their uplinks claims it and carries it on its 2.04), alternated
    (`--downlink-runs`, default ABBA BAAB), `--downlink-window` CONs outstanding; the
    ratios compare the medians."""
    key_text = credentials.new_key()
    key = credentials.parse_key(key_text)
    conn = await asyncpg.connect(db_url)
    addresses = [r[0] for r in await conn.fetch("SELECT address FROM meters ORDER BY address")]
    await conn.close()
    gen = OscoreGenerator(addresses, await _provision_oscore(db_url, key))
    os.environ["NBMETER_CREDENTIALS_KEY"] = key_text  # the collectors started below
    runs: dict[str, list[Measured]] = {"none": [], "ten_percent": []}
    for label in args.downlink_runs.split(","):
        conn = await asyncpg.connect(db_url)
        if label == "ten_percent":  # valve close for every 10th meter; stays pending (sent)
            await conn.execute(
                "INSERT INTO commands (tenant_id, meter_id, kind, setting, args, created_by,"
                " expires_at) SELECT tenant_id, meter_id, 'valve', 'valve',"
                " '{\"action\": \"close\"}', 'bench', now() + interval '1 hour'"
                " FROM meters WHERE meter_id % 10 = 0"
            )
        else:
            await conn.execute("UPDATE commands SET state = 'cancelled', finished_at = now()"
                               " WHERE state IN ('queued', 'sent')")  # fmt: skip
        await conn.close()
        gen.prepare(int(args.oscore_rate * (args.seconds + 4)))
        got = await _collectors(
            args, gen, server_url, name, db_url, 1, label=f"oscore_{label}",
            window=args.downlink_window,
        )  # fmt: skip
        runs[label].append(got)
    await _claim_path(db_url)
    conn = await asyncpg.connect(db_url)
    sent = await conn.fetchval("SELECT coalesce(sum(attempts), 0) FROM commands")
    await conn.close()
    print(f"downlink_envelopes_sent={sent}")
    if not (runs["none"] and runs["ten_percent"]):
        return
    # alternated runs (ABBA BAAB cancels a linear drift), medians: a shared machine's
    # load drifts
    rate = {k: float(np.median([m.rate for m in v])) for k, v in runs.items()}
    cpu = {k: float(np.median([m.cpu_per_uplink_s["server"] for m in v])) for k, v in runs.items()}
    print(
        f"median_uplinks_per_s none={rate['none']:.0f} ten_percent={rate['ten_percent']:.0f}"
        f" cpu_us_per_uplink none={cpu['none'] * 1e6:.0f}"
        f" ten_percent={cpu['ten_percent'] * 1e6:.0f}"
    )
    print(f"cpu_ratio_10pct_pending_vs_none={cpu['none'] / max(cpu['ten_percent'], 1e-9):.2f}")
    print(f"ratio_10pct_pending_vs_none={rate['ten_percent'] / max(rate['none'], 1e-9):.2f}")


async def main(args: argparse.Namespace) -> None:
    """Run the measurements; print the figures, last line the throughput ratio."""
    server_url = os.environ["NBMETER_DATABASE_URL"]
    name, db_url, addresses = await _setup(server_url)
    try:
        if args.downlink_only:
            await _downlinks(args, server_url, name, db_url)
            return
        gen = LoadGenerator("bench", addresses)
        port = free_udp_port()
        bare = start_bare_aiocoap(port)
        await asyncio.sleep(1.5)
        watch = watcher(server_url, None, [bare.pid])
        base = await gen.run(port, args.seconds, args.window, args.sockets, watch)
        bare.terminate()
        bare.wait()
        print(
            f"bare_aiocoap_uplinks_per_s={base.rate:.0f} cpu_us_per_uplink={_us(base, 'server')}",
            flush=True,
        )
        one = await _collectors(args, gen, server_url, name, db_url, 1)
        if not args.one_process:
            await _collectors(args, gen, server_url, name, db_url, 2)
        if args.sustain_s > 0:
            await _sustain(args, gen, server_url, name, db_url)
        cpu_ratio = base.cpu_per_uplink_s["server"] / max(one.cpu_per_uplink_s["server"], 1e-9)
        print(
            f"cpu_ratio_vs_bare_aiocoap={cpu_ratio:.2f}  (bare CPU/uplink / collector CPU/uplink)"
        )
        print(f"ratio_vs_bare_aiocoap={one.rate / max(base.rate, 1e-9):.2f}")
        if not args.no_downlink:
            await _downlinks(args, server_url, name, db_url)
    finally:
        await drop_database(server_url, name)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--window", type=int, default=400, help="CONs kept outstanding")
    # 16 source ports: at ~2,000 uplinks/s each socket's MIDs wrap after ~500 s > 247 s
    parser.add_argument("--sockets", type=int, default=16)
    parser.add_argument("--sustain-s", type=float, default=60.0, help="0: no sustained run")
    parser.add_argument("--one-process", action="store_true", help="skip the 2-process run")
    parser.add_argument("--downlink-only", action="store_true", help="only the mailbox runs")
    parser.add_argument("--no-downlink", action="store_true", help="skip the mailbox runs")
    parser.add_argument(
        "--downlink-runs",
        default="none,ten_percent,ten_percent,none,ten_percent,none,none,ten_percent",
        help="mailbox runs, in order (ten_percent: 10 %% of meters hold a pending command)",
    )
    # below the load at which answers take over 2 s and CONs are retransmitted: a
    # retransmission storm on a shared machine swamps the difference being measured
    parser.add_argument("--downlink-window", type=int, default=150, help="CONs outstanding")
    parser.add_argument(
        "--oscore-rate", type=float, default=1500, help="uplinks/s to protect ahead per run"
    )
    asyncio.run(main(parser.parse_args()))
