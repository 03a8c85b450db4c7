"""MQTT side of the mailbox: commands to `nbmeter/<tenant>/<address>/down`, answers from
`.../res`.

When an uplink of a device has been stored and acknowledged (`uplink_stored`, the
collector session's `on_durable` hook), its pending commands are claimed and published
QoS 1 to its down topic: the device is awake and subscribed right then (a device keeps
a persistent session, so the broker also holds them for its next connection). The broker's
ACL lets a device subscribe to its own down topic only, and publish its answers to its
own result topic only, so the topic names the device.

Answers arrive through the shared subscription `$share/<group>/nbmeter/+/+/res` of a
client `<client_id>.down` (persistent session), are recorded, and only then acknowledged;
one that cannot be recorded now (database away) is not acknowledged and comes again
after a reconnect. An answer lost for good is harmless: the command stays `sent` and goes
out again in the next window, which the device answers again from memory.

Threading as in collector.mqtt: paho's network loop runs in its own thread; callbacks
hand work to the event loop.
"""

from __future__ import annotations

import asyncio
from typing import Any

import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from collector.downlink import Downlinks
from collector.mqtt import BrokerAddress, tls_context
from collector.settings import MqttSettings
from storage.errors import RowRefusedError, StorageError

log = structlog.get_logger("collector.downlink")

RESULT_FILTER = "nbmeter/+/+/res"


def down_topic(slug: str, address: str) -> str:
    """The topic a device receives its commands on."""
    return f"nbmeter/{slug}/{address}/down"


def parse_result_topic(topic: str) -> tuple[str, str] | None:
    """(tenant slug, address) of a result topic, or None."""
    parts = topic.split("/")
    if len(parts) != 4 or parts[0] != "nbmeter" or parts[3] != "res" or not all(parts[1:3]):
        return None
    return parts[1], parts[2]


class MqttDownlink:
    """Publishes a device's commands after its uplink; records its answers."""

    def __init__(self, url: str, settings: MqttSettings, downlinks: Downlinks) -> None:
        """Prepare (not yet connect) the downlink client on the broker at `url`."""
        address = BrokerAddress.parse(url)
        self._downlinks = downlinks
        self._shared = f"$share/{settings.share_group}/{RESULT_FILTER}"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._connected = asyncio.Event()
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"{settings.client_id}.down",
            protocol=paho.MQTTv5,
            manual_ack=True,
        )
        if address.username:
            client.username_pw_set(address.username, address.password)
        tls = tls_context(address, settings.ca_file)
        if tls is not None:
            client.tls_set_context(tls)
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        client.reconnect_delay_set(min_delay=1, max_delay=10)
        self._client = client
        self._address = address
        self._settings = settings

    def start(self) -> None:
        """Connect in the background (an absent broker is retried) and start paho's thread."""
        self._loop = asyncio.get_running_loop()
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho: untyped
        props.SessionExpiryInterval = self._settings.session_expiry_s
        self._client.connect_async(
            self._address.host,
            self._address.port,
            keepalive=self._settings.keepalive_s,
            clean_start=False,
            properties=props,
        )
        self._client.loop_start()

    async def wait_connected(self, timeout_s: float) -> None:
        """Wait until subscribed to the answers (TimeoutError after `timeout_s`)."""
        await asyncio.wait_for(self._connected.wait(), timeout_s)

    async def stop(self) -> None:
        """Finish the publishes under way, then disconnect (the session is kept)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5.0)
        self._client.disconnect()
        await asyncio.to_thread(self._client.loop_stop)

    # -- commands out --------------------------------------------------------------------

    def uplink_stored(self, topic: tuple[str, str], meter_id: int | None = None) -> None:
        """A device's uplink is durable: send its pending commands (runs in a task).
        `meter_id` (the topic's meter, when the store resolved it) lets the pending view
        skip the claim."""
        task = asyncio.get_running_loop().create_task(
            self._send(*topic, meter_id), name="downlink-mqtt"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, slug: str, address: str, meter_id: int | None) -> None:
        envelope = await self._downlinks.for_topic(slug, address, meter_id)
        if envelope:
            info = self._client.publish(down_topic(slug, address), envelope, qos=1)
            if info.rc != paho.MQTT_ERR_SUCCESS:  # goes out again in the next window
                log.warning("downlink.publish_failed", rc=info.rc, address=address)

    # -- answers in ----------------------------------------------------------------------

    def _on_connect(self, client: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            log.warning("downlink.connect_failed", reason=str(reason))
            return
        client.subscribe(self._shared, qos=1)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._connected.set)

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        if self._loop is None:
            return
        topic, payload, mid, qos = msg.topic, bytes(msg.payload), msg.mid, msg.qos
        self._loop.call_soon_threadsafe(self._accept, topic, payload, mid, qos)

    def _accept(self, topic: str, payload: bytes, mid: int, qos: int) -> None:
        task = asyncio.get_running_loop().create_task(
            self._answer(topic, payload, mid, qos), name="downlink-answer"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, topic: str, payload: bytes, mid: int, qos: int) -> None:
        device = parse_result_topic(topic)
        try:
            meter_id = await self._downlinks.meter_of_topic(*device) if device else None
            if device is None or meter_id is None:
                log.warning("downlink.answer_refused", topic=topic[:200], why="no such meter")
            else:
                outcome = await self._downlinks.answer(meter_id, device[1], payload)
                unknown = [cid for cid, what in outcome.items() if what == "unknown"]
                if unknown:
                    log.warning("downlink.answer_unknown", meter_id=meter_id, commands=unknown)
        except (ValueError, RowRefusedError) as exc:
            # not a result, or one the database refuses as sent: acknowledged, never
            # redelivered for ever
            log.warning("downlink.answer_refused", topic=topic[:200], why=str(exc)[:200])
        except StorageError as exc:  # not acknowledged: it comes again after a reconnect
            log.warning("downlink.answer_deferred", error=str(exc))
            return
        except Exception:  # a fault of ours: logged and acknowledged, for a message left
            # unacknowledged holds back every later result of every device (the broker
            # keeps at most 20 in flight to this subscriber) and would fail again anyway
            log.exception("downlink.answer_failed", topic=topic[:200])
        if qos > 0:
            self._client.ack(mid, qos)
