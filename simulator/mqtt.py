"""MQTT device side: connect with the device's own account, publish its uplink, disconnect.

That is what an NB-IoT meter in PSM does each day. paho-mqtt's network loop runs in its
own thread (`loop_start`); its callbacks only resolve asyncio futures with
`loop.call_soon_threadsafe`. QoS 1 waits for the broker's PUBACK; QoS 0 only for the
write. A re-delivery (`copies` > 1) publishes the same payload again on the same
connection, as a broker or platform re-delivery would present it to the collector.

`mqtts://host:port?ca=/path/ca.crt` connects over TLS (1.2+), verifying the broker's
certificate against that CA (without `?ca=`: the system's CAs) and its host name, as a
meter does; `nbmeter stack env` prints the stack's URL as NBMETER_MQTTS_URL.

A meter that takes commands (`Downlink`) connects instead as an MQTT 5 client with its
own stable client id and a persistent session, subscribes (QoS 1) to its down topic
before it publishes, and listens for a window after its uplink is acknowledged: the
collector publishes the meter's commands once that uplink is stored. Each envelope goes
to the meter's handler and its answer is published QoS 1 to the result topic. A command
the collector publishes after the window closed waits in the session for the meter's
next connection, as the README's MQTT downlink section describes. Only such meters hold
a connection for longer than the publish (the window ends at the first envelope).
"""

from __future__ import annotations

import asyncio
import secrets
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

CONNECT_TIMEOUT_S = 10.0
PUBLISH_TIMEOUT_S = 20.0
SESSION_EXPIRY_S = 3600  # a simulated meter's session outlives a run's gaps, not the broker


@dataclass(frozen=True)
class MqttCredentials:
    """A device's broker account and the one topic it may publish to."""

    username: str
    password: str
    topic: str


@dataclass(frozen=True)
class Downlink:
    """A commandable meter's side of the mailbox for one connection: its down and result
    topics, `handle` (an envelope -> the answer to publish, or None) and how long to
    listen after the uplink (`window_s`; 0: only what the session already holds)."""

    client_id: str
    down: str
    res: str
    handle: Callable[[bytes], bytes | None]
    window_s: float


@dataclass(frozen=True)
class MqttResult:
    """How a publish went: `acked` copies the broker confirmed (QoS 1) or wrote (QoS 0),
    and an error text when the connection or publish failed."""

    acked: int
    sent: int
    error: str = ""
    envelopes: int = 0  # command envelopes received (a `Downlink` meter)
    answers: int = 0  # answers the broker acknowledged on the result topic


def broker_address(url: str) -> tuple[str, int]:
    """(host, port) of an `mqtt[s]://host:port` URL (credentials in it are ignored)."""
    parts = urlsplit(url)
    default = 8883 if parts.scheme in ("mqtts", "ssl") else 1883
    return parts.hostname or "127.0.0.1", parts.port or default


def tls_context(url: str) -> ssl.SSLContext | None:
    """The TLS context for an `mqtts://` URL (its `?ca=` CA, else the system's), or None
    for plain `mqtt://`. Raises ValueError for another scheme."""
    parts = urlsplit(url)
    if parts.scheme in ("mqtt", "tcp"):
        return None
    if parts.scheme not in ("mqtts", "ssl"):
        msg = f"broker URL must start with mqtt:// or mqtts:// (got {parts.scheme!r})"
        raise ValueError(msg)
    ca = parse_qs(parts.query).get("ca", [None])[-1]
    context = ssl.create_default_context(cafile=ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


async def publish(
    broker_url: str, creds: MqttCredentials, payload: bytes, *, qos: int, copies: int = 1,
    downlink: Downlink | None = None,
) -> MqttResult:  # fmt: skip
    """Connect as `creds`, publish `payload` `copies` times at `qos`, then disconnect;
    with `downlink`, subscribe first and handle the commands of the window (see above)."""
    loop = asyncio.get_running_loop()
    host, port = broker_address(broker_url)
    context = tls_context(broker_url)
    connected: asyncio.Future[int] = loop.create_future()
    subscribed: asyncio.Future[int] = loop.create_future()
    acks: asyncio.Queue[int] = asyncio.Queue()
    envelopes: asyncio.Queue[bytes] = asyncio.Queue()

    def settle(fut: asyncio.Future[int], value: int) -> None:
        if not fut.done():
            fut.set_result(value)

    def on_connect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any = None) -> None:
        loop.call_soon_threadsafe(settle, connected, int(getattr(reason, "value", reason)))

    def on_publish(_c: Any, _u: Any, mid: int, _r: Any = None, _p: Any = None) -> None:
        loop.call_soon_threadsafe(acks.put_nowait, mid)

    def on_subscribe(_c: Any, _u: Any, _m: int, reasons: Any, _p: Any = None) -> None:
        worst = max(int(getattr(r, "value", r)) for r in reasons)
        loop.call_soon_threadsafe(settle, subscribed, worst)

    def on_message(_c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        if downlink is not None and msg.topic == downlink.down:
            loop.call_soon_threadsafe(envelopes.put_nowait, bytes(msg.payload))

    if downlink is None:
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"sim-{secrets.token_hex(6)}",
            protocol=paho.MQTTv311,
        )
    else:  # MQTT 5: a persistent session with an expiry, so none outlives the broker's need
        client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=downlink.client_id, protocol=paho.MQTTv5
        )
    client.username_pw_set(creds.username, creds.password)
    if context is not None:
        client.tls_set_context(context)
    client.on_connect = on_connect
    client.on_publish = on_publish
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    sent = acked = got = answered = 0

    async def answer(envelope: bytes) -> None:
        nonlocal answered
        assert downlink is not None
        reply = downlink.handle(envelope)
        if reply is None:
            return
        info = client.publish(downlink.res, reply, qos=1)
        if info.rc == paho.MQTT_ERR_SUCCESS:
            await asyncio.wait_for(acks.get(), PUBLISH_TIMEOUT_S)
            answered += 1

    try:
        if downlink is None:
            await asyncio.to_thread(client.connect, host, port, 30)
        else:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho
            props.SessionExpiryInterval = SESSION_EXPIRY_S
            await asyncio.to_thread(
                client.connect, host, port, 30, clean_start=False, properties=props
            )
        client.loop_start()
        code = await asyncio.wait_for(connected, CONNECT_TIMEOUT_S)
        if code != 0:
            return MqttResult(0, 0, f"connect refused ({code})")
        if downlink is not None:  # before the uplink: the commands follow its storing
            client.subscribe(downlink.down, qos=1)
            if await asyncio.wait_for(subscribed, CONNECT_TIMEOUT_S) >= 0x80:
                downlink = None  # not allowed (provisioned before the down ACL): no commands
        for _ in range(copies):
            info = client.publish(creds.topic, payload, qos=qos)
            if info.rc != paho.MQTT_ERR_SUCCESS:
                return MqttResult(acked, sent, f"publish failed ({info.rc})")
            sent += 1
            await asyncio.wait_for(acks.get(), PUBLISH_TIMEOUT_S)
            acked += 1
        if downlink is not None:
            if envelopes.empty() and downlink.window_s > 0:
                try:
                    first = await asyncio.wait_for(envelopes.get(), downlink.window_s)
                    envelopes.put_nowait(first)
                except TimeoutError:
                    pass  # nothing this window: a later one waits in the session
            while not envelopes.empty():
                got += 1
                await answer(envelopes.get_nowait())
    except ssl.SSLCertVerificationError as exc:
        return MqttResult(acked, sent, f"TLS: the broker's certificate: {exc.verify_message}")
    except (OSError, TimeoutError) as exc:  # ssl.SSLError included
        return MqttResult(acked, sent, f"{type(exc).__name__}: {exc}", got, answered)
    finally:
        client.disconnect()
        client.loop_stop()
    return MqttResult(acked, sent, "", got, answered)
