"""Operator-platform push endpoint on the real stack: an in-process collector whose
database connections go through a TCP proxy (cut = database outage), pushes shaped as
each platform documents them, answers checked against what was stored.

OneNET HTTP push (body `{"msg", "msg_signature", "nonce"}`, signature
base64(md5(token + nonce + msg)), data point `type` 1 with `at` in ms, `imei`, `value`):
https://open.iot.10086.cn/doc/nb-iot/book/manual/httppush/develop-manual.html
(English: https://onenet.hk.chinamobile.com/suben/doc/nb-iot/book/manual/httppush/develop-manual.html)

OceanConnect push (`deviceDataChanged`: `deviceId`, `service{serviceId, data, eventTime}`):
https://support.huaweicloud.com/intl/en-us/api-IoT/iot_06_0035.html; batch
(`deviceDatasChanged`, `services[]`): https://support.huaweicloud.com/intl/en-us/api-IoT/iot_06_0036.html
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest
from brokerkit import free_port
from collector_testkit import cjt188_frame
from conftest import count, new_address, wait_count
from dbkit import TcpProxy

from collector.main import run
from collector.settings import (
    CoapSettings,
    CollectorSettings,
    PipelineSettings,
    PlatformSettings,
)
from devices.platforms import oceanconnect_body, onenet_body
from devices.provision import create_platform_secret, provision_device

PLATFORMS = ["onenet", "oceanconnect"]


@dataclass
class PushCollector:
    """An in-process collector with the push endpoint, its database behind `proxy`."""

    base_url: str
    proxy: TcpProxy


@pytest.fixture(scope="module")
async def push_collector(db_url: str, credentials_key: str) -> AsyncIterator[PushCollector]:
    """One collector for the module; caches long enough that an outage test reaches the
    pipeline (secret and identity known), short ack wait so a push meets the outage."""
    parts = urlsplit(db_url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    await proxy.start()
    via_proxy = urlunsplit(
        parts._replace(netloc=f"{parts.netloc.rsplit('@', 1)[0]}@127.0.0.1:{proxy.port}")
    )
    port = free_port()
    settings = CollectorSettings(
        database_url=via_proxy,
        mqtt_url=None,
        credentials_key=credentials_key,  # type: ignore[arg-type]
        metrics_port=0,
        coap=CoapSettings(host="127.0.0.1", port=free_port(socket.SOCK_DGRAM)),
        platform=PlatformSettings(
            port=port, ack_wait_s=2, retry_after_s=1, secret_ttl_s=60, device_ttl_s=60
        ),
        pipeline=PipelineSettings(retry_initial_s=0.1, retry_max_s=0.5),
    )
    stop, started = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(run(settings, stop=stop, started=started))
    await asyncio.wait_for(started.wait(), 20)
    yield PushCollector(f"http://127.0.0.1:{port}", proxy)
    await proxy.start()  # a failed test may have left it cut
    stop.set()
    await asyncio.wait_for(task, 40)
    await proxy.cut()


@dataclass
class Endpoint:
    """A tenant with a push endpoint for `platform` and one meter known to it as `device_id`."""

    platform: str
    slug: str
    secret: str
    address: str
    device_id: str
    meter_id: int

    @property
    def path(self) -> str:
        """The callback URL path to give the platform."""
        tail = f"/{self.secret}" if self.platform == "oceanconnect" else ""
        return f"/p/{self.slug}/{self.platform}{tail}"

    def body(
        self,
        frames: list[bytes],
        *,
        device_id: str | None = None,
        at_s: float | None = None,
        token: str | None = None,
    ) -> bytes:
        """A push of `frames` from `device_id` (default: the meter's), signed with `token`."""
        who = device_id or self.device_id
        when = time.time() if at_s is None else at_s
        if self.platform == "onenet":
            items: list[dict[str, object]] = [
                {
                    "type": 1,
                    "dev_id": 520_000 + n,
                    "imei": who,
                    "ds_id": "3200_0_5505",
                    "at": int(when * 1000),
                    "value": frame.hex().upper(),
                }
                for n, frame in enumerate(frames)
            ]
            return onenet_body(items, (token or self.secret).encode(), uuid.uuid4().hex[:8])
        return oceanconnect_body(who, [(f, when) for f in frames], uuid.uuid4().hex)


@pytest.fixture(params=PLATFORMS)
async def endpoint(
    request: pytest.FixtureRequest, pool: asyncpg.Pool, db_url: str, credentials_key: str
) -> Endpoint:
    """A fresh tenant, its endpoint secret for the platform, one provisioned meter."""
    platform = str(request.param)
    slug = f"p-{uuid.uuid4().hex[:12]}"
    await pool.execute("INSERT INTO tenants (slug, name) VALUES ($1, $1)", slug)
    secret = await create_platform_secret(db_url, slug, platform, credentials_key=credentials_key)
    address = new_address()
    device_id = f"8699750{uuid.uuid4().int % 10**8:08d}"  # an IMEI-like identity
    provisioned = await provision_device(
        db_url,
        slug,
        address,
        credentials_key=credentials_key,
        oscore=False,
        platform_ids={platform: device_id},
    )
    return Endpoint(platform, slug, secret, address, device_id, provisioned.meter_id)


async def _post(collector: PushCollector, path: str, body: bytes) -> httpx.Response:
    async with httpx.AsyncClient(base_url=collector.base_url, timeout=30) as client:
        return await client.post(path, content=body, headers={"Content-Type": "application/json"})


_READINGS = "SELECT count(*) FROM readings r JOIN meters m USING (meter_id) WHERE m.tenant_id = (SELECT tenant_id FROM tenants WHERE slug = $1)"  # noqa: E501
_QUARANTINED = "SELECT count(*) FROM quarantine WHERE tenant_id = (SELECT tenant_id FROM tenants WHERE slug = $1) AND reason = $2"  # noqa: E501
_ARCHIVED = "SELECT count(*) FROM raw_uplinks WHERE tenant_id = (SELECT tenant_id FROM tenants WHERE slug = $1) AND transport = 6"  # noqa: E501


def _frame(address: str, n: int = 0) -> bytes:
    hour = int(time.time()) // 3600 * 3600
    return cjt188_frame(address, 1_230_000 + 10_000 * n, hour - 3600 * n)


async def test_valid_push_is_stored_once_and_answered_after_commit(
    push_collector: PushCollector, endpoint: Endpoint, pool: asyncpg.Pool
) -> None:
    """A documented-shape push answers 200 with the reading already committed; the
    platform's retry of the same push answers 200 and stores nothing twice."""
    body = endpoint.body([_frame(endpoint.address)])
    reply = await _post(push_collector, endpoint.path, body)
    assert reply.status_code == 200, reply.text
    assert reply.json()["stored"] == 1
    # no polling: the answer means durable
    assert await count(pool, _READINGS, endpoint.slug) == 1
    assert await count(pool, _ARCHIVED, endpoint.slug) == 1
    again = await _post(push_collector, endpoint.path, body)
    assert again.status_code == 200
    assert again.json()["duplicate"] == 1
    assert await count(pool, _READINGS, endpoint.slug) == 1


async def test_batch_push_stores_every_message(
    push_collector: PushCollector, endpoint: Endpoint, pool: asyncpg.Pool
) -> None:
    """A batch push (OneNET msg list, OceanConnect deviceDatasChanged) stores each frame."""
    frames = [_frame(endpoint.address, n) for n in range(3)]
    reply = await _post(push_collector, endpoint.path, endpoint.body(frames))
    assert reply.status_code == 200, reply.text
    assert reply.json()["stored"] == 3
    assert await count(pool, _READINGS, endpoint.slug) == 3


async def test_bad_signature_is_refused_and_nothing_stored(
    push_collector: PushCollector, endpoint: Endpoint, pool: asyncpg.Pool
) -> None:
    """A push not made with the tenant's secret gets 401 and leaves no trace."""
    frames = [_frame(endpoint.address)]
    if endpoint.platform == "onenet":
        reply = await _post(push_collector, endpoint.path, endpoint.body(frames, token="wrong"))
        assert reply.json()["error"] == "bad_signature"
    else:
        wrong = f"/p/{endpoint.slug}/oceanconnect/{endpoint.secret[:-2]}xx"
        reply = await _post(push_collector, wrong, endpoint.body(frames))
        assert reply.json()["error"] == "bad_token"
    assert reply.status_code == 401
    assert await count(pool, _READINGS, endpoint.slug) == 0
    assert await count(pool, _ARCHIVED, endpoint.slug) == 0


async def test_stale_push_is_refused_and_nothing_stored(
    push_collector: PushCollector, endpoint: Endpoint, pool: asyncpg.Pool
) -> None:
    """A push whose message time is two hours old (a replay) gets 401 stale."""
    body = endpoint.body([_frame(endpoint.address)], at_s=time.time() - 7200)
    reply = await _post(push_collector, endpoint.path, body)
    assert reply.status_code == 401
    assert reply.json()["error"] == "stale"
    assert await count(pool, _READINGS, endpoint.slug) == 0
    assert await count(pool, _ARCHIVED, endpoint.slug) == 0


async def test_unknown_device_is_quarantined_with_404(
    push_collector: PushCollector, endpoint: Endpoint, pool: asyncpg.Pool
) -> None:
    """A signed push from a platform identity no meter is provisioned as: 404, the frame
    kept in quarantine (unknown_device), no reading stored."""
    body = endpoint.body([_frame(endpoint.address)], device_id="869975039999999")
    reply = await _post(push_collector, endpoint.path, body)
    assert reply.status_code == 404, reply.text
    assert reply.json()["error"] == "unknown_device"
    assert await count(pool, _READINGS, endpoint.slug) == 0
    assert await count(pool, _QUARANTINED, endpoint.slug, "unknown_device") == 1


async def test_device_frame_mismatch_is_quarantined_with_403(
    push_collector: PushCollector, endpoint: Endpoint, pool: asyncpg.Pool
) -> None:
    """The meter's platform identity pushing another meter's frame: 403, quarantined as
    identity_mismatch, nothing stored (as for OSCORE and MQTT)."""
    body = endpoint.body([_frame(new_address())])
    reply = await _post(push_collector, endpoint.path, body)
    assert reply.status_code == 403, reply.text
    assert reply.json()["error"] == "identity_mismatch"
    assert await count(pool, _READINGS, endpoint.slug) == 0
    assert await count(pool, _QUARANTINED, endpoint.slug, "identity_mismatch") == 1


@pytest.mark.parametrize(
    "body",
    [b'{"msg": ', b"[]", b'{"notifyType": 5}', b'{"msg": {"type": 1}, "nonce": "n"}'],
    ids=["truncated", "array", "wrong-type", "no-signature"],
)
async def test_malformed_body_is_400_and_nothing_stored(
    push_collector: PushCollector, endpoint: Endpoint, pool: asyncpg.Pool, body: bytes
) -> None:
    """A body that is not the platform's envelope: 400 naming why, nothing stored."""
    reply = await _post(push_collector, endpoint.path, body)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"] == "malformed"
    assert reply.json()["detail"]
    assert await count(pool, _READINGS, endpoint.slug) == 0
    assert await count(pool, _ARCHIVED, endpoint.slug) == 0


async def test_undecodable_payload_is_quarantined_with_422(
    push_collector: PushCollector, endpoint: Endpoint, pool: asyncpg.Pool
) -> None:
    """A signed push whose payload is no meter frame: 422, quarantined as undecodable."""
    reply = await _post(push_collector, endpoint.path, endpoint.body([b"\x01\x02\x03\x04"]))
    assert reply.status_code == 422, reply.text
    assert await count(pool, _QUARANTINED, endpoint.slug, "undecodable") == 1
    assert await count(pool, _READINGS, endpoint.slug) == 0


async def test_database_outage_answers_503_and_the_retry_stores_once(
    push_collector: PushCollector, endpoint: Endpoint, pool: asyncpg.Pool
) -> None:
    """Database away: 503 with Retry-After (the push stays queued); once it is back the
    platform's retry answers 200 and the reading is stored exactly once."""
    warm = endpoint.body([_frame(endpoint.address, 1)])  # secret and identity now cached
    assert (await _post(push_collector, endpoint.path, warm)).status_code == 200
    body = endpoint.body([_frame(endpoint.address)])
    await push_collector.proxy.cut()
    try:
        reply = await _post(push_collector, endpoint.path, body)
    finally:
        await push_collector.proxy.start()
    assert reply.status_code == 503, reply.text
    assert int(reply.headers["Retry-After"]) >= 1
    # what was queued is stored once the database is back...
    assert await wait_count(pool, 2, _READINGS, endpoint.slug, within_s=20) == 2
    retry = await _post(push_collector, endpoint.path, body)
    assert retry.status_code == 200, retry.text
    assert retry.json()["duplicate"] == 1
    assert await count(pool, _READINGS, endpoint.slug) == 2


async def test_onenet_url_check_echoes_msg_only_when_signed(
    push_collector: PushCollector, pool: asyncpg.Pool, db_url: str, credentials_key: str
) -> None:
    """OneNET's subscription check (GET ?msg&nonce&signature) gets msg back only when the
    signature is made with the tenant's token."""
    from devices.platforms import onenet_signature

    slug = f"p-{uuid.uuid4().hex[:12]}"
    await pool.execute("INSERT INTO tenants (slug, name) VALUES ($1, $1)", slug)
    token = await create_platform_secret(db_url, slug, "onenet", credentials_key=credentials_key)
    good = {
        "msg": "hello42",
        "nonce": "abc",
        "signature": onenet_signature(token.encode(), "abc", "hello42"),
    }
    async with httpx.AsyncClient(base_url=push_collector.base_url) as client:
        ok = await client.get(f"/p/{slug}/onenet", params=good)
        bad = await client.get(f"/p/{slug}/onenet", params=good | {"signature": "x"})
    assert ok.status_code == 200
    assert ok.text == "hello42"
    assert bad.status_code == 401


@pytest.mark.parametrize("platform", PLATFORMS)
async def test_platform_emulator_through_an_outage_stores_everything_once(
    push_collector: PushCollector,
    pool: asyncpg.Pool,
    db_url: str,
    credentials_key: str,
    platform: str,
) -> None:
    """The simulator's platform emulator pushes 3 meters x 8 days in batches while the
    database goes away for a while: its retries (honouring Retry-After) bring every
    message in, each acknowledged one is stored, and nothing is stored twice."""
    from simulator.platform import Message, PlatformEmulator

    slug = f"p-{uuid.uuid4().hex[:12]}"
    await pool.execute("INSERT INTO tenants (slug, name) VALUES ($1, $1)", slug)
    secret = await create_platform_secret(db_url, slug, platform, credentials_key=credentials_key)
    meters = []
    for _ in range(3):
        address, device_id = new_address(), f"dev-{uuid.uuid4().hex[:10]}"
        await provision_device(
            db_url, slug, address, credentials_key=credentials_key, oscore=False,
            platform_ids={platform: device_id},
        )  # fmt: skip
        meters.append((address, device_id))
    now = time.time()
    messages = [
        Message(device_id, _frame(address, day), now)
        for day in range(8)
        for address, device_id in meters
    ]
    emulator = PlatformEmulator(platform, push_collector.base_url, slug, secret, batch_max=5)
    # warm the collector's caches (secret, identities) so the outage hits the pipeline
    assert await emulator.deliver(messages[:3]) == ["acked"] * 3
    await push_collector.proxy.cut()
    task = asyncio.create_task(emulator.deliver(messages[3:]))
    await asyncio.sleep(3.0)  # longer than the collector's ack wait (2 s): a 503 first
    await push_collector.proxy.start()
    results = await asyncio.wait_for(task, 60)
    assert results == ["acked"] * len(messages[3:]), results
    # warm-up push + one per batch + at least one retry after the 503
    assert emulator.pushes > 1 + len(emulator.batches(messages[3:]))
    assert await count(pool, _READINGS, slug) == len(messages)
    duplicates = await count(
        pool,
        "SELECT count(*) FROM (SELECT meter_id, read_s FROM readings r JOIN meters m"
        " USING (meter_id) WHERE m.tenant_id = (SELECT tenant_id FROM tenants WHERE slug = $1)"
        " GROUP BY 1, 2 HAVING count(*) > 1) d",
        slug,
    )
    assert duplicates == 0


_ODD_VALUES: list[object] = [
    None, True, 0, -1, 2**64, 1.5, float("1e308"), "", "x", "zz", "0" * 5000, [], {}, [1, [2]],
    {"a": {"b": []}}, "20261301T250000Z", "\u0000", "ff" * 3,
]  # fmt: skip


def _mutate_json(doc: object, rng: random.Random) -> object:
    """`doc` with one value somewhere replaced by an odd one, a key dropped or added."""
    if isinstance(doc, dict) and doc:
        key = rng.choice(sorted(doc))
        op = rng.random()
        out = dict(doc)
        if op < 0.2:
            del out[key]
        elif op < 0.3:
            out[rng.choice(["x", "value", "data", "service", "services", "at"])] = rng.choice(
                _ODD_VALUES
            )
        elif op < 0.6 and isinstance(doc[key], dict | list):
            out[key] = _mutate_json(doc[key], rng)
        else:
            out[key] = rng.choice(_ODD_VALUES)
        return out
    if isinstance(doc, list) and doc:
        at = rng.randrange(len(doc))
        return [*doc[:at], _mutate_json(doc[at], rng), *doc[at + 1 :]]
    return rng.choice(_ODD_VALUES)


async def test_mutated_pushes_never_get_500(
    push_collector: PushCollector,
    endpoint: Endpoint,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Seeded mutations of a valid push (fields dropped, added, of other types or values;
    OneNET's re-signed, so they reach the parsing behind the signature; bytes of the body
    changed) get 200, 4xx or 503, never 500, and nothing is logged with a traceback."""
    capsys.readouterr()
    rng = random.Random(16)
    statuses: dict[int, int] = {}
    async with httpx.AsyncClient(base_url=push_collector.base_url, timeout=30) as client:
        for i in range(150):
            valid = endpoint.body([_frame(endpoint.address, i % 5)])
            doc = json.loads(valid)
            if i % 3 == 2:  # the raw bytes
                body = bytearray(valid)
                for _ in range(rng.randint(1, 4)):
                    body[rng.randrange(len(body))] = rng.randrange(256)
                sent = bytes(body)
            elif endpoint.platform == "onenet":
                msg = _mutate_json(doc["msg"], rng)
                items = msg if isinstance(msg, list) else [msg]
                sent = onenet_body(items, endpoint.secret.encode(), uuid.uuid4().hex[:8])  # type: ignore[arg-type]
            else:
                sent = json.dumps(_mutate_json(doc, rng)).encode()
            reply = await client.post(
                endpoint.path, content=sent, headers={"Content-Type": "application/json"}
            )
            statuses[reply.status_code] = statuses.get(reply.status_code, 0) + 1
    assert all(s == 200 or 400 <= s < 500 or s == 503 for s in statuses), statuses
    assert len(statuses) >= 3, statuses  # (seen: several 4xx beside 200)
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err


async def test_a_slug_no_tenant_can_have_is_404_not_503(push_collector: PushCollector) -> None:
    """A push or URL check to a tenant slug outside the slugs' rule (a NUL among them,
    which PostgreSQL refuses as text) is 404 no_endpoint, not 503 with Retry-After (the
    platform would retry for ever)."""
    async with httpx.AsyncClient(base_url=push_collector.base_url, timeout=30) as client:
        for path in ("/p/a%00b/onenet", "/p/a%00b/oceanconnect/x", "/p/UPPER/onenet"):
            reply = await client.post(path, content=b"{}")
            assert reply.status_code == 404, (path, reply.text)
            assert reply.json()["error"] == "no_endpoint"
        check = await client.get(
            "/p/a%00b/onenet", params={"msg": "a", "nonce": "b", "signature": "c"}
        )
        assert check.status_code == 404, check.text
