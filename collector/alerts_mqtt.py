"""Alarm events on MQTT: `nbmeter/<tenant-slug>/alerts`, QoS 1, for consumers on the broker.

Every alarm event (`alarm_events`, the same JSON body and event id as its webhook) is
published once the broker acknowledges it (PUBACK), then marked `mqtt_sent_at`; until then
it is published again after a restart (at least once: consumers de-duplicate on `id`).
Publishing uses the collector's broker account, whose role is allowed to send on
`nbmeter/+/alerts` (`devices.broker`); a tenant's consumer needs an account allowed to
subscribe to its own topic.

paho's network loop runs in its own thread; `publish` waits for the PUBACK off the event
loop (`asyncio.to_thread`).
"""

from __future__ import annotations

import asyncio
import uuid

import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import CallbackAPIVersion

from collector import metrics
from collector.mqtt import BrokerAddress, tls_context
from storage import webhooks as store
from storage.pool import Pool

log = structlog.get_logger("collector.alerts_mqtt")

TOPIC = "nbmeter/{slug}/alerts"
_PUBACK_WAIT_S = 5.0


def topic_of(slug: str) -> str:
    """The tenant's alert topic."""
    return TOPIC.format(slug=slug)


def consumer_commands(slug: str, username: str, password: str) -> list[dict[str, object]]:
    """Dynamic-security commands (`devices.broker.dynsec`) for an account that may only
    subscribe to tenant `slug`'s alert topic (replacing one of that name)."""
    role = f"alerts:{username}"
    acls: list[dict[str, object]] = [
        {"command": "addRoleACL", "rolename": role, "acltype": acltype,
         "topic": topic_of(slug), "allow": True}
        for acltype in ("subscribePattern", "publishClientReceive")
    ]  # fmt: skip
    return [
        {"command": "deleteClient", "username": username},
        {"command": "deleteRole", "rolename": role},
        {"command": "createRole", "rolename": role},
        *acls,
        {"command": "createClient", "username": username, "password": password,
         "roles": [{"rolename": role}]},
    ]  # fmt: skip


class AlertPublisher:
    """Publishes due alarm events; `step` is called by the dispatcher's loop."""

    def __init__(self, url: str, pool: Pool, batch_max: int = 200) -> None:
        address = BrokerAddress.parse(url)
        self._pool = pool
        self._batch_max = batch_max
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"nbmeter-alerts-{uuid.uuid4().hex[:8]}",
            protocol=paho.MQTTv5,
        )
        if address.username is not None:
            self._client.username_pw_set(address.username, address.password)
        if (tls := tls_context(address)) is not None:
            self._client.tls_set_context(tls)
        self._address = address
        self._started = False
        self._refused: set[int] = set()  # mids the broker answered with a failure code
        self._client.on_publish = self._on_publish

    def _on_publish(
        self, _client: object, _userdata: object, mid: int, reason: object, _props: object
    ) -> None:
        # MQTT 5: a PUBACK may carry a failure (0x87 not authorized): not delivered
        if getattr(reason, "is_failure", False):
            self._refused.add(mid)

    def start(self) -> None:
        """Connect in the background (an absent broker is retried by paho)."""
        self._client.connect_async(self._address.host, self._address.port)
        self._client.loop_start()
        self._started = True

    def stop(self) -> None:
        """Disconnect and stop paho's thread."""
        if self._started:
            self._client.disconnect()
            self._client.loop_stop()

    async def step(self) -> int:
        """Publish the due events (oldest first); return how many the broker acknowledged."""
        if not self._client.is_connected():
            return 0
        rows = await store.unsent_alerts(self._pool, self._batch_max)
        if not rows:
            return 0
        infos = [
            (r["event_id"], self._client.publish(topic_of(r["slug"]), r["body"], qos=1))
            for r in rows
        ]
        acked = await asyncio.to_thread(_wait_all, [info for _, info in infos])
        done = [
            event_id
            for (event_id, info), ok in zip(infos, acked, strict=True)
            if ok and info.mid not in self._refused
        ]
        self._refused.difference_update(info.mid for _, info in infos)
        if done:
            await store.mark_alerts_sent(self._pool, done)
            metrics.ALERTS_MQTT.inc(len(done))
        if len(done) < len(rows):
            log.warning("alerts.unacknowledged", published=len(rows), acknowledged=len(done))
        return len(done)


def _wait_all(infos: list[paho.MQTTMessageInfo]) -> list[bool]:
    """Wait (in a worker thread) for each message's PUBACK; True where it came."""
    out = []
    for info in infos:
        try:
            info.wait_for_publish(_PUBACK_WAIT_S)
        except (RuntimeError, ValueError):  # not queued: disconnected meanwhile
            out.append(False)
            continue
        out.append(info.is_published())
    return out
