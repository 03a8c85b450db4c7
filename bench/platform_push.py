"""Platform pushes/s and DTLS-PSK uplinks/s beside plain CoAP uplinks/s, one collector.

    python bench/platform_push.py [--seconds 10] [--batch 10] [--concurrency 8]
                                  [--dtls-devices 16]

Needs NBMETER_DATABASE_URL (a TimescaleDB server; a scratch database is created and
dropped). One collector subprocess serves both CoAP (lab tenant, `?t=bench`) and the
platform push endpoint. First the CoAP load of bench/collector.py (raw-UDP CONs, a window
of 400 over 16 sockets), then OneNET batch pushes (`--batch` interval-batch frames per
push, signed as OneNET signs them, `--concurrency` HTTP clients with keep-alive, each
waiting for its 200 before the next push), then DTLS-PSK devices (`--dtls-devices`, each
its own aiocoap client keeping its DTLS session open, as modules do, 4 CONs in flight;
skipped without the `dtls` extra). Every frame is a distinct (meter, day) of 24 readings,
so every reading is new. Prints uplinks/s and CPU per uplink of the collector for each,
then `ratio_platform_uplinks_vs_coap=` and `ratio_dtls_vs_coap=`.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devices.platforms import onenet_body  # noqa: E402
from storage.credentials import MeterRef, new_key, parse_key  # noqa: E402
from storage.dtls import store_psk  # noqa: E402
from storage.platforms import store_secret  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_collector", ROOT / "bench" / "collector.py")
assert _spec is not None
assert _spec.loader is not None
bc = importlib.util.module_from_spec(_spec)
sys.modules["bench_collector"] = bc  # its dataclasses look their module up
_spec.loader.exec_module(bc)

SECRET = b"bench-onenet-token"


async def _provision(db_url: str, key: str, addresses: list[str], dtls_devices: int) -> None:
    conn = await asyncpg.connect(db_url)
    try:
        tenant = await conn.fetchval("SELECT tenant_id FROM tenants WHERE slug = 'bench'")
        await store_secret(conn, parse_key(key), tenant, "onenet", SECRET)
        for address in addresses[:dtls_devices]:  # identity = address, key = its 16 chars
            meter_id = await conn.fetchval(
                "SELECT meter_id FROM meters WHERE address = $1", address
            )
            meter = MeterRef(int(meter_id), int(tenant), address)
            await store_psk(conn, parse_key(key), meter, address, f"k{address}x".encode())
        await conn.execute(
            "INSERT INTO platform_devices (tenant_id, platform, platform_device_id, meter_id)"
            " SELECT tenant_id, 'onenet', 'imei' || address, meter_id FROM meters"
            " WHERE tenant_id = $1",
            tenant,
        )
    finally:
        await conn.close()
    assert addresses


def _start(
    db_url: str, key: str, coap_port: int, http_port: int, dtls_port: int
) -> subprocess.Popen[bytes]:
    env = dict(
        os.environ,
        NBMETER_DATABASE_URL=db_url,
        NBMETER_CREDENTIALS_KEY=key,
        NBMETER_METRICS_PORT="0",
        NBMETER_COAP__HOST="127.0.0.1",
        NBMETER_COAP__PORT=str(coap_port),
        NBMETER_PLATFORM__PORT=str(http_port),
        NBMETER_DTLS__PORT=str(dtls_port),
        NBMETER_LOG_JSON="true",
        PYTHONPATH=str(ROOT),
    )
    env.pop("NBMETER_MQTT_URL", None)
    return subprocess.Popen(
        [sys.executable, "-m", "collector.main"], env=env, stderr=subprocess.DEVNULL, cwd=ROOT
    )


def _address(payload: bytes) -> str:
    return payload[4:11][::-1].hex()  # nbm1: BCD address, low byte first


async def _pushes(
    gen: bc.LoadGenerator, port: int, seconds: float, batch: int, concurrency: int, pid: int
) -> tuple[float, float, float, dict[int, int]]:
    """(pushes/s, uplinks/s, CPU s per uplink of `pid`, answers by status)."""
    answers: dict[int, int] = {}
    done = 0
    stop_at = 0.0

    async def client() -> None:
        nonlocal done
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            n = 0
            while time.monotonic() < stop_at:
                items: list[dict[str, object]] = []
                for _ in range(batch):
                    payload = gen.next_payload()
                    items.append(
                        {
                            "type": 1,
                            "imei": f"imei{_address(payload)}",
                            "at": int(time.time() * 1000),
                            "value": payload.hex(),
                        }
                    )
                n += 1
                body = onenet_body(items, SECRET, f"n{n}")
                reply = await http.post("/p/bench/onenet", content=body)
                answers[reply.status_code] = answers.get(reply.status_code, 0) + 1
                if reply.status_code == 200 and started:
                    done += 1

    started = False
    stop_at = time.monotonic() + 2.0 + seconds
    tasks = [asyncio.create_task(client()) for _ in range(concurrency)]
    await asyncio.sleep(2.0)  # warm-up
    started, t0, cpu0, done = True, time.monotonic(), bc._cpu_s(pid), 0
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - t0
    cpu = bc._cpu_s(pid) - cpu0
    return done / elapsed, done * batch / elapsed, cpu / max(done * batch, 1), answers


async def _dtls(
    addresses: list[str], port: int, seconds: float, pid: int
) -> tuple[float, float, dict[str, int]]:
    """(uplinks/s, CPU s per uplink of `pid`, answers) of one DTLS session per device."""
    import aiocoap

    answers: dict[str, int] = {}
    done = 0
    counting = False
    stop_at = time.monotonic() + 2.0 + seconds
    uri = f"coaps://127.0.0.1:{port}/u"

    async def device(address: str) -> None:
        nonlocal done
        ctx = await aiocoap.Context.create_client_context(transports=["tinydtls"])
        ctx.client_credentials.load_from_dict(
            {
                f"coaps://127.0.0.1:{port}/*": {
                    "dtls": {
                        "psk": {"ascii": f"k{address}x"},
                        "client-identity": {"ascii": address},
                    }
                }
            }
        )
        frames = bc.LoadGenerator("bench", [address])
        frames.base -= 400 * bc.DAY  # days of its own, not the CoAP phase's

        async def lane() -> None:
            nonlocal done
            while time.monotonic() < stop_at:
                msg = aiocoap.Message(code=aiocoap.POST, uri=uri, payload=frames.next_payload())
                reply = await ctx.request(msg).response
                answers[str(reply.code)] = answers.get(str(reply.code), 0) + 1
                done += counting and reply.code == aiocoap.CHANGED

        try:
            await asyncio.gather(*(lane() for _ in range(4)))
        finally:
            await ctx.shutdown()

    tasks = [asyncio.create_task(device(a)) for a in addresses]
    await asyncio.sleep(2.0)  # warm-up: the handshakes
    counting, t0, cpu0, done = True, time.monotonic(), bc._cpu_s(pid), 0
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - t0
    return done / elapsed, (bc._cpu_s(pid) - cpu0) / max(done, 1), answers


async def main(args: argparse.Namespace) -> None:
    """Set up, run CoAP then platform pushes against one collector, print, tear down."""
    server_url = os.environ["NBMETER_DATABASE_URL"]
    name, db_url, addresses = await bc._setup(server_url)
    key = new_key()
    dtls_ok = importlib.util.find_spec("DTLSSocket") is not None
    devices = args.dtls_devices if dtls_ok else 0
    await _provision(db_url, key, addresses, devices)
    coap_port, http_port = bc._free_udp_port(), bc._free_tcp_port()
    dtls_port = bc._free_udp_port() if dtls_ok else 0
    proc = _start(db_url, key, coap_port, http_port, dtls_port)
    try:
        await asyncio.sleep(3.0)
        gen = bc.LoadGenerator("bench", addresses)
        watch = bc._watcher(server_url, None, [proc.pid])
        coap = await gen.run(coap_port, args.seconds, 400, 16, watch)
        print(
            f"coap_uplinks_per_s={coap.rate:.0f}"
            f" cpu_us_per_uplink={coap.cpu_per_uplink_s['server'] * 1e6:.0f}",
            flush=True,
        )
        pushes, uplinks, cpu, answers = await _pushes(
            gen, http_port, args.seconds, args.batch, args.concurrency, proc.pid
        )
        print(
            f"platform_pushes_per_s={pushes:.0f} platform_uplinks_per_s={uplinks:.0f}"
            f" batch={args.batch} concurrency={args.concurrency}"
            f" cpu_us_per_uplink={cpu * 1e6:.0f} answers={answers}",
            flush=True,
        )
        if devices:
            rate, cpu, replies = await _dtls(addresses[:devices], dtls_port, args.seconds, proc.pid)
            print(
                f"dtls_uplinks_per_s={rate:.0f} devices={devices} sessions_kept_open=yes"
                f" cpu_us_per_uplink={cpu * 1e6:.0f} answers={replies}",
                flush=True,
            )
            print(f"ratio_dtls_vs_coap={rate / max(coap.rate, 1e-9):.2f}")
        else:
            print("dtls: skipped (DTLSSocket not installed: pip install '.[dtls]')")
        print(f"ratio_platform_uplinks_vs_coap={uplinks / max(coap.rate, 1e-9):.2f}")
    finally:
        proc.terminate()
        proc.wait()
        await bc._drop(server_url, name)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--dtls-devices", type=int, default=16)
    asyncio.run(main(parser.parse_args()))
