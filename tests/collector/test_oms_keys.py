"""OMS mode 5 (AES-128-CBC) uplinks: per-meter keys stored sealed, used by the collector."""

from __future__ import annotations

import secrets
import uuid
from datetime import UTC, datetime

import aiocoap
import asyncpg
import pytest
from collector_testkit import RawCoap, cjt188_frame, hour, oscore_client
from conftest import RunningCollector, count, new_address

from collector.keys import KeyRing, MeterKeys
from collector.store import BatchStore
from collector.uplink import Device, Transport, Uplink
from decoder.mbus_encode import encode_oms_mode5
from devices.provision import ProvisionedDevice, ProvisionError, provision_device
from storage import credentials

QUARANTINED = "SELECT detail FROM quarantine WHERE reason = $1 AND payload = $2"


def oms_address() -> str:
    """A fresh 8-digit M-Bus identification number."""
    return f"{uuid.uuid4().int % 10**8:08d}"


def oms_frame(address: str, key: bytes, total_ml: int, read_at_s: int) -> bytes:
    """A water meter's OMS mode 5 frame with its register and a type F clock."""
    when = datetime.fromtimestamp(read_at_s, UTC)
    return encode_oms_mode5(address, "NBM", 1, 0x07, 0x21, total_ml, key, when)


async def test_oms_uplink_over_oscore_is_decrypted_and_stored(
    collector: RunningCollector,
    pool: asyncpg.Pool,
    db_url: str,
    tenant_slug: str,
    credentials_key: str,
) -> None:
    """An OSCORE device's OMS mode 5 frame decrypts with its provisioned key; 2.04, stored."""
    address, aes = oms_address(), secrets.token_bytes(16)
    device = await provision_device(
        db_url, tenant_slug, address, credentials_key=credentials_key, meter_format="oms",
        aes_key=aes,
    )  # fmt: skip
    client = await oscore_client(collector.coap_port, device.oscore)
    try:
        request = aiocoap.Message(
            code=aiocoap.POST,
            uri=f"coap://127.0.0.1:{collector.coap_port}/u",
            payload=oms_frame(address, aes, 123_456_000, hour(30)),
        )
        response = await client.request(request).response
    finally:
        await client.shutdown()
    assert response.code == aiocoap.CHANGED, response.payload
    rows = await pool.fetch(
        "SELECT register_ml, extract(epoch FROM nbm_at(read_s))::bigint AS at"
        " FROM readings WHERE meter_id = $1",
        device.meter_id,
    )
    assert [(r["register_ml"], r["at"]) for r in rows] == [(123_456_000, hour(30))]


async def test_oms_uplink_over_plain_coap_finds_the_key_by_reported_id(
    raw: RawCoap, pool: asyncpg.Pool, db_url: str, lab_tenant: str, credentials_key: str
) -> None:
    """Plain CoAP names only the tenant; the key of the meter the frame reports is used."""
    address, aes = oms_address(), secrets.token_bytes(16)
    device = await provision_device(
        db_url, lab_tenant, address, credentials_key=credentials_key, meter_format="oms",
        oscore=False, aes_key=aes,
    )  # fmt: skip
    reply = await raw.post(oms_frame(address, aes, 7_000_000, hour(31)), query=f"t={lab_tenant}")
    assert reply.code_str == "2.04", reply.payload
    assert (
        await pool.fetchval("SELECT register_ml FROM readings WHERE meter_id = $1", device.meter_id)
        == 7_000_000
    )


async def test_oms_uplink_with_wrong_key_is_quarantined(
    raw: RawCoap, pool: asyncpg.Pool, db_url: str, lab_tenant: str, credentials_key: str
) -> None:
    """A frame encrypted with another key is 4.00 and quarantined: wrong AES key, no reading."""
    address = oms_address()
    device = await provision_device(
        db_url, lab_tenant, address, credentials_key=credentials_key, meter_format="oms",
        oscore=False, aes_key=secrets.token_bytes(16),
    )  # fmt: skip
    frame = oms_frame(address, secrets.token_bytes(16), 1_000_000, hour(32))
    reply = await raw.post(frame, query=f"t={lab_tenant}")
    assert reply.code_str == "4.00"
    detail = await pool.fetchval(QUARANTINED, "undecodable", frame)
    assert detail.startswith("decrypt_failed:")
    assert "wrong AES key" in detail
    assert address in detail
    assert (
        await count(pool, "SELECT count(*) FROM readings WHERE meter_id = $1", device.meter_id) == 0
    )


async def test_oms_uplink_without_key_is_quarantined_as_no_key(
    raw: RawCoap, pool: asyncpg.Pool, db_url: str, lab_tenant: str, credentials_key: str
) -> None:
    """A meter with no stored key: its encrypted frame is quarantined with no_key."""
    address = oms_address()
    await provision_device(
        db_url, lab_tenant, address, credentials_key=credentials_key, meter_format="oms",
        oscore=False,
    )  # fmt: skip
    frame = oms_frame(address, secrets.token_bytes(16), 2_000_000, hour(33))
    reply = await raw.post(frame, query=f"t={lab_tenant}")
    assert reply.code_str == "4.00"
    assert (await pool.fetchval(QUARANTINED, "undecodable", frame)).startswith("no_key:")


async def test_aes_key_is_stored_sealed_and_bound_to_its_meter(
    pool: asyncpg.Pool, db_url: str, tenant_slug: str, credentials_key: str
) -> None:
    """The database holds no clear key; the sealed blob opens only for its own meter."""
    aes = secrets.token_bytes(16)
    device = await provision_device(
        db_url, tenant_slug, oms_address(), credentials_key=credentials_key, oscore=False,
        aes_key=aes,
    )  # fmt: skip
    sealed = bytes(
        await pool.fetchval(
            "SELECT aes_key_sealed FROM device_credentials WHERE meter_id = $1", device.meter_id
        )
    )
    assert aes not in sealed
    kek = credentials.parse_key(credentials_key)
    assert credentials.open_aes_key(kek, device.meter_id, sealed) == aes
    with pytest.raises(credentials.CredentialsError):
        credentials.open_aes_key(kek, device.meter_id + 1, sealed)


async def test_provisioning_refuses_a_key_that_is_not_aes_128(
    db_url: str, tenant_slug: str, credentials_key: str
) -> None:
    """A 15-byte key is refused before anything is stored."""
    with pytest.raises(ProvisionError, match="16 bytes"):
        await provision_device(
            db_url, tenant_slug, oms_address(), credentials_key=credentials_key,
            aes_key=b"\x00" * 15,
        )  # fmt: skip


async def test_a_removed_meter_is_not_provisioned_again(
    db_url: str, tenant_slug: str, credentials_key: str, pool: asyncpg.Pool
) -> None:
    """Provisioning the address of a removed meter is refused: no phantom meter appears."""
    address = oms_address()
    device = await provision_device(
        db_url, tenant_slug, address, credentials_key=credentials_key, oscore=False
    )
    await pool.execute("UPDATE meters SET removed_at = now() WHERE meter_id = $1", device.meter_id)
    with pytest.raises(ProvisionError, match=r"was removed at .* reinstallation"):
        await provision_device(
            db_url, tenant_slug, address, credentials_key=credentials_key, oscore=False
        )
    count = await pool.fetchval(
        "SELECT count(*) FROM meters m JOIN tenants t USING (tenant_id)"
        " WHERE t.slug = $1 AND m.address = $2",
        tenant_slug,
        address,
    )
    assert count == 1


def test_key_ring_records_misses_and_never_shows_keys() -> None:
    """The decoder's lookups of absent meters are recorded; the repr has ids, not bytes."""
    ring = KeyRing({"12345678": b"\x01" * 16})
    assert ring.get("12345678") == b"\x01" * 16
    assert ring.get("87654321") is None
    assert ring.get("*") is None
    assert ring.missed == {"87654321"}
    assert "01" not in repr(ring).replace("12345678", "")
    assert KeyRing()  # an empty ring is still consulted (truthy)


async def test_one_batch_mixes_tenants_transports_and_formats(
    pool: asyncpg.Pool, db_url: str, tenant_slug: str, lab_tenant: str, credentials_key: str
) -> None:
    """One committed batch: two tenants' meters with the same OMS id and different keys
    (device and plain CoAP) and a CJ/T 188 frame; every uplink decodes with its own key."""
    address = oms_address()
    key_a, key_b = secrets.token_bytes(16), secrets.token_bytes(16)
    dev_a = await provision_device(
        db_url, tenant_slug, address, credentials_key=credentials_key, aes_key=key_a
    )
    dev_b = await provision_device(
        db_url, lab_tenant, address, credentials_key=credentials_key, oscore=False, aes_key=key_b
    )
    cjt = new_address()
    dev_c = await provision_device(db_url, tenant_slug, cjt, credentials_key=credentials_key)
    lab_id = await pool.fetchval("SELECT tenant_id FROM tenants WHERE slug = $1", lab_tenant)
    tenant_id = await pool.fetchval("SELECT tenant_id FROM tenants WHERE slug = $1", tenant_slug)
    batch = [
        Uplink(
            oms_frame(address, key_a, 1_000_000, hour(40)),
            Transport.COAP_OSCORE,
            "[::1]:1",
            device=Device(dev_a.meter_id, tenant_id, address),
        ),
        Uplink(
            oms_frame(address, key_b, 2_000_000, hour(40)),
            Transport.COAP,
            "[::1]:2",
            tenant_id=lab_id,
        ),
        Uplink(
            cjt188_frame(cjt, 30_000, hour(40)),
            Transport.COAP_OSCORE,
            "[::1]:3",
            device=Device(dev_c.meter_id, tenant_id, cjt),
        ),
    ]
    store = BatchStore(pool, MeterKeys(credentials.parse_key(credentials_key)))
    outcomes = await store.commit(batch)
    assert [o.status for o in outcomes] == ["stored"] * 3, outcomes
    rows = await pool.fetch(
        "SELECT meter_id, register_ml FROM readings WHERE meter_id = ANY($1::bigint[])",
        [dev_a.meter_id, dev_b.meter_id, dev_c.meter_id],
    )
    assert {(r["meter_id"], r["register_ml"]) for r in rows} == {
        (dev_a.meter_id, 1_000_000),
        (dev_b.meter_id, 2_000_000),
        (dev_c.meter_id, 30_000),
    }


async def test_keys_are_looked_up_only_for_formats_that_carry_them(
    pool: asyncpg.Pool, db_url: str, tenant_slug: str, credentials_key: str
) -> None:
    """A device registered as a CJ/T 188 meter costs no AES-key lookup before decoding;
    one registered as `interval` that sends an OMS mode 5 frame after all still gets its
    key (the decoder's NO_KEY retry) and is stored."""
    tenant_id = await pool.fetchval("SELECT tenant_id FROM tenants WHERE slug = $1", tenant_slug)
    cjt, oms = new_address(), oms_address()
    aes = secrets.token_bytes(16)
    dev_cjt = await provision_device(db_url, tenant_slug, cjt, credentials_key=credentials_key)
    dev_oms = await provision_device(
        db_url, tenant_slug, oms, credentials_key=credentials_key, meter_format="interval",
        aes_key=aes,
    )  # fmt: skip
    keys = MeterKeys(credentials.parse_key(credentials_key))
    store = BatchStore(pool, keys)
    batch = [
        Uplink(
            cjt188_frame(cjt, 40_000, hour(50)),
            Transport.COAP_OSCORE,
            "[::1]:1",
            device=Device(dev_cjt.meter_id, tenant_id, cjt, "cjt188"),
        ),
        Uplink(
            oms_frame(oms, aes, 3_000_000, hour(50)),
            Transport.COAP_OSCORE,
            "[::1]:2",
            device=Device(dev_oms.meter_id, tenant_id, oms, "interval"),
        ),
    ]
    outcomes = await store.commit(batch)
    assert [o.status for o in outcomes] == ["stored"] * 2, outcomes
    assert (tenant_id, cjt) not in keys._cache  # never asked for
    assert keys._cache[(tenant_id, oms)][0] == aes  # asked after the decoder missed it
    rows = await pool.fetch(
        "SELECT meter_id, register_ml FROM readings WHERE meter_id = ANY($1::bigint[])",
        [dev_cjt.meter_id, dev_oms.meter_id],
    )
    assert {(r["meter_id"], r["register_ml"]) for r in rows} == {
        (dev_cjt.meter_id, 40_000),
        (dev_oms.meter_id, 3_000_000),
    }


async def test_keyless_formats_of_two_tenants_share_one_decode_call(
    pool: asyncpg.Pool, db_url: str, tenant_slug: str, lab_tenant: str, credentials_key: str
) -> None:
    """Devices registered as CJ/T 188 meters in two tenants decode in one call (no key, no
    compact format to keep apart); two tenants' `interval` meters with one OMS id and two
    keys that send OMS frames after all get neither key there: both wait as no_key
    rather than one being read with the other's key."""
    one = int(await pool.fetchval("SELECT tenant_id FROM tenants WHERE slug = $1", tenant_slug))
    two = int(await pool.fetchval("SELECT tenant_id FROM tenants WHERE slug = $1", lab_tenant))
    cjt_a, cjt_b, oms = new_address(), new_address(), oms_address()
    key_a, key_b = secrets.token_bytes(16), secrets.token_bytes(16)
    dev_a = await provision_device(db_url, tenant_slug, cjt_a, credentials_key=credentials_key)
    dev_b = await provision_device(db_url, lab_tenant, cjt_b, credentials_key=credentials_key)
    oms_a = await provision_device(
        db_url, tenant_slug, oms, credentials_key=credentials_key, meter_format="interval",
        aes_key=key_a,
    )  # fmt: skip
    oms_b = await provision_device(
        db_url, lab_tenant, oms, credentials_key=credentials_key, meter_format="interval",
        aes_key=key_b,
    )  # fmt: skip

    def device(frame: bytes, dev: ProvisionedDevice, tenant: int, address: str) -> Uplink:
        fmt = "interval" if address == oms else "cjt188"
        return Uplink(
            frame, Transport.COAP_OSCORE, "[::1]:1",
            device=Device(dev.meter_id, tenant, address, fmt),
        )  # fmt: skip

    store = BatchStore(pool, MeterKeys(credentials.parse_key(credentials_key)))
    batch = [
        device(cjt188_frame(cjt_a, 10_000, hour(55)), dev_a, one, cjt_a),
        device(cjt188_frame(cjt_b, 20_000, hour(55)), dev_b, two, cjt_b),
        device(oms_frame(oms, key_a, 1_000_000, hour(55)), oms_a, one, oms),
        device(oms_frame(oms, key_b, 2_000_000, hour(55)), oms_b, two, oms),
    ]
    async with pool.acquire() as conn:
        _, rounds = await store._decode_keyed(conn, batch)
    assert len(rounds) == 1
    outcomes = await store.commit(batch)
    assert [o.status for o in outcomes] == ["stored", "stored", "quarantined", "quarantined"]
    assert all("no_key" in o.detail for o in outcomes[2:]), outcomes
    rows = await pool.fetch(
        "SELECT meter_id, register_ml FROM readings WHERE meter_id = ANY($1::bigint[])",
        [dev_a.meter_id, dev_b.meter_id, oms_a.meter_id, oms_b.meter_id],
    )
    assert {(r["meter_id"], r["register_ml"]) for r in rows} == {
        (dev_a.meter_id, 10_000),
        (dev_b.meter_id, 20_000),
    }
