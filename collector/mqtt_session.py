"""One broker session of the collector: connect, take messages, ack after commit, leave.

A `Session` is one paho client under one MQTT client id. The collector's own session is
a *member* of the share group; an *adopter* is a second session the collector opens
under a crashed peer's client id, to take that peer's session over and end it.

What Mosquitto 2.0 does (tested against 2.0.11, and read in its src/subs.c and
src/session_expiry.c): a shared subscription hands each message to the next member in
turn, online or not, and puts it in that member's session. Nothing ever moves to
another member: when a session expires, or is ended with a session expiry of 0, the
messages still in it are discarded. So nothing may be left in a session that ends:

- **leave** (graceful stop, and every adoption): UNSUBSCRIBE the shared filters (from
  the UNSUBACK on, the broker gives this session nothing new), then publish a marker to
  the session's own drain topic. The broker queues it behind every message the session
  still holds, so once the marker comes back, everything that was in the session has
  been handed to the pipeline. When those are committed and acknowledged, DISCONNECT
  with session expiry 0 ends the now empty session.
- **unclean** (a leave that timed out, a message left unacknowledged, a reconnect in
  between): DISCONNECT with reason 0x04 keeps the session and makes the broker publish
  the will, so a surviving collector takes the session over (or a restart with the same
  client id resumes it).
- **crash**: the session's connections carry an MQTT 5 will, retained, "client id
  gone", published by the broker `will_delay_s` after the connection broke unless the
  same client id came back first. Each collector also keeps a *watcher* connection, a
  session that ends with its connection (expiry 0), subscribed to the wills through a
  shared subscription: exactly one live collector gets each will (a dead collector's
  watcher session is gone, so a will never lands in a dead member's queue). It opens an
  adopter session under the dead client id (the session comes with its share
  subscription and its queued messages), leaves it as above, clears the retained will,
  and only then acknowledges it. If it dies meanwhile, the adopter connection breaks and
  the broker publishes the same will again. A will published while no collector was
  alive stays retained, and every watcher reads retained wills when it subscribes (if
  two take the same session over, the later connection wins and the earlier stops). A
  member clears its own retained will when it connects.

Control topics (collector accounts only): `nbmeter-collector/<group>/<client id>/gone`
(the wills) and `.../drain` (the markers).
"""

from __future__ import annotations

import asyncio
import secrets
import ssl
from collections.abc import Callable
from typing import Any, Literal

import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from collector import metrics
from collector.answers import mqtt_acks
from collector.pipeline import Pipeline, PipelineClosed
from collector.settings import MqttSettings
from collector.uplink import Outcome, Transport, Uplink
from devices.topics import CONTROL_ROOT
from storage.reasons import Reason


def _properties(packet_type: int) -> Properties:
    """MQTT 5 properties for one packet type (paho's constructor carries no annotations)."""
    return Properties(packet_type)  # type: ignore[no-untyped-call]  # paho: untyped __init__


log = structlog.get_logger("collector.mqtt")

_TAKEN_OVER = 0x8E  # MQTT 5 reason: another connection with this client id took over
_DISCONNECT_WITH_WILL = 0x04

# (peer client id, acknowledge the will) -> the collector takes the peer's session over
AdoptHook = Callable[[str, Callable[[], None]], None]
Role = Literal["member", "adopter", "watcher"]
# (tenant slug, address), the topic's meter id (None: not resolved) -> its commands go out
DurableHook = Callable[[tuple[str, str], int | None], None]
_LIVE_WILLS, _RETAINED_WILLS = 1, 2  # subscription identifiers of the watcher


def control_topic(group: str, client_id: str, leaf: str) -> str:
    """The control topic `leaf` (gone, drain) of collector `client_id` in share `group`."""
    return f"{CONTROL_ROOT}/{group}/{client_id}/{leaf}"


def parse_topic(topic: str) -> tuple[str, str] | None:
    """(tenant slug, meter address) of an uplink topic, or None when it is not one."""
    parts = topic.split("/")
    if len(parts) != 4 or parts[0] != "nbmeter" or parts[3] != "up":
        return None
    if not parts[1] or not parts[2]:
        return None
    return parts[1], parts[2]


class Session:
    """One paho client under one client id: feeds the pipeline, acks after commit, leaves.

    `role`: the collector's own session in the share group (member), a crashed peer's
    session taken over (adopter), or the connection that receives peers' wills (watcher).
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        credentials: tuple[str, str | None] | None,
        tls: ssl.SSLContext | None,
        settings: MqttSettings,
        pipeline: Pipeline,
        client_id: str,
        role: Role,
        adopt: AdoptHook,
        on_durable: DurableHook | None = None,
    ) -> None:
        """Prepare (not yet connect) the session `client_id` in `role`; `on_durable` is
        called with an uplink's (tenant slug, address) and meter id once it is stored and
        acked."""
        self.client_id = client_id
        self._on_durable = on_durable  # issue 13: the device's pending commands go out
        self.role = role
        self._host, self._port = host, port
        self._settings = settings
        self._pipeline = pipeline
        self._adopt = adopt
        group = settings.share_group
        self._shared = f"$share/{group}/{settings.topic}"
        self._gone_topic = control_topic(group, client_id, "gone")
        self._drain_topic = control_topic(group, client_id, "drain")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._generation = 0  # bumped on every (dis)connect: mids are per connection
        self._connected = asyncio.Event()
        self.session_present: bool | None = None
        self.taken_over = False
        self._leaving = False
        self._unclean: list[str] = []  # why the session must not be ended
        self._unacked_in: set[int] = set()  # connections that left a message unacked
        self.taken_in = 0  # uplinks handed to the pipeline
        self._marker: str | None = None
        self._marker_seen = asyncio.Event()
        self._lost = asyncio.Event()  # an adopter's connection ended (it never comes back)
        self._unsubacks: dict[int, asyncio.Future[None]] = {}
        self._inflight: set[asyncio.Future[Outcome]] = set()
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv5,
            manual_ack=True,
            reconnect_on_failure=role != "adopter",  # an adopter never comes back by itself
        )
        if credentials is not None:
            client.username_pw_set(*credentials)
        if tls is not None:
            client.tls_set_context(tls)
        if role != "watcher":
            will = _properties(PacketTypes.WILLMESSAGE)
            will.WillDelayInterval = settings.will_delay_s
            client.will_set(self._gone_topic, client_id, qos=1, retain=True, properties=will)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_unsubscribe = self._on_unsubscribe
        client.on_subscribe = self._on_subscribe
        client.reconnect_delay_set(min_delay=1, max_delay=10)
        self._client = client

    # -- lifecycle (event loop) --------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background (an absent broker is retried) with paho's thread."""
        self._loop = asyncio.get_running_loop()
        watcher = self.role == "watcher"
        props = _properties(PacketTypes.CONNECT)
        # a watcher's session ends with its connection: no will waits in a dead one
        props.SessionExpiryInterval = 0 if watcher else self._settings.session_expiry_s
        props.ReceiveMaximum = self._settings.receive_maximum
        self._client.connect_async(
            self._host,
            self._port,
            keepalive=self._settings.keepalive_s,
            clean_start=watcher,
            properties=props,
        )
        self._client.loop_start()

    async def wait_connected(self, timeout_s: float) -> None:
        """Wait until connected and subscribed (raise TimeoutError after `timeout_s`)."""
        await asyncio.wait_for(self._connected.wait(), timeout_s)

    async def leave(self) -> None:
        """Leave the share group and take in all the session still holds (module docstring)."""
        self._leaving = True
        generation = self._generation
        if not self._connected.is_set():
            self._unclean.append("not connected when leaving")
            return
        try:
            async with asyncio.timeout(self._settings.leave_timeout_s):
                rc, mid = self._client.unsubscribe(self._shared)
                if rc != paho.MQTT_ERR_SUCCESS or mid is None:
                    self._unclean.append(f"unsubscribe failed ({rc})")
                    return
                unsuback = asyncio.get_running_loop().create_future()
                self._unsubacks[mid] = unsuback
                await unsuback
                self._marker = secrets.token_hex(8)
                self._client.publish(self._drain_topic, self._marker, qos=1)
                # an adopter whose connection is gone (the peer came back) waits no more
                waits = [asyncio.ensure_future(e.wait()) for e in (self._marker_seen, self._lost)]
                try:
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for w in waits:
                        w.cancel()
        except TimeoutError:
            limit = self._settings.leave_timeout_s
            self._unclean.append(f"the broker did not hand over the session within {limit} s")
        if generation != self._generation:
            self._unclean.append("the connection broke while leaving")

    async def finish(self, *, end_session: bool) -> bool:
        """Wait for every message taken to be committed and acked, then disconnect.

        With `end_session` and a clean leave, the session is ended (expiry 0); otherwise it
        is kept and the broker publishes its will. Returns True when the session ended.
        """
        self._leaving = True
        if self._inflight:
            _, pending = await asyncio.wait(self._inflight, timeout=self._settings.leave_timeout_s)
            if pending:
                self._unclean.append(f"{len(pending)} message(s) still not committed")
        if self._generation in self._unacked_in:
            self._unclean.append("a message was not committed")
        ended = False
        if self.taken_over:
            pass  # the session lives on under the other connection
        elif self.role == "watcher":
            self._client.disconnect()
        elif end_session and not self._unclean and self._marker_seen.is_set():
            props = _properties(PacketTypes.DISCONNECT)
            props.SessionExpiryInterval = 0
            self._client.disconnect(properties=props)
            ended = True
            log.info("broker.session_ended", client_id=self.client_id)
        else:
            if end_session:
                log.warning(
                    "broker.session_kept",
                    client_id=self.client_id,
                    why="; ".join(self._unclean) or "not left",
                    hint="a surviving collector takes it over after the will delay, or "
                    "restart this collector with the same client id",
                )
            self._client.disconnect(
                reasoncode=ReasonCode(PacketTypes.DISCONNECT, identifier=_DISCONNECT_WITH_WILL)
            )
        await asyncio.to_thread(self._client.loop_stop)
        return ended

    async def abandon(self) -> None:
        """Disconnect at once, keeping the session and publishing its will (shutdown)."""
        self._client.disconnect(
            reasoncode=ReasonCode(PacketTypes.DISCONNECT, identifier=_DISCONNECT_WITH_WILL)
        )
        await asyncio.to_thread(self._client.loop_stop)

    def keep(self, why: str) -> None:
        """Do not end this session when finishing (it still holds something): `why`."""
        self._unclean.append(why)

    # -- paho's thread: hand everything to the event loop ---------------------------------

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(fn, *args)

    def _on_connect(self, client: paho.Client, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        self._generation += 1
        if reason.is_failure:
            log.warning("broker.refused", client_id=self.client_id, reason=str(reason))
            return
        self.session_present = bool(flags.session_present)
        if self.role == "watcher":
            wills = control_topic(self._settings.share_group, "+", "gone")
            for sub_id, topic in ((_LIVE_WILLS, f"$share/{self._settings.share_group}/{wills}"),
                                  (_RETAINED_WILLS, wills)):  # fmt: skip
                props = _properties(PacketTypes.SUBSCRIBE)
                props.SubscriptionIdentifier = sub_id
                client.subscribe(topic, qos=1, properties=props)
        else:
            if self.role == "member":
                client.publish(self._gone_topic, b"", qos=1, retain=True)  # we are back
                if not self._leaving:
                    client.subscribe(self._shared, qos=1)
            client.subscribe(self._drain_topic, qos=1)
        log.info(
            "broker.connected",
            client_id=self.client_id,
            session_present=self.session_present,
            role=self.role,
        )
        self._call(self._connected.set)

    def _on_connect_fail(self, _c: Any, _u: Any) -> None:
        log.warning("broker.connect_failed", client_id=self.client_id, host=self._host)

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self._generation += 1
        if getattr(reason, "value", None) == _TAKEN_OVER:
            self.taken_over = True
            if self.role == "member":
                log.error(
                    "broker.session_taken_over",
                    client_id=self.client_id,
                    hint="another process connected with this client id: give each "
                    "collector its own NBMETER_MQTT__CLIENT_ID",
                )
        log.info("broker.disconnected", client_id=self.client_id, reason=str(reason))
        self._call(self._connected.clear)
        if self.role == "adopter":
            self._call(self._lost.set)

    def _on_subscribe(self, _c: Any, _u: Any, _mid: int, reasons: Any, _p: Any) -> None:
        refused = [str(r) for r in reasons if r.is_failure]
        if refused:
            log.error(
                "broker.subscription_refused",
                client_id=self.client_id,
                role=self.role,
                reasons=refused,
                hint="the broker's collector role lacks an ACL: run `nbmeter stack up` "
                "(it adds them to a running broker), or see devices/broker.py",
            )

    def _on_unsubscribe(self, _c: Any, _u: Any, mid: int, _r: Any, _p: Any) -> None:
        self._call(self._unsubscribed, mid)

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        generation = self._generation
        if self.role == "watcher":
            ids = getattr(msg.properties, "SubscriptionIdentifier", None) or []
            # a live will through the shared subscription, or one retained while no
            # collector was alive; the other copies are acknowledged and ignored
            wanted = _LIVE_WILLS in ids or (_RETAINED_WILLS in ids and msg.retain)
            self._call(self._will, generation, msg.topic, bool(msg.payload) and wanted, msg.mid)
            return
        self._call(self._accept, generation, msg.topic, bytes(msg.payload), msg.mid, msg.qos)

    # -- event loop ------------------------------------------------------------------------

    def _unsubscribed(self, mid: int) -> None:
        future = self._unsubacks.pop(mid, None)
        if future is not None and not future.done():
            future.set_result(None)

    def _ack(self, generation: int, mid: int, qos: int) -> None:
        if qos > 0 and generation == self._generation:
            self._client.ack(mid, qos)

    def _accept(self, generation: int, topic: str, payload: bytes, mid: int, qos: int) -> None:
        if topic == self._drain_topic:
            self._ack(generation, mid, qos)
            if self._marker is not None and payload.decode(errors="replace") == self._marker:
                self._marker_seen.set()
            return
        if topic.startswith(f"{CONTROL_ROOT}/"):
            self._ack(generation, mid, qos)  # a will from an older version's subscription
            return
        self.taken_in += 1
        claimed = parse_topic(topic)
        uplink = Uplink(payload, Transport.MQTT, peer=f"mqtt:{topic}", topic=claimed)
        if claimed is None:
            uplink.reject = (Reason.BAD_TOPIC, f"not an uplink topic: {topic[:200]}")
        try:
            # bounded by the broker's Receive Maximum, not by max_pending
            future = self._pipeline.offer(uplink, force=True)
        except PipelineClosed:
            self._unclean.append("a message came after the pipeline closed")
            return  # not acked: it stays in the session, which is therefore kept
        self._inflight.add(future)
        future.add_done_callback(lambda f: self._done(f, generation, mid, qos, uplink))

    def _will(self, generation: int, topic: str, wanted: bool, mid: int) -> None:
        peer = topic.split("/")[2]
        if not wanted or peer == self.client_id.removesuffix(".watch"):
            self._ack(generation, mid, 1)
            return
        self._adopt(peer, lambda: self._ack(generation, mid, 1))

    def clear_will(self) -> None:
        """Remove the retained will of this session's client id (it was taken care of)."""
        self._client.publish(self._gone_topic, b"", qos=1, retain=True)

    def _done(
        self,
        future: asyncio.Future[Outcome],
        generation: int,
        mid: int,
        qos: int,
        uplink: Uplink,
    ) -> None:
        self._inflight.discard(future)
        if future.cancelled() or future.exception() is not None:
            metrics.UPLINKS.labels("mqtt", "failed").inc()
            self._unacked_in.add(generation)
            return  # not acked: redelivered after the next reconnect
        outcome = future.result()
        metrics.UPLINKS.labels("mqtt", outcome.status).inc()
        if not mqtt_acks(outcome):  # collector.answers: every durable outcome is acked
            self._unacked_in.add(generation)
            return
        self._ack(generation, mid, qos)
        claimed = uplink.topic
        if self._on_durable is not None and claimed is not None and outcome.status != "quarantined":
            # the store resolved the topic to its meter (uplink.device) in the same batch
            device = uplink.device
            self._on_durable(claimed, None if device is None else device.meter_id)
