"""MQTT shell (paho-mqtt 2): shared, persistent QoS 1 subscription, acked after commit.

Devices publish to `nbmeter/<tenant-slug>/<meter-address>/up`; the broker's ACL lets a
device publish only to its own topic, so the topic names the authenticated device. The
collector subscribes to `$share/<group>/nbmeter/+/+/up` (MQTT 5 shared subscription: the
broker splits messages among collector processes) with a persistent session
(clean_start False, session expiry), and `manual_ack=True`: a PUBACK goes out only when
the message's batch has committed. Until then the broker keeps the message, and
redelivers it after a reconnect or a collector restart; a redelivery is stored as a
duplicate, never twice.

Backpressure is the broker's flow control: the CONNECT carries Receive Maximum
(`receive_maximum`), so the broker never has more than that many unacknowledged messages
in flight to this process, however long the database is away.

Threading: paho's network loop runs in its own thread; its callbacks only hand work to
the event loop with `loop.call_soon_threadsafe`. PUBACKs for messages of an earlier
connection are never sent (message ids are per connection); those messages come again.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as paho
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from collector import metrics
from collector.pipeline import Outcome, Pipeline, PipelineClosed, Transport, Uplink
from collector.settings import MqttSettings

log = structlog.get_logger("collector.mqtt")


@dataclass(frozen=True)
class BrokerAddress:
    """Where the broker is and how to log in, from an `mqtt://user:pw@host:port` URL."""

    host: str
    port: int
    username: str | None
    password: str | None

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        """Parse `mqtt://[user[:password]@]host[:port]` (default port 1883)."""
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "tcp"):
            msg = f"broker URL must start with mqtt:// (got {parts.scheme!r})"
            raise ValueError(msg)
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 1883,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
        )


def parse_topic(topic: str) -> tuple[str, str] | None:
    """(tenant slug, meter address) of an uplink topic, or None when it is not one."""
    parts = topic.split("/")
    if len(parts) != 4 or parts[0] != "nbmeter" or parts[3] != "up":
        return None
    if not parts[1] or not parts[2]:
        return None
    return parts[1], parts[2]


class MqttSubscriber:
    """Feeds uplinks from the broker into the pipeline and acks them once durable."""

    def __init__(self, url: str, settings: MqttSettings, pipeline: Pipeline) -> None:
        """Prepare (not yet connect) a subscriber to the broker at `url`."""
        self._address = BrokerAddress.parse(url)
        self._settings = settings
        self._pipeline = pipeline
        self._loop: asyncio.AbstractEventLoop | None = None
        self._generation = 0  # bumped on every (dis)connect: mids are per connection
        self._accepting = True
        self._connected = asyncio.Event()
        self._inflight: set[asyncio.Future[Outcome]] = set()
        client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=settings.client_id,
            protocol=paho.MQTTv5,
            manual_ack=True,
        )
        if self._address.username:
            client.username_pw_set(self._address.username, self._address.password)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.reconnect_delay_set(min_delay=1, max_delay=10)
        self._client = client

    async def start(self) -> None:
        """Connect (in the background: an absent broker is retried) and start paho's thread."""
        self._loop = asyncio.get_running_loop()
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self._settings.session_expiry_s
        props.ReceiveMaximum = self._settings.receive_maximum
        self._client.connect_async(
            self._address.host,
            self._address.port,
            keepalive=self._settings.keepalive_s,
            clean_start=False,
            properties=props,
        )
        self._client.loop_start()

    async def wait_connected(self, timeout_s: float) -> None:
        """Wait until subscribed (raise TimeoutError after `timeout_s`)."""
        await asyncio.wait_for(self._connected.wait(), timeout_s)

    async def drain_and_stop(self) -> None:
        """Stop taking messages, wait for the in-flight ones to be acked, disconnect."""
        self._accepting = False
        if self._inflight:
            await asyncio.wait(self._inflight)
        self._client.disconnect()
        await asyncio.to_thread(self._client.loop_stop)

    # -- paho's thread: hand everything to the event loop ---------------------------------

    def _on_connect(self, client: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self._generation += 1
        if reason.is_failure:
            log.warning("broker.refused", reason=str(reason))
            return
        topic = f"$share/{self._settings.share_group}/{self._settings.topic}"
        client.subscribe(topic, qos=1)
        log.info("broker.connected", topic=topic, client_id=self._settings.client_id)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._connected.set)

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self._generation += 1
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._connected.clear)
        log.info("broker.disconnected", reason=str(reason))

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(
                self._accept, self._generation, msg.topic, bytes(msg.payload), msg.mid, msg.qos
            )

    # -- event loop ------------------------------------------------------------------------

    def _accept(self, generation: int, topic: str, payload: bytes, mid: int, qos: int) -> None:
        if not self._accepting:
            return  # not acked: the broker redelivers it to our session later
        claimed = parse_topic(topic)
        uplink = Uplink(payload, Transport.MQTT, peer=f"mqtt:{topic}", topic=claimed)
        if claimed is None:
            uplink.reject = ("bad_topic", f"not an uplink topic: {topic[:200]}")
        try:
            # bounded by the broker's Receive Maximum, not by max_pending
            future = self._pipeline.offer(uplink, force=True)
        except PipelineClosed:
            return
        self._inflight.add(future)
        future.add_done_callback(lambda f: self._done(f, generation, mid, qos))

    def _done(self, future: asyncio.Future[Outcome], generation: int, mid: int, qos: int) -> None:
        self._inflight.discard(future)
        if future.cancelled() or future.exception() is not None:
            metrics.UPLINKS.labels("mqtt", "failed").inc()
            return  # not acked: redelivered after the next reconnect
        metrics.UPLINKS.labels("mqtt", future.result().status).inc()
        if qos > 0 and generation == self._generation:
            self._client.ack(mid, qos)
