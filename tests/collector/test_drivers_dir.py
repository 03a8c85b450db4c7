"""The collector installs a tenant's driver files at start (NBMETER_DRIVERS_DIR)."""

from __future__ import annotations

import asyncio
import time
import uuid
from importlib import resources
from pathlib import Path

import asyncpg
import pytest
from brokerkit import Broker
from collector_testkit import RawCoap
from conftest import add_meter, collector_settings, count, wait_count
from test_mqtt import publish

from collector.main import run
from decoder import drivers
from decoder.drivers import DriverError
from devices.provision import provision_device


def _crc_modbus(data: bytes) -> int:
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def _tenant_driver() -> str:
    """The shipped ACME NB-1 driver as a tenant's own model: another name and magic."""
    text = resources.files("decoder.drivers").joinpath("builtin/acme_nb1.toml").read_text()
    text = text.replace('name = "acme_nb1"', 'name = "acme_tenant_test"')
    text = text.replace('magic = "AC4E01"', 'magic = "AC4E7F"')
    head, _, _ = text.partition("[[example]]")
    golden = _frame("860000000001", 123, int(time.time())).hex()
    return head + f'[[example]]\nhex = "{golden}"\ntotal_m3 = "0.0123"\n'


def _frame(address: str, total_dl: int, when: int) -> bytes:
    body = (
        bytes.fromhex("AC4E7F" + address)
        + total_dl.to_bytes(4, "little")
        + bytes(4)
        + when.to_bytes(4, "little")
        + bytes(2)
        + (3600).to_bytes(2, "little")
        + b"\xa0"
    )
    return body + _crc_modbus(body).to_bytes(2, "little")


async def test_collector_stores_a_frame_of_a_tenant_driver(
    tmp_path: Path, db_url: str, broker: Broker, credentials_key: str, pool: asyncpg.Pool,
    lab_tenant: str,
) -> None:  # fmt: skip
    """A model known only from a driver file in the drivers directory is decoded and
    stored by a collector started with that directory (real stack, plain CoAP)."""
    (tmp_path / "acme_tenant.toml").write_text(_tenant_driver())
    settings = collector_settings(db_url, broker, credentials_key).model_copy(
        update={"drivers_dir": tmp_path}
    )
    address = "860000000042"
    meter_id = await add_meter(pool, lab_tenant, address)
    when = int(time.time()) - 60
    stop, started = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(run(settings, stop=stop, started=started))
    try:
        await asyncio.wait_for(started.wait(), 20)
        assert "acme_tenant_test" in {d.name for d in drivers.installed()}
        client = await RawCoap.open(settings.coap.port)
        try:
            reply = await client.post(_frame(address, 987_654, when), query=f"t={lab_tenant}")
        finally:
            client.close()
        assert reply.code_str == "2.04", reply.payload
        rows = await pool.fetch(
            "SELECT register_ml, extract(epoch FROM nbm_at(read_s))::bigint AS at FROM readings"
            " WHERE meter_id = $1",
            meter_id,
        )
        assert [(r["register_ml"], r["at"]) for r in rows] == [(98_765_400, when)]
    finally:
        stop.set()
        await asyncio.wait_for(task, 40)
        drivers.uninstall("acme_tenant_test")


async def test_collector_refuses_to_start_with_a_malformed_driver(
    tmp_path: Path, db_url: str, broker: Broker, credentials_key: str
) -> None:
    """One bad file in the directory stops the start, naming the file and line; none of
    the directory's drivers is installed."""
    (tmp_path / "a_good.toml").write_text(_tenant_driver())
    bad = _tenant_driver().replace('kind = "unix32"', 'kind = "unix64"')
    (tmp_path / "b_bad.toml").write_text(bad)
    settings = collector_settings(db_url, broker, credentials_key).model_copy(
        update={"drivers_dir": tmp_path}
    )
    with pytest.raises(DriverError, match=r"b_bad\.toml line \d+: field 'read_time'"):
        await run(settings, stop=asyncio.Event())
    assert "acme_tenant_test" not in {d.name for d in drivers.installed()}


async def test_a_tenants_driver_decodes_only_that_tenants_frames(
    tmp_path: Path, db_url: str, broker: Broker, credentials_key: str, pool: asyncpg.Pool,
    lab_tenant: str,
) -> None:  # fmt: skip
    """A driver file in `<dir>/<tenant slug>/` decodes that tenant's frames only: the very
    same frame sent for another tenant (same meter address) is refused, not read through
    it; the shipped drivers still decode both tenants' frames."""
    other = f"lab-{uuid.uuid4().hex[:12]}"
    await pool.execute(
        "INSERT INTO tenants (slug, name, allow_plain_coap) VALUES ($1, $1, true)", other
    )
    (tmp_path / lab_tenant).mkdir()
    (tmp_path / lab_tenant / "acme_tenant.toml").write_text(_tenant_driver())
    settings = collector_settings(db_url, broker, credentials_key).model_copy(
        update={"drivers_dir": tmp_path}
    )
    address = "860000000043"
    mine, theirs = await add_meter(pool, lab_tenant, address), await add_meter(pool, other, address)
    when = int(time.time()) - 60
    frame = _frame(address, 4242, when)
    stop, started = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(run(settings, stop=stop, started=started))
    try:
        await asyncio.wait_for(started.wait(), 20)
        assert "acme_tenant_test" not in {d.name for d in drivers.installed()}  # not for all
        assert "acme_tenant_test" in {d.name for d in drivers.installed(lab_tenant)}
        client = await RawCoap.open(settings.coap.port)
        try:
            refused = await client.post(frame, query=f"t={other}")
            stored = await client.post(frame, query=f"t={lab_tenant}")
            shipped = await client.post(_acme(address), query=f"t={other}")
        finally:
            client.close()
        assert (refused.code_str, stored.code_str) == ("4.00", "2.04"), refused.payload
        assert shipped.code_str == "2.04", shipped.payload
        rows = await pool.fetch(
            "SELECT meter_id, register_ml FROM readings WHERE meter_id = ANY($1) ORDER BY 1, 2",
            [mine, theirs],
        )
        assert [(r[0], r[1]) for r in rows] == [(mine, 424_200), (theirs, 500)]
        reasons = await pool.fetch(
            "SELECT q.reason FROM quarantine q JOIN tenants t USING (tenant_id) WHERE t.slug = $1",
            other,
        )
        assert [r[0] for r in reasons] == ["undecodable"]
    finally:
        stop.set()
        await asyncio.wait_for(task, 40)
        drivers.uninstall("acme_tenant_test", lab_tenant)


def _acme(address: str) -> bytes:
    """A frame of the shipped ACME NB-1 driver (magic AC4E01): 0.5 L, read 30 s ago."""
    body = bytearray(_frame(address, 5, int(time.time()) - 30)[:-2])
    body[2] = 0x01
    return bytes(body) + _crc_modbus(bytes(body)).to_bytes(2, "little")


async def test_authenticated_devices_frames_take_their_own_tenants_drivers(
    tmp_path: Path, db_url: str, broker: Broker, credentials_key: str, pool: asyncpg.Pool,
    tenant_slug: str,
) -> None:  # fmt: skip
    """MQTT devices of two tenants publish the same model's frames: the tenant with the
    driver file in its folder stores its reading, the other tenant's frame is refused
    (undecodable), whichever batch they share."""
    other = f"t-{uuid.uuid4().hex[:12]}"
    await pool.execute("INSERT INTO tenants (slug, name) VALUES ($1, $1)", other)
    (tmp_path / tenant_slug).mkdir()
    (tmp_path / tenant_slug / "acme_tenant.toml").write_text(_tenant_driver())
    settings = collector_settings(db_url, broker, credentials_key).model_copy(
        update={"drivers_dir": tmp_path}
    )
    devices = [
        await provision_device(db_url, slug, address, credentials_key=credentials_key,
                               mqtt_admin_url=broker.admin_url, oscore=False)
        for slug, address in ((tenant_slug, "860000000051"), (other, "860000000052"))
    ]  # fmt: skip
    when = int(time.time()) - 60
    stop, started = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(run(settings, stop=stop, started=started))
    try:
        await asyncio.wait_for(started.wait(), 20)
        mine, theirs = (d.meter_id for d in devices)
        readings = "SELECT count(*) FROM readings WHERE meter_id = $1"
        refused = "SELECT count(*) FROM quarantine WHERE meter_id = $1 AND reason = 'undecodable'"
        for _ in range(20):  # the subscription is made in the background: send until in
            for device in devices:
                assert publish(broker, device, [_frame(device.address, 5151, when)]) == [0]
            if await wait_count(pool, 1, readings, mine, within_s=1) == 1:
                break
        assert await count(pool, readings, mine) == 1
        assert await wait_count(pool, 1, refused, theirs) >= 1
        assert await count(pool, readings, theirs) == 0
        got = await pool.fetchval("SELECT register_ml FROM readings WHERE meter_id = $1", mine)
        assert got == 515_100
    finally:
        stop.set()
        await asyncio.wait_for(task, 40)
        drivers.uninstall("acme_tenant_test", tenant_slug)
