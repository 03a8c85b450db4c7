"""MQTT uplinks end to end: a device account on the real Mosquitto, the real collector."""

from __future__ import annotations

import threading
import uuid

import asyncpg
import paho.mqtt.client as paho
import pytest
from collector_testkit import cjt188_frame, hour
from conftest import Broker, count, wait_count

from devices.provision import ProvisionedDevice

MINE = "SELECT count(*) FROM readings WHERE meter_id = $1"


def publish(
    broker: Broker, device: ProvisionedDevice, payloads: list[bytes], topic: str | None = None
) -> list[int]:
    """Publish `payloads` at QoS 1 as `device`; return the broker's reason codes (0 = ok)."""
    client = paho.Client(
        paho.CallbackAPIVersion.VERSION2,
        client_id=f"dev-{uuid.uuid4().hex[:8]}",
        protocol=paho.MQTTv5,
    )
    client.username_pw_set(device.mqtt["username"], device.mqtt["password"])
    acked: dict[int, int] = {}
    done = threading.Event()

    def on_publish(_c: object, _u: object, mid: int, reason: paho.ReasonCode, _p: object) -> None:
        acked[mid] = reason.value
        if len(acked) == len(payloads):
            done.set()

    client.on_publish = on_publish
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        mids = [client.publish(topic or device.mqtt["topic"], p, qos=1).mid for p in payloads]
        assert done.wait(10), "broker did not PUBACK"
    finally:
        client.disconnect()
        client.loop_stop()
    return [acked[m] for m in mids]


@pytest.mark.usefixtures("collector")
async def test_qos1_uplinks_store_exactly_the_readings(
    broker: Broker, pool: asyncpg.Pool, device: ProvisionedDevice
) -> None:
    """QoS 1 uplinks from a device account are stored once each; their uplinks are archived
    with transport 3 (readings keep no transport: the raw archive has it per uplink)."""
    frames = [cjt188_frame(device.address, 10_000 * (h + 1), hour(h)) for h in range(5)]
    assert publish(broker, device, frames) == [0] * 5
    assert await wait_count(pool, 5, MINE, device.meter_id) == 5
    transports = await pool.fetch(
        "SELECT DISTINCT transport FROM raw_uplinks WHERE meter_id = $1 AND outcome = 'stored'",
        device.meter_id,
    )
    assert [r[0] for r in transports] == [3]


@pytest.mark.usefixtures("collector")
async def test_republished_message_is_not_stored_twice(
    broker: Broker, pool: asyncpg.Pool, device: ProvisionedDevice
) -> None:
    """The same uplink published twice (a device retry) stores its reading once."""
    frame = cjt188_frame(device.address, 990_000, hour(30))
    publish(broker, device, [frame, frame])
    archived = "SELECT count(*) FROM raw_uplinks WHERE meter_id = $1"
    assert await wait_count(pool, 2, archived, device.meter_id) == 2
    assert await count(pool, MINE, device.meter_id) == 1
    outcomes = await pool.fetch(
        "SELECT outcome FROM raw_uplinks WHERE meter_id = $1 ORDER BY uplink_id", device.meter_id
    )
    assert sorted(r[0] for r in outcomes) == ["duplicate", "stored"]


@pytest.mark.usefixtures("collector")
async def test_device_publishing_another_meters_frame_is_quarantined(
    broker: Broker, pool: asyncpg.Pool, device: ProvisionedDevice
) -> None:
    """A frame naming another meter, on the device's own topic, is quarantined, not stored."""
    frame = cjt188_frame("12345678901234", 50_000, hour(40))
    publish(broker, device, [frame])
    quarantined = (
        "SELECT count(*) FROM quarantine WHERE reason = 'identity_mismatch' AND meter_id = $1"
    )
    assert await wait_count(pool, 1, quarantined, device.meter_id) == 1
    assert await count(pool, MINE, device.meter_id) == 0


@pytest.mark.usefixtures("collector")
async def test_device_cannot_publish_to_another_topic(
    broker: Broker, device: ProvisionedDevice
) -> None:
    """The broker's ACL refuses a device publishing on another meter's topic."""
    other = device.mqtt["topic"].replace(device.address, "00000000000000")
    codes = publish(broker, device, [b"x"], topic=other)
    assert codes[0] >= 0x80
