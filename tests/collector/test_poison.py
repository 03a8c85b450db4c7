"""Poison uplinks never touch the rest of their batch (issue 10, findings 1, 6 and 9).

Real collector, TimescaleDB and Mosquitto. The poison kinds: JSON/CBOR nested past any
parser's limit, a NUL (or unpaired surrogate) in the reported address, bytes the database
refuses to archive (a test trigger stands for any such refusal), frames that make a
decoder or a detector raise (test formats registered for this module), and the decoder
mutation corpus. Good uplinks of other devices share their batches.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiocoap
import asyncpg
import numpy as np
import paho.mqtt.client as paho
import pytest
from aiocoap.oscore import NotAProtectedMessage
from brokerkit import start_broker
from collector_testkit import RawCoap, cjt188_frame, hour, oscore_client
from conftest import (
    Broker,
    RunningCollector,
    add_meter,
    collector_settings,
    count,
    free_port,
    new_address,
    wait_count,
)

from collector.keys import MeterKeys
from collector.main import run
from collector.pipeline import Pipeline
from collector.settings import PipelineSettings
from collector.store import BatchStore, default_decode
from collector.uplink import Outcome, Transport, Uplink
from decoder.columns import Decoded
from devices.broker import prepare_broker_files
from devices.provision import ProvisionedDevice, provision_device

sys.path.append(str(Path(__file__).resolve().parents[1] / "decoder"))
from poison_corpus import (
    CRASH,
    DETECT,
    REFUSALS_SQL,
    REFUSED,
    REFUSED_TWICE,
    UNDO_REFUSALS_SQL,
    poison_uplink,
    register_crashing_formats,
    senml_pack,
)

SECONDS = 60


@pytest.fixture(scope="module", autouse=True)
def crashing_formats() -> Iterator[None]:
    """Two formats whose decoder / detector raise on their frames (stand-ins for bugs)."""
    undo = register_crashing_formats()
    yield
    undo()


@pytest.fixture(scope="module", autouse=True)
async def refusals(pool: asyncpg.Pool) -> AsyncIterator[None]:
    """Triggers making the database refuse REFUSED payloads (and quarantine rows of
    REFUSED_TWICE payloads, or of tenants listed in test_refused_tenants)."""
    await pool.execute(REFUSALS_SQL)
    yield
    await pool.execute(UNDO_REFUSALS_SQL)


@pytest.fixture(scope="module")
def own_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A Mosquitto of this module's own for the flood: collectors subscribed to a shared
    broker (the session's, other test runs') would each take a copy of its messages."""
    state = tmp_path_factory.mktemp("poison-mosquitto")
    port = free_port()
    env = prepare_broker_files(state, port)
    proc = start_broker(state, port)
    yield Broker(env["NBMETER_MQTT_URL"], env["NBMETER_MQTT_ADMIN_URL"], port)
    proc.terminate()
    proc.wait(10)


async def lab(pool: asyncpg.Pool) -> tuple[str, int]:
    """A new lab tenant (plain CoAP allowed): (slug, tenant_id)."""
    slug = f"lab-{uuid.uuid4().hex[:12]}"
    tenant = await pool.fetchval(
        "INSERT INTO tenants (slug, name, allow_plain_coap) VALUES ($1, $1, true)"
        " RETURNING tenant_id",
        slug,
    )
    return slug, int(tenant)


_MIDS = iter(range(1, 2**31))  # message IDs: one sequence, as a CoAP endpoint keeps them


async def post(client: RawCoap, payload: bytes, query: str) -> tuple[str, int]:
    """POST as a device would (a new message ID each time: a reused one within 247 s is a
    retransmission); retry after a 5.03 (busy); return the final code and the POSTs made."""
    for tries in range(1, 11):
        mid = next(_MIDS) % 65536
        reply = await client.post(payload, mid=mid, query=query, timeout_s=SECONDS)
        if reply.code_str != "5.03":
            return reply.code_str, tries
        await asyncio.sleep(1)
    return "5.03", 10


def publish(broker: Broker, device: ProvisionedDevice, payloads: list[bytes]) -> int:
    """Publish `payloads` at QoS 1 as `device`; return how many the broker acknowledged."""
    client = paho.Client(
        paho.CallbackAPIVersion.VERSION2,
        client_id=f"dev-{uuid.uuid4().hex[:8]}",
        protocol=paho.MQTTv5,
    )
    client.username_pw_set(device.mqtt["username"], device.mqtt["password"])
    acked: set[int] = set()
    done = threading.Event()

    def on_publish(_c: object, _u: object, mid: int, reason: paho.ReasonCode, _p: object) -> None:
        if reason.value == 0:
            acked.add(mid)
        if len(acked) == len(payloads):
            done.set()

    client.on_publish = on_publish
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        for payload in payloads:
            client.publish(device.mqtt["topic"], payload, qos=1)
        done.wait(SECONDS)
    finally:
        client.disconnect()
        client.loop_stop()
    return len(acked)


async def provision(db_url: str, broker: Broker, key: str, slug: str) -> ProvisionedDevice:
    """A meter with OSCORE and MQTT credentials in tenant `slug`."""
    return await provision_device(
        db_url, slug, new_address(), credentials_key=key, mqtt_admin_url=broker.admin_url
    )


async def test_nul_address_over_oscore_is_an_identity_mismatch(
    collector: RunningCollector, pool: asyncpg.Pool, device: ProvisionedDevice
) -> None:
    """A NUL (or unpaired surrogate) in the address an OSCORE device reports: 4.03, kept in
    quarantine with the address escaped, nothing stored."""
    client = await oscore_client(collector.coap_port, device.oscore)
    codes = []
    try:
        for address in (f"{device.address}\x00", f"{device.address}\ud800"):
            request = aiocoap.Message(
                code=aiocoap.POST,
                uri=f"coap://127.0.0.1:{collector.coap_port}/u",
                payload=senml_pack(address),
            )
            codes.append((await client.request(request).response).code)
    finally:
        await client.shutdown()
    assert codes == [aiocoap.FORBIDDEN, aiocoap.FORBIDDEN]
    details = await pool.fetch(
        "SELECT detail FROM quarantine WHERE meter_id = $1 AND reason = 'identity_mismatch'",
        device.meter_id,
    )
    assert sorted(r[0] for r in details) == [
        f"frame reports meter {device.address}\\ud800; the device is authenticated as meter"
        f" {device.address}",
        f"frame reports meter {device.address}\\x00; the device is authenticated as meter"
        f" {device.address}",
    ]
    assert (
        await count(pool, "SELECT count(*) FROM readings WHERE meter_id = $1", device.meter_id) == 0
    )


async def test_nul_address_over_plain_coap_is_an_unknown_meter(
    raw: RawCoap, pool: asyncpg.Pool
) -> None:
    """A NUL address over plain CoAP: 4.04 unknown meter, quarantined, never looked up."""
    slug, tenant = await lab(pool)
    await add_meter(pool, slug, "urn:dev:1")
    replies = [
        await raw.post(senml_pack(address), query=f"t={slug}")
        for address in ("urn:dev:1\x00", "urn:dev:\udfff1")
    ]
    assert [r.code_str for r in replies] == ["4.04", "4.04"]
    assert replies[0].payload.startswith(b"unknown_meter: no meter urn:dev:1\\x00")
    assert await count(
        pool, "SELECT count(*) FROM quarantine WHERE tenant_id = $1 AND reason = 'unknown_meter'",
        tenant,
    ) == 2  # fmt: skip


async def test_refused_archive_quarantines_only_that_uplink(
    raw: RawCoap, pool: asyncpg.Pool
) -> None:
    """Bytes the database refuses to archive: that uplink 4.00 store_failed (a quarantine row
    with its bytes), the 40 good uplinks sent with it 2.04 and stored."""
    slug, tenant = await lab(pool)
    address = new_address()
    meter = await add_meter(pool, slug, address)
    bad = REFUSED + secrets.token_hex(4).encode()
    good = [
        raw.post(cjt188_frame(address, 10_000 * h, hour(h)), query=f"t={slug}") for h in range(40)
    ]
    replies = await asyncio.gather(raw.post(bad, query=f"t={slug}"), *good)
    assert replies[0].code_str == "4.00"
    assert replies[0].payload.startswith(b"store_failed: the database refused it")
    assert {r.code_str for r in replies[1:]} == {"2.04"}
    assert await count(pool, "SELECT count(*) FROM readings WHERE meter_id = $1", meter) == 40
    row = await pool.fetchrow(
        "SELECT reason, payload FROM quarantine WHERE tenant_id = $1 AND reason <> 'unknown_meter'",
        tenant,
    )
    assert (row["reason"], row["payload"]) == ("store_failed", bad)


async def test_quarantine_refused_too_leaves_a_minimal_row(
    raw: RawCoap, pool: asyncpg.Pool
) -> None:
    """If even its quarantine row is refused, the uplink still gets one durable row (reason,
    detail with the payload's sha256) and 4.00: it is never answered 5.00 or retried."""
    slug, tenant = await lab(pool)
    bad = REFUSED_TWICE + secrets.token_hex(4).encode()
    reply = await raw.post(bad, query=f"t={slug}")
    assert reply.code_str == "4.00"
    row = await pool.fetchrow(
        "SELECT reason, detail, payload FROM quarantine WHERE tenant_id = $1", tenant
    )
    assert row["reason"] == "store_failed"
    assert row["payload"] is None
    assert "sha256" in row["detail"]
    assert "quarantine refused" in row["detail"]


@pytest.mark.parametrize("prefix", [CRASH, DETECT])
async def test_decoder_that_raises_is_decode_failed(
    raw: RawCoap, pool: asyncpg.Pool, prefix: bytes
) -> None:
    """A frame on which a decoder or a detector raises: 4.00 decode_failed, bytes kept."""
    slug, tenant = await lab(pool)
    payload = prefix + secrets.token_hex(4).upper().encode()
    reply = await raw.post(payload, query=f"t={slug}")
    assert reply.code_str == "4.00"
    assert reply.payload.startswith(b"decode_failed: internal:")
    assert await count(
        pool, "SELECT count(*) FROM quarantine WHERE tenant_id = $1 AND reason = 'decode_failed'"
        " AND payload = $2", tenant, payload,
    ) == 1  # fmt: skip


async def test_rejected_readings_of_a_stored_uplink_are_quarantined(
    raw: RawCoap, pool: asyncpg.Pool
) -> None:
    """A pack with a good reading, one a week ahead and one before installation: 2.04, the
    good one stored, one quarantine row listing the two others and why."""
    slug, tenant = await lab(pool)
    now = int(time.time()) // 3600 * 3600
    meter = await pool.fetchval(
        "INSERT INTO meters (tenant_id, address, kind, format, installed_at)"
        " VALUES ($1, 'urn:dev:9', 'water', 'senml', to_timestamp($2)) RETURNING meter_id",
        tenant,
        now - 2 * 86_400,
    )
    records = [
        {"bn": "urn:dev:9/3424/0/", "n": "1", "u": "m3", "t": now - 3600, "v": 1.5},
        {"n": "1", "t": now + 7 * 86_400, "v": 2.5},
        {"n": "1", "t": now - 5 * 86_400, "v": 0.5},
    ]
    reply = await raw.post(json.dumps(records).encode(), query=f"t={slug}")
    assert reply.code_str == "2.04"
    stored = await pool.fetch("SELECT register_ml FROM readings WHERE meter_id = $1", meter)
    assert [r[0] for r in stored] == [1_500_000]
    rows = await pool.fetch(
        "SELECT reason, detail, meter_id FROM quarantine WHERE tenant_id = $1", tenant
    )
    assert len(rows) == 1
    assert (rows[0]["reason"], rows[0]["meter_id"]) == ("readings_rejected", meter)
    detail = rows[0]["detail"]
    assert detail.startswith("2 of 3 readings rejected (")
    assert "2500000 mL clock_future" in detail
    assert "500000 mL before_installation" in detail
    outcome = await pool.fetchval("SELECT outcome FROM raw_uplinks WHERE meter_id = $1", meter)
    assert outcome == "stored"


def _uplink(payload: bytes, tenant: int) -> Uplink:
    return Uplink(payload, Transport.COAP, "127.0.0.1:5683", tenant_id=tenant)


async def test_batch_store_isolates_a_raising_decode_and_an_unstorable_uplink(
    db_url: str, pool: asyncpg.Pool
) -> None:
    """BatchStore.commit on a 32-uplink batch holding a frame the decode callable raises on
    and one whose every quarantine row is refused: the first is decode_failed, the second
    the only `failed` outcome, the 30 others stored; commit itself never raises."""
    slug, tenant = await lab(pool)
    refused_slug, refused_tenant = await lab(pool)
    await pool.execute("INSERT INTO test_refused_tenants VALUES ($1)", refused_tenant)
    address = new_address()
    meter = await add_meter(pool, slug, address)
    marker = b"\xfeRAISE"

    def decode(frames: list[bytes], rx: np.ndarray, keys: object, compact: object) -> Decoded:
        if any(f.startswith(marker) for f in frames):
            raise MemoryError("decoder bug")
        return default_decode(frames, rx, keys, compact)  # type: ignore[arg-type]

    batch = [_uplink(cjt188_frame(address, 10_000 * h, hour(100 + h)), tenant) for h in range(30)]
    batch.insert(7, _uplink(marker + b"1", tenant))
    batch.insert(19, _uplink(REFUSED + b"x", refused_tenant))
    async with asyncpg.create_pool(db_url, min_size=1, max_size=2) as own:
        store = BatchStore(own, MeterKeys(None), decode=decode)
        outcomes = await store.commit(batch)
    assert len(outcomes) == 32
    assert (outcomes[7].status, outcomes[7].reason) == ("quarantined", "decode_failed")
    assert "MemoryError" in outcomes[7].detail
    assert (outcomes[19].status, outcomes[19].reason) == ("failed", "store_failed")
    rest = [o.status for n, o in enumerate(outcomes) if n not in (7, 19)]
    assert rest == ["stored"] * 30
    assert await count(pool, "SELECT count(*) FROM readings WHERE meter_id = $1", meter) == 30
    assert await count(
        pool, "SELECT count(*) FROM quarantine WHERE tenant_id = $1 AND reason = 'decode_failed'",
        tenant,
    ) == 1  # fmt: skip
    assert refused_slug


@pytest.mark.slow
async def test_poison_flood_with_good_traffic(
    db_url: str, pool: asyncpg.Pool, own_broker: Broker, credentials_key: str
) -> None:
    """2,240 poison uplinks (1,240 CoAP, 1,000 MQTT) interleaved with 900 good ones from
    other devices: every good uplink stored, no 5.00 at all, every OSCORE uplink reporting
    another meter answered 4.03 (after 5.03s it is sent again on), every poison message
    quarantined exactly once and acknowledged (Receive Maximum 20 never runs out), the
    poison devices' later good messages stored, nothing redelivered after a restart."""
    broker = own_broker
    settings = collector_settings(db_url, broker, credentials_key)
    mqtt = settings.mqtt.model_copy(update={"receive_maximum": 20})
    settings = settings.model_copy(update={"mqtt": mqtt})

    async def start() -> tuple[asyncio.Event, asyncio.Task[None]]:
        stop, started = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(run(settings, stop=stop, started=started))
        await asyncio.wait_for(started.wait(), 20)
        return stop, task

    bad_slug, bad_tenant = await lab(pool)  # plain CoAP poison
    dev_slug, _ = await lab(pool)  # MQTT / OSCORE poison devices
    good_slug, good_tenant = await lab(pool)
    bad_devices = [await provision(db_url, broker, credentials_key, dev_slug) for _ in range(2)]
    good_devices = [await provision(db_url, broker, credentials_key, good_slug) for _ in range(4)]
    meters = [new_address() for _ in range(40)]
    for address in meters:
        await add_meter(pool, good_slug, address)

    stop, task = await start()
    clients = [await RawCoap.open(settings.coap.port) for _ in range(8)]
    limit = asyncio.Semaphore(48)
    codes: dict[str, Counter[str]] = {"good": Counter(), "poison": Counter()}
    posts = Counter[str]()  # receptions: a 5.03 (busy) answer is followed by a new POST

    async def send(kind: str, n: int, payload: bytes, slug: str) -> None:
        async with limit:
            code, tries = await post(clients[n % len(clients)], payload, f"t={slug}")
            codes[kind][code] += 1
            posts[kind] += tries

    coap = [send("poison", i, poison_uplink(i, 1000), bad_slug) for i in range(1200)]
    coap += [
        send("good", n, cjt188_frame(meters[n % 40], 10_000 * n, hour(n // 40)), good_slug)
        for n in range(600)
    ]
    order = np.random.default_rng(5).permutation(len(coap)).tolist()
    mqtt_poison = [[poison_uplink(10_000 + 2 * i + d) for i in range(500)] for d in range(2)]
    mqtt_good = [
        [cjt188_frame(dev.address, 10_000 * h, hour(h)) for h in range(75)] for dev in good_devices
    ]
    publishers = [
        asyncio.to_thread(publish, broker, dev, payloads)
        for dev, payloads in zip(bad_devices + good_devices, mqtt_poison + mqtt_good, strict=True)
    ]
    oscore = await oscore_client(settings.coap.port, bad_devices[0].oscore)

    async def forged() -> list[list[aiocoap.Message]]:
        """Authenticated uplinks reporting another meter, one at a time as a device sends;
        a 5.03 (not durable within ack_wait_s; or, unprotected, the credentials store was
        slow) is sent again as a new request, as a device does: each one's answers."""
        answers: list[list[aiocoap.Message]] = []
        for i in range(40):
            seen: list[aiocoap.Message] = []
            while len(seen) < 10 and (not seen or seen[-1].code == aiocoap.SERVICE_UNAVAILABLE):
                if seen:
                    await asyncio.sleep(1)
                request = aiocoap.Message(
                    code=aiocoap.POST,
                    uri=f"coap://127.0.0.1:{settings.coap.port}/u",
                    payload=senml_pack(f"{bad_devices[0].address}\x00{i}"),
                )
                try:
                    seen.append(await oscore.request(request).response)
                except NotAProtectedMessage as exc:  # an answer sent before verification
                    seen.append(exc.plain_message)  # (RFC 8613 §8.2): the store was slow
            answers.append(seen)
        return answers

    results = await asyncio.gather(
        asyncio.gather(*(coap[i] for i in order)), asyncio.gather(*publishers), forged()
    )
    await oscore.shutdown()
    for client in clients:
        client.close()
    assert results[1] == [500, 500, 75, 75, 75, 75]  # the broker took every message
    # each ends 4.03 identity_mismatch; before it only 5.03 + Max-Age (retry later: on a
    # loaded machine its quarantine row may not be durable within ack_wait_s), never a
    # 4.xx or 5.00; every reception the pipeline took is quarantined once (below)
    oscore_busy = [m.payload for m, _ in _pairs(results[2])]
    assert [seen[-1].code for seen in results[2]] == [aiocoap.FORBIDDEN] * 40, oscore_busy
    assert all(m.code == aiocoap.SERVICE_UNAVAILABLE and age for m, age in _pairs(results[2]))
    assert all(s[-1].payload.startswith(b"identity_mismatch: ") for s in results[2])
    # a 5.03 "not yet durable" leaves its uplink queued (quarantined later); any other
    # 5.03 (pipeline full, credentials store slow) was refused before it was taken
    queued = sum(m.payload.startswith(b"not yet durable") for m, _ in _pairs(results[2]))

    assert codes["good"] == Counter({"2.04": 600})
    assert set(codes["poison"]) <= {"4.00", "4.04", "4.13"}, codes["poison"]
    assert sum(codes["poison"].values()) == 1200
    good_readings = (
        "SELECT count(*) FROM readings r JOIN meters m USING (meter_id) WHERE m.tenant_id = $1"
    )
    assert await wait_count(pool, 900, good_readings, good_tenant, within_s=SECONDS) == 900
    by_tenant = "SELECT count(*) FROM quarantine WHERE tenant_id = $1"
    # CoAP poison 1,200 (+ POSTs repeated after a 5.03), MQTT 1,000 + OSCORE 40 (+ those
    # answered 5.03 while queued): each reception quarantined once (no MQTT redelivery)
    want = posts["poison"]
    assert await wait_count(pool, want, by_tenant, bad_tenant, within_s=SECONDS) == want
    poison_devices = [d.meter_id for d in bad_devices]
    mqtt_rows = "SELECT count(*) FROM quarantine WHERE meter_id = ANY($1::bigint[])"
    rows = 1040 + queued
    assert await wait_count(pool, rows, mqtt_rows, poison_devices, within_s=SECONDS) == rows
    mine = "SELECT count(*) FROM readings WHERE meter_id = ANY($1::bigint[])"
    assert await count(pool, mine, poison_devices) == 0  # nothing forged was stored

    # the poison devices' own good messages come through (no in-flight slot held)
    for dev in bad_devices:
        assert publish(broker, dev, [cjt188_frame(dev.address, 70_000, hour(5))]) == 1
    assert await wait_count(pool, 2, mine, poison_devices, within_s=SECONDS) == 2

    # nothing left in the session: a restarted collector (same session) gets nothing again
    archived = "SELECT count(*) FROM raw_uplinks WHERE meter_id = ANY($1::bigint[])"
    before = await count(pool, archived, poison_devices)
    stop.set()
    await asyncio.wait_for(task, 40)
    stop, task = await start()
    await asyncio.sleep(5)
    after = await count(pool, archived, poison_devices)
    quarantined = await count(pool, mqtt_rows, poison_devices)
    stop.set()
    await asyncio.wait_for(task, 40)
    assert (after, quarantined) == (before, rows)


def _pairs(answers: list[list[aiocoap.Message]]) -> list[tuple[aiocoap.Message, int]]:
    """Every answer but the last of each request's tries, with its Max-Age."""
    return [(m, m.opt.max_age) for seen in answers for m in seen[:-1]]


async def test_pipeline_fails_only_the_batch_a_commit_bug_hits() -> None:
    """A commit callable that raises (a bug: BatchStore isolates poison itself) fails the
    futures of that batch only (UplinkFailed, never retried); an outcome `failed` fails
    its own uplink; the next batches get their outcomes and nothing stays pending."""
    seen: list[int] = []

    async def commit(batch: list[Uplink]) -> list[Outcome]:
        seen.append(len(batch))
        if any(u.payload == b"bug" for u in batch):
            raise ZeroDivisionError("commit bug")
        return [Outcome("failed" if u.payload == b"lost" else "stored") for u in batch]

    pipeline = Pipeline(PipelineSettings(batch_max=4, batch_wait_ms=50, workers=1), commit)
    runner = asyncio.create_task(pipeline.run())
    payloads = [b"ok"] * 3 + [b"bug"] + [b"ok"] * 3 + [b"lost"]
    futures = [pipeline.offer(Uplink(p, Transport.MQTT, "test")) for p in payloads]
    done = await asyncio.gather(*futures, return_exceptions=True)
    pipeline.close()
    await asyncio.wait_for(runner, 10)
    kinds = [type(d).__name__ for d in done]
    assert kinds == ["UplinkFailed"] * 4 + ["Outcome"] * 3 + ["UplinkFailed"]
    assert "ZeroDivisionError: commit bug" in str(done[0])
    assert all(d.status == "stored" for d in done if isinstance(d, Outcome))
    assert seen == [4, 4]  # each batch committed once: no second isolation path
    assert pipeline.pending == 0
