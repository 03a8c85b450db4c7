"""Attack run (a script, not a test): poison uplinks mixed with good traffic, then decoder fuzz.

    .venv/bin/python bench/attack_poison.py [--poison 2400] [--good 1200] [--rate 150]
                                            [--mutations 300000] [--receive-maximum 100]

Needs NBMETER_DATABASE_URL (a TimescaleDB server: a scratch database is created, and
dropped at the end) and the `mosquitto` binary (a broker of its own is started on a free
loopback port, so no other collector subscribed to a shared broker takes a copy).

Part 1 drives a real collector (in this process, so the test formats that stand for
decoder bugs are registered in it) at a bounded rate: poison uplinks (poison_corpus:
JSON/CBOR nested past any parser's limit, NUL and surrogate addresses, bytes the database
refuses to archive or even to quarantine (test triggers), frames on which a decoder or
detector raises, the mutation corpus) half over plain CoAP, half over MQTT from two
provisioned devices; good CJ/T 188 uplinks of other meters over CoAP and MQTT in between.
The MQTT Receive Maximum is small (`--receive-maximum`): an unacknowledged poison message
would hold one of those slots. Then the collector is stopped and started again on the same
persistent session: any message still unacknowledged would come again. Printed: good
sent/stored, poison sent/quarantined, CoAP answers by code and the 5.00 count, MQTT
redeliveries (rows beyond one per message), and the throughput.

Part 2 feeds `--mutations` mutated frames (poison_corpus.corpus, every format) to
`decoder.decode_batch` in batches of 64 and prints how many batches raised (must be 0).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import asyncpg
import paho.mqtt.client as paho

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchkit import ROOT, drop_database, scratch_database  # puts ROOT first on sys.path

for helper in ("tests", "tests/collector", "tests/decoder"):  # after the packages
    sys.path.append(str(ROOT / helper))

from brokerkit import free_port, start_broker  # noqa: E402
from collector_testkit import RawCoap, cjt188_frame, hour  # noqa: E402
from poison_corpus import (  # noqa: E402
    REFUSALS_SQL,
    RX,
    corpus,
    poison_uplink,
    register_crashing_formats,
)

from collector.logs import configure_logging  # noqa: E402
from collector.main import run  # noqa: E402
from collector.settings import (  # noqa: E402
    CoapSettings,
    CollectorSettings,
    MqttSettings,
    PipelineSettings,
)
from decoder import decode_batch  # noqa: E402
from devices.broker import prepare_broker_files  # noqa: E402
from devices.provision import ProvisionedDevice, provision_device  # noqa: E402

WAIT_S = 120


async def _lab(conn: asyncpg.Connection) -> tuple[str, int]:
    slug = f"lab-{uuid.uuid4().hex[:10]}"
    tenant = await conn.fetchval(
        "INSERT INTO tenants (slug, name, allow_plain_coap) VALUES ($1, $1, true)"
        " RETURNING tenant_id",
        slug,
    )
    return slug, int(tenant)


class Publisher:
    """One device's MQTT connection publishing QoS 1, counting the broker's PUBACKs."""

    def __init__(self, port: int, device: ProvisionedDevice) -> None:
        self.device = device
        self.sent = 0
        self.acked = 0
        self._lock = threading.Lock()
        self._client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=f"dev-{uuid.uuid4().hex[:8]}",
            protocol=paho.MQTTv5,
        )
        self._client.username_pw_set(device.mqtt["username"], device.mqtt["password"])
        self._client.on_publish = self._on_publish
        self._client.max_queued_messages_set(0)
        self._client.connect("127.0.0.1", port)
        self._client.loop_start()

    def _on_publish(self, _c: object, _u: object, _m: int, reason: object, _p: object) -> None:
        if getattr(reason, "value", 1) == 0:
            with self._lock:
                self.acked += 1

    def publish(self, payload: bytes) -> None:
        """Publish one message (paho's thread sends it)."""
        self.sent += 1
        self._client.publish(self.device.mqtt["topic"], payload, qos=1)

    def close(self) -> None:
        """Disconnect once every message was acknowledged by the broker (or 30 s passed)."""
        deadline = time.monotonic() + 30
        while self.acked < self.sent and time.monotonic() < deadline:
            time.sleep(0.05)
        self._client.disconnect()
        self._client.loop_stop()


async def _post(client: RawCoap, mids: list[int], payload: bytes, query: str) -> list[str]:
    """POST as a device does (a new message ID each time; again after a 5.03): the codes."""
    codes = []
    for _ in range(10):
        mids[0] = (mids[0] + 1) % 65536
        reply = await client.post(payload, mid=mids[0], query=query, timeout_s=WAIT_S)
        codes.append(reply.code_str)
        if reply.code_str != "5.03":
            break
        await asyncio.sleep(1)
    return codes


async def _count(conn: asyncpg.Connection, sql: str, *args: object) -> int:
    return int(await conn.fetchval(sql, *args))


async def _wait(conn: asyncpg.Connection, want: int, sql: str, *args: object) -> int:
    deadline = time.monotonic() + WAIT_S
    got = await _count(conn, sql, *args)
    while got < want and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        got = await _count(conn, sql, *args)
    return got


async def attack(args: argparse.Namespace, db_url: str) -> None:
    """Part 1: the poison mix through a real collector; print the figures."""
    state = Path(tempfile.mkdtemp(prefix="attack-mosquitto-"))
    broker_port = free_port()
    env = prepare_broker_files(state, broker_port)
    broker = start_broker(state, broker_port)
    undo = register_crashing_formats()
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute(REFUSALS_SQL)
        bad_slug, bad_tenant = await _lab(conn)
        dev_slug, _ = await _lab(conn)
        good_slug, good_tenant = await _lab(conn)
        key = env["NBMETER_CREDENTIALS_KEY"]
        admin = env["NBMETER_MQTT_ADMIN_URL"]

        async def provision(slug: str, n: int) -> ProvisionedDevice:
            address = f"{90_000_000_000_000 + n:014d}"
            return await provision_device(
                db_url, slug, address, credentials_key=key, mqtt_admin_url=admin
            )

        bad_devices = [await provision(dev_slug, n) for n in range(2)]
        good_devices = [await provision(good_slug, 10 + n) for n in range(4)]
        meters = [f"{n:014d}" for n in range(1, 101)]
        await conn.copy_records_to_table(
            "meters",
            records=[(good_tenant, a, "water", "cjt188") for a in meters],
            columns=["tenant_id", "address", "kind", "format"],
        )
        settings = CollectorSettings(
            database_url=db_url,
            mqtt_url=env["NBMETER_MQTT_URL"],
            credentials_key=key,  # type: ignore[arg-type]
            metrics_port=0,
            coap=CoapSettings(host="127.0.0.1", port=free_port(socket.SOCK_DGRAM), ack_wait_s=10),
            mqtt=MqttSettings(
                client_id=f"attack-{uuid.uuid4().hex[:8]}",
                share_group="attack",
                session_expiry_s=600,
                receive_maximum=args.receive_maximum,
            ),
            pipeline=PipelineSettings(),
        )

        async def start() -> tuple[asyncio.Event, asyncio.Task[None]]:
            stop, started = asyncio.Event(), asyncio.Event()
            task = asyncio.create_task(run(settings, stop=stop, started=started))
            await asyncio.wait_for(started.wait(), 30)
            return stop, task

        stop, task = await start()
        clients = [await RawCoap.open(settings.coap.port) for _ in range(8)]
        mids = [[n * 8000] for n in range(len(clients))]
        bad_pubs = [Publisher(broker_port, d) for d in bad_devices]
        good_pubs = [Publisher(broker_port, d) for d in good_devices]
        answers: dict[str, Counter[str]] = {"good": Counter(), "poison": Counter()}
        posts: Counter[str] = Counter()
        pending: set[asyncio.Task[None]] = set()

        async def coap(kind: str, n: int, payload: bytes, slug: str) -> None:
            c = n % len(clients)
            codes = await _post(clients[c], mids[c], payload, f"t={slug}")
            answers[kind][codes[-1]] += 1
            answers[kind]["5.03 then retried"] += codes.count("5.03") - (codes[-1] == "5.03")
            posts[kind] += len(codes)

        # the schedule: poison and good uplinks interleaved, alternating transports
        plan: list[tuple[str, int]] = [("poison", i) for i in range(args.poison)]
        plan += [("good", i) for i in range(args.good)]
        plan.sort(key=lambda item: item[1] / (args.poison if item[0] == "poison" else args.good))
        mqtt_good = Counter[int]()
        started_at = time.monotonic()
        for step, (kind, i) in enumerate(plan):
            due = started_at + step / args.rate
            if (delay := due - time.monotonic()) > 0:
                await asyncio.sleep(delay)
            if kind == "poison" and i % 2:
                bad_pubs[(i // 2) % 2].publish(poison_uplink(100_000 + i))
            elif kind == "poison":
                payload = poison_uplink(i, 1000)
                pending.add(asyncio.create_task(coap(kind, i, payload, bad_slug)))
            elif i % 3 == 0:  # a third of the good traffic over MQTT
                pub = good_pubs[i % len(good_pubs)]
                at = mqtt_good[i % len(good_pubs)]
                mqtt_good[i % len(good_pubs)] += 1
                pub.publish(cjt188_frame(pub.device.address, 10_000 * (at + 1), hour(at)))
            else:
                frame = cjt188_frame(meters[i % 100], 10_000 * (i + 1), hour(i // 100))
                pending.add(asyncio.create_task(coap(kind, i, frame, good_slug)))
            pending = {t for t in pending if not t.done()}
        await asyncio.gather(*pending)
        send_s = time.monotonic() - started_at
        for pub in bad_pubs + good_pubs:
            await asyncio.to_thread(pub.close)
        for client in clients:
            client.close()

        good_sent = args.good
        good_stored = await _wait(
            conn,
            good_sent,
            "SELECT count(*) FROM readings r JOIN meters m USING (meter_id) WHERE m.tenant_id = $1",
            good_tenant,
        )
        poison_coap = await _wait(
            conn,
            posts["poison"],
            "SELECT count(*) FROM quarantine WHERE tenant_id = $1",
            bad_tenant,
        )
        poison_mqtt_sent = sum(p.sent for p in bad_pubs)
        ids = [d.meter_id for d in bad_devices]
        by_device = "SELECT count(*) FROM quarantine WHERE meter_id = ANY($1::bigint[])"
        poison_mqtt = await _wait(conn, poison_mqtt_sent, by_device, ids)
        # the poison devices' own good frames still come through
        for pub in (Publisher(broker_port, d) for d in bad_devices):
            pub.publish(cjt188_frame(pub.device.address, 70_000, hour(5)))
            await asyncio.to_thread(pub.close)
        own = "SELECT count(*) FROM readings WHERE meter_id = ANY($1::bigint[])"
        own_stored = await _wait(conn, 2, own, ids)
        drained_s = time.monotonic() - started_at
        stop.set()
        await asyncio.wait_for(task, 60)
        stop, task = await start()  # same client id: the broker's session for it
        await asyncio.sleep(5)
        after_restart = await _count(conn, by_device, ids) - poison_mqtt
        stop.set()
        await asyncio.wait_for(task, 60)
        total_500 = answers["good"]["5.00"] + answers["poison"]["5.00"]
        print(f"load: {len(plan)} uplinks at {args.rate}/s planned, sent in {send_s:.1f} s,"
              f" all stored or quarantined after {drained_s:.1f} s;"
              f" mqtt receive_maximum={args.receive_maximum}")  # fmt: skip
        over_mqtt = sum(mqtt_good.values())
        print(f"good_sent={good_sent} good_stored={good_stored}"
              f" (coap {good_sent - over_mqtt}, mqtt {over_mqtt})")  # fmt: skip
        print(f"poison_sent={len(plan) - good_sent} poison_quarantined={poison_coap + poison_mqtt}"
              f" (coap {poison_coap} of {posts['poison']} POSTs,"
              f" mqtt {poison_mqtt} of {poison_mqtt_sent} messages)")  # fmt: skip
        print(f"coap_answers_good={dict(answers['good'])}")
        print(f"coap_answers_poison={dict(answers['poison'])}")
        print(f"answers_5_00={total_500}")
        print(f"mqtt_redeliveries={poison_mqtt - poison_mqtt_sent + after_restart}"
              f" (of them after a restart on the same session: {after_restart})")  # fmt: skip
        print(f"poison_devices_later_good_stored={own_stored} of 2")
    finally:
        await conn.close()
        undo()
        broker.terminate()
        broker.wait(10)


def mutation_run(count: int, batch: int = 64) -> None:
    """Part 2: `count` mutated frames through decode_batch; print batches that raised."""
    frames = corpus(count, seed=2026)
    raised = batches = bad = 0
    started = time.perf_counter()
    while chunk := [f for _, f in zip(range(batch), frames, strict=False)]:
        batches += 1
        try:
            got = decode_batch(chunk, RX)
        except Exception:
            raised += 1
            continue
        bad += int((~got.ok).sum())
    seconds = time.perf_counter() - started
    print(f"decoder_mutation_frames={count} batches={batches} batches_raised={raised}"
          f" frames_refused={bad} ({count / seconds:,.0f} frames/s)")  # fmt: skip


async def main(args: argparse.Namespace) -> None:
    """Part 1 on a scratch database, then part 2."""
    configure_logging(json=True, level=logging.CRITICAL)  # thousands of quarantine lines
    server_url = os.environ["NBMETER_DATABASE_URL"]
    name, db_url = await scratch_database(server_url, prefix="nbmeter_attack")
    try:
        await attack(args, db_url)
    finally:
        await drop_database(server_url, name)
    mutation_run(args.mutations)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--poison", type=int, default=2400, help="poison uplinks (half MQTT)")
    parser.add_argument("--good", type=int, default=1200, help="good uplinks (a third MQTT)")
    parser.add_argument("--rate", type=float, default=150.0, help="uplinks per second")
    parser.add_argument("--mutations", type=int, default=300_000)
    parser.add_argument("--receive-maximum", type=int, default=100)
    asyncio.run(main(parser.parse_args()))
