"""Alarm events on the tenant's MQTT alert topic (the real broker): published once with
the webhook's body and event id, marked sent; a consumer account sees only its tenant."""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import uuid
from datetime import UTC, datetime

import asyncpg
import paho.mqtt.client as paho
from brokerkit import Broker
from paho.mqtt.enums import CallbackAPIVersion

from collector.alerts_mqtt import AlertPublisher, consumer_commands, topic_of
from collector.mqtt import BrokerAddress
from devices.broker import dynsec
from storage.events import write_events
from storage.rows import EventRow


def _subscriber(
    broker: Broker, username: str, password: str, topic: str
) -> tuple[paho.Client, list[bytes]]:
    got: list[bytes] = []
    subscribed = threading.Event()
    address = BrokerAddress.parse(broker.url)
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.username_pw_set(username, password)
    client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
    client.on_subscribe = lambda *_: subscribed.set()
    client.on_message = lambda _c, _u, msg: got.append(msg.payload)
    client.connect(address.host, address.port)
    client.loop_start()
    assert subscribed.wait(10), "the consumer's subscription was not confirmed"
    return client, got


async def test_alarm_event_published_on_the_tenant_topic(
    pool: asyncpg.Pool, broker: Broker
) -> None:
    """An alarm.opened reaches the tenant's consumer once; the event is marked sent; a
    second step publishes nothing again."""
    slug = f"mq-{uuid.uuid4().hex[:10]}"
    tenant = await pool.fetchval(
        "INSERT INTO tenants (slug, name) VALUES ($1, $1) RETURNING tenant_id", slug
    )
    await pool.execute("UPDATE alarm_events SET mqtt_sent_at = now() WHERE mqtt_sent_at IS NULL")
    user, password = f"alerts-{slug}", secrets.token_urlsafe(16)
    answers = await asyncio.to_thread(
        dynsec, broker.admin_url, consumer_commands(slug, user, password)
    )
    assert not [a for a in answers[2:] if a.get("error")], answers
    client, got = await asyncio.to_thread(_subscriber, broker, user, password, topic_of(slug))
    publisher = AlertPublisher(broker.url, pool)
    publisher.start()
    try:
        async with pool.acquire() as conn, conn.transaction():
            meter = await conn.fetchval(
                "INSERT INTO meters (tenant_id, address, kind, format)"
                " VALUES ($1, 'mq1', 'gas', 'cjt188') RETURNING meter_id",
                tenant,
            )
            now = datetime.now(UTC)
            await write_events(conn, [EventRow(meter, now, "tamper", now)])
        for _ in range(100):
            if await publisher.step():
                break
            await asyncio.sleep(0.1)
        for _ in range(100):
            if got:
                break
            await asyncio.sleep(0.05)
        assert await publisher.step() == 0
        await asyncio.sleep(0.3)
        [body] = [json.loads(p) for p in got]
        assert (body["type"], body["tenant"], body["data"]["kind"]) == (
            "alarm.opened",
            slug,
            "tamper",
        )
        sent = await pool.fetchval(
            "SELECT mqtt_sent_at IS NOT NULL FROM alarm_events WHERE event_id = $1::uuid",
            body["id"],
        )
        assert sent is True
    finally:
        publisher.stop()
        client.disconnect()
        client.loop_stop()
        await asyncio.to_thread(
            dynsec, broker.admin_url,
            [{"command": "deleteClient", "username": user},
             {"command": "deleteRole", "rolename": f"alerts:{user}"}],
        )  # fmt: skip
