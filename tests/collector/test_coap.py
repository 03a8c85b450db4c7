"""CoAP uplinks end to end: real collector, real TimescaleDB, raw UDP and aiocoap clients."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path
from typing import Any

import aiocoap
import asyncpg
import pytest
from collector_testkit import RawCoap, cjt188_frame, free_udp_port, hour, oscore_client
from conftest import RunningCollector, add_meter, count, new_address

from collector.coap import UplinkResource
from collector.coap_guard import EventLimiter
from collector.coap_patches import Site, acyclic_requests
from collector.settings import CoapSettings
from devices.provision import ProvisionedDevice

READINGS = "SELECT count(*) FROM readings r JOIN meters m USING (meter_id) WHERE m.address = $1"
RAW = "SELECT count(*) FROM raw_uplinks r JOIN meters m USING (meter_id) WHERE m.address = $1"
QUARANTINED = "SELECT count(*) FROM quarantine WHERE reason = $1 AND payload = $2"


async def test_plain_con_stores_the_reading(
    raw: RawCoap, pool: asyncpg.Pool, lab_tenant: str
) -> None:
    """A plain CON POST from a lab tenant is answered 2.04 after its reading is stored."""
    address = new_address()
    meter_id = await add_meter(pool, lab_tenant, address)
    reply = await raw.post(cjt188_frame(address, 1_230_000, hour(1)), query=f"t={lab_tenant}")
    assert reply.code_str == "2.04"
    row = await pool.fetchrow(
        "SELECT register_ml, extract(epoch FROM nbm_at(read_s))::bigint AS at"
        " FROM readings WHERE meter_id = $1",
        meter_id,
    )
    assert (row["register_ml"], row["at"]) == (1_230_000, hour(1))
    transport = await pool.fetchval(
        "SELECT transport FROM raw_uplinks WHERE meter_id = $1 AND outcome = 'stored'", meter_id
    )
    assert transport == 1  # plain CoAP, kept per uplink


async def test_plain_non_stores_the_reading(
    raw: RawCoap, pool: asyncpg.Pool, lab_tenant: str
) -> None:
    """A plain NON POST is answered with a NON 2.04 once its reading is stored."""
    address = new_address()
    await add_meter(pool, lab_tenant, address)
    reply = await raw.post(
        cjt188_frame(address, 40_000, hour(2)), confirmable=False, query=f"t={lab_tenant}"
    )
    assert (reply.mtype, reply.code_str) == (1, "2.04")
    assert await count(pool, READINGS, address) == 1


async def test_retransmitted_con_is_stored_once(
    raw: RawCoap, pool: asyncpg.Pool, lab_tenant: str
) -> None:
    """The same CON (same message ID) sent three times is processed and archived once."""
    address = new_address()
    await add_meter(pool, lab_tenant, address)
    frame = cjt188_frame(address, 50_000, hour(3))
    same = {"mid": 4242, "token": b"\x01\x02\x03\x04", "query": f"t={lab_tenant}"}
    first = await raw.post(frame, **same)  # type: ignore[arg-type]
    again = [await raw.post(frame, **same) for _ in range(2)]  # type: ignore[arg-type]
    assert [r.code_str for r in (first, *again)] == ["2.04"] * 3
    assert await count(pool, READINGS, address) == 1
    assert await count(pool, RAW, address) == 1  # deduplicated before the pipeline


async def test_plain_coap_refused_without_lab_flag(
    raw: RawCoap, pool: asyncpg.Pool, tenant_slug: str
) -> None:
    """Plain CoAP for a tenant without allow_plain_coap gets 4.01 and stores nothing."""
    address = new_address()
    await add_meter(pool, tenant_slug, address)
    reply = await raw.post(cjt188_frame(address, 10_000, hour(4)), query=f"t={tenant_slug}")
    assert reply.code_str == "4.01"
    assert await count(pool, READINGS, address) == 0


async def test_garbage_payload_is_quarantined(
    raw: RawCoap, pool: asyncpg.Pool, lab_tenant: str
) -> None:
    """An undecodable payload gets 4.00 with the reason and lands in quarantine."""
    payload = b"\x00garbage-" + new_address().encode()
    reply = await raw.post(payload, query=f"t={lab_tenant}")
    assert reply.code_str == "4.00"
    assert reply.payload.startswith(b"undecodable")
    assert await count(pool, QUARANTINED, "undecodable", payload) == 1


async def test_oversized_payload_is_refused_and_quarantined(
    collector: RunningCollector, raw: RawCoap, pool: asyncpg.Pool, lab_tenant: str
) -> None:
    """A payload over max_payload_bytes gets 4.13 and its head is archived in quarantine."""
    limit = collector.settings.coap.max_payload_bytes
    payload = new_address().encode() * (limit // 14 + 2)
    client = await aiocoap.Context.create_client_context()
    try:
        request = aiocoap.Message(
            code=aiocoap.POST,
            uri=f"coap://127.0.0.1:{collector.coap_port}/u?t={lab_tenant}",
            payload=payload,
        )
        response = await client.request(request).response
    finally:
        await client.shutdown()
    assert response.code == aiocoap.REQUEST_ENTITY_TOO_LARGE
    got = await pool.fetchval(
        "SELECT count(*) FROM quarantine q JOIN tenants t USING (tenant_id)"
        " WHERE q.reason = 'too_large' AND t.slug = $1 AND length(q.payload) <= $2",
        lab_tenant,
        limit,
    )
    assert got == 1


async def test_blockwise_upload_is_assembled(
    raw: RawCoap, pool: asyncpg.Pool, lab_tenant: str
) -> None:
    """An uplink sent in 16-byte Block1 blocks is reassembled, stored, then answered 2.04."""
    address = new_address()
    await add_meter(pool, lab_tenant, address)
    reply = await raw.post_blockwise(
        cjt188_frame(address, 70_000, hour(5)), query=f"t={lab_tenant}"
    )
    assert reply.code_str == "2.04"
    assert await count(pool, READINGS, address) == 1


async def test_overlapping_uplinks_store_each_reading_once(
    raw: RawCoap, pool: asyncpg.Pool, lab_tenant: str
) -> None:
    """Uplinks repeating the same interval readings, sent at once, store each reading once."""
    address = new_address()
    await add_meter(pool, lab_tenant, address)
    frames = [cjt188_frame(address, 10_000 * (h + 1), hour(h)) for h in range(24)]
    sends = [raw.post(frames[h % 24], query=f"t={lab_tenant}") for h in range(24 * 4)]
    replies = await asyncio.gather(*sends)
    assert {r.code_str for r in replies} == {"2.04"}
    assert await count(pool, READINGS, address) == 24
    new = await pool.fetchval(
        "SELECT sum(n_new) FROM raw_uplinks r JOIN meters m USING (meter_id) WHERE m.address = $1",
        address,
    )
    assert new == 24


async def test_oscore_con_and_non_store_the_readings(
    collector: RunningCollector, pool: asyncpg.Pool, device: ProvisionedDevice
) -> None:
    """OSCORE-protected CON and NON uplinks are stored with transport 2 (coap+oscore)."""
    client = await oscore_client(collector.coap_port, device.oscore)
    try:
        for n, tuning in enumerate((aiocoap.Reliable, aiocoap.Unreliable)):
            request = aiocoap.Message(
                code=aiocoap.POST,
                transport_tuning=tuning,
                uri=f"coap://127.0.0.1:{collector.coap_port}/u",
                payload=cjt188_frame(device.address, 20_000 * (n + 1), hour(10 + n)),
            )
            response = await client.request(request).response
            assert response.code == aiocoap.CHANGED
    finally:
        await client.shutdown()
    rows = await pool.fetch(
        "SELECT register_ml FROM readings WHERE meter_id = $1 ORDER BY read_s", device.meter_id
    )
    assert [r["register_ml"] for r in rows] == [20_000, 40_000]
    transports = await pool.fetch(
        "SELECT DISTINCT transport FROM raw_uplinks WHERE meter_id = $1 AND outcome = 'stored'",
        device.meter_id,
    )
    assert [r[0] for r in transports] == [2]  # coap+oscore, kept per uplink


async def test_oscore_device_reporting_another_meter_is_forbidden(
    collector: RunningCollector, pool: asyncpg.Pool, device: ProvisionedDevice
) -> None:
    """An OSCORE device sending another meter's frame gets 4.03; it is quarantined."""
    other = new_address()
    frame = cjt188_frame(other, 30_000, hour(12))
    client = await oscore_client(collector.coap_port, device.oscore)
    try:
        request = aiocoap.Message(
            code=aiocoap.POST, uri=f"coap://127.0.0.1:{collector.coap_port}/u", payload=frame
        )
        response = await client.request(request).response
    finally:
        await client.shutdown()
    assert response.code == aiocoap.FORBIDDEN
    assert await count(pool, QUARANTINED, "identity_mismatch", frame) == 1
    assert (
        await count(pool, "SELECT count(*) FROM readings WHERE meter_id = $1", device.meter_id) == 0
    )


async def test_oscore_with_wrong_key_is_unauthorized(
    collector: RunningCollector, pool: asyncpg.Pool, device: ProvisionedDevice
) -> None:
    """A request protected with the right kid but a wrong secret is refused and not stored."""
    forged = dict(device.oscore, master_secret="00" * 16)
    client = await oscore_client(collector.coap_port, forged)
    try:
        request = aiocoap.Message(
            code=aiocoap.POST,
            uri=f"coap://127.0.0.1:{collector.coap_port}/u",
            payload=cjt188_frame(device.address, 10_000, hour(13)),
        )
        with pytest.raises(Exception):  # noqa: B017,PT011 (aiocoap: no protected answer)
            await client.request(request).response
    finally:
        await client.shutdown()
    assert (
        await count(pool, "SELECT count(*) FROM readings WHERE meter_id = $1", device.meter_id) == 0
    )


class _BigAnswer(UplinkResource):
    """/u answering every POST with `size` bytes (what a long command envelope would be)."""

    def __init__(self, size: int) -> None:
        super().__init__(CoapSettings(), None, None, EventLimiter())  # type: ignore[arg-type]  # render_post below uses neither
        self.size = size

    async def render_post(self, request: aiocoap.Message, *, too_large: bool = False) -> Any:
        """2.04 with a payload of `size` bytes counting up."""
        return aiocoap.Message(
            code=aiocoap.CHANGED, payload=bytes(i % 251 for i in range(self.size))
        )


async def _server_on_a_free_port(site: Site, **kwargs: Any) -> tuple[Any, int]:
    """An aiocoap server context for `site` on a free loopback port (picked again when
    another process takes it between the pick and the bind)."""
    for attempt in range(5):
        port = free_udp_port()
        try:
            ctx = await aiocoap.Context.create_server_context(
                site, bind=("127.0.0.1", port), **kwargs
            )
        except OSError:
            if attempt == 4:
                raise
        else:
            return ctx, port
    raise AssertionError("unreachable")


@pytest.mark.parametrize("size", [40, 3000])
async def test_an_answer_over_one_block_goes_out_block_wise(size: int) -> None:
    """A request without Block1/Block2 skips aiocoap's block-wise machinery, yet an answer
    over the peer's payload size still goes out in Block2 blocks (RFC 7959 §2.2) that the
    client reassembles; a small one goes out whole."""
    site = Site()
    site.add_resource(["u"], _BigAnswer(size))
    server, port = await _server_on_a_free_port(site)
    client = await aiocoap.Context.create_client_context()
    try:
        request = aiocoap.Message(code=aiocoap.POST, uri=f"coap://127.0.0.1:{port}/u", payload=b"x")
        response = await client.request(request).response
    finally:
        await client.shutdown()
        await server.shutdown()
    assert response.code == aiocoap.CHANGED
    assert response.payload == bytes(i % 251 for i in range(size))
    if size > 1024:
        assert response.opt.block2 is not None
        assert response.opt.block2.block_number > 0
    else:
        assert response.opt.block2 is None


class _Ok(aiocoap.resource.Resource):  # type: ignore[misc]  # aiocoap is untyped
    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        return aiocoap.Message(code=aiocoap.CHANGED, payload=request.payload)


async def test_an_answered_request_leaves_no_cyclic_garbage() -> None:
    """With `acyclic_requests`, a request answered (piggybacked, and a NON) is freed by
    reference counting: the cyclic collector finds no pipe, message or closure of it.
    Upstream's `on_event`/`stop` cycle left ~15 objects per request for it (see the patch)."""
    site = Site()
    site.add_resource(["u"], _Ok())
    server, port = await _server_on_a_free_port(site, transports=["udp6"])
    for tman in server.request_interfaces:
        acyclic_requests(tman)
    loop = asyncio.get_running_loop()
    answers: asyncio.Queue[bytes] = asyncio.Queue()

    class _Client(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: Any) -> None:
            answers.put_nowait(data)

    transport, _ = await loop.create_datagram_endpoint(_Client, remote_addr=("127.0.0.1", port))
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        codes = []
        for i in range(40):
            request = aiocoap.Message(
                code=aiocoap.POST,
                uri_path=("u",),
                payload=b"x%d" % i,
            )
            request.mtype, request.mid = (aiocoap.CON if i % 2 else aiocoap.NON), 1000 + i
            request.token = i.to_bytes(2, "big")
            transport.sendto(request.encode())
            answer = aiocoap.Message.decode(await asyncio.wait_for(answers.get(), 5.0))
            codes.append((answer.code, answer.payload))
        await asyncio.sleep(0.05)  # the pipes' last callbacks
        gc.collect()
        pipes = [o for o in gc.garbage if type(o).__name__ == "Pipe"]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        transport.close()
        await server.shutdown()
    assert codes == [(aiocoap.CHANGED, b"x%d" % i) for i in range(40)]
    assert pipes == []


async def test_the_coap_socket_gets_its_receive_buffer(collector: RunningCollector) -> None:
    """The collector asks for `receive_buffer_bytes` (4 MiB) on its UDP socket, so a herd's
    burst waits in the kernel instead of being dropped; what the kernel granted is a
    metric (capped at net.core.rmem_max, which the log names)."""
    from prometheus_client import REGISTRY

    granted = REGISTRY.get_sample_value("nbmeter_collector_coap_receive_buffer_bytes")
    assert granted is not None
    assert granted >= min(collector.settings.coap.receive_buffer_bytes, _rmem_max())


def _rmem_max() -> int:
    """The kernel's cap on a socket's receive buffer (Linux)."""
    return int(Path("/proc/sys/net/core/rmem_max").read_text())
