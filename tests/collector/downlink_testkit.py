"""A meter's side of the mailbox for tests: OSCORE over raw UDP (collector_testkit's
RawCoap, so a CON can be sent twice with the same message id) and MQTT with the device's
own account; the meter's command handling is the simulator's
(`simulator.commands.CommandExecutor`)."""

from __future__ import annotations

import queue
import secrets
import threading
import uuid
from dataclasses import dataclass

import aiocoap
import paho.mqtt.client as paho
from collector_testkit import DeviceOscore, RawCoap


@dataclass
class Reply:
    """The decrypted answer: code (dotted) and payload."""

    code: str
    payload: bytes


class OscoreMeter:
    """A meter speaking OSCORE over raw UDP: uplinks to /u, answers to /c."""

    def __init__(self, values: dict[str, str], udp: RawCoap) -> None:
        self.ctx = DeviceOscore(values)
        self.udp = udp

    def request(self, path: str, payload: bytes) -> tuple[bytes, bytes, object]:
        """(datagram, token, request id) of a protected CON POST with a new sequence number."""
        msg = aiocoap.Message(code=aiocoap.POST, uri_path=(path,), payload=payload)
        protected, request_id = self.ctx.protect(msg)
        protected.mtype = aiocoap.CON
        protected.mid = self.udp.next_mid()
        protected.token = secrets.token_bytes(4)
        return protected.encode(), protected.token, request_id

    def reply(self, data: bytes, request_id: object) -> Reply:
        """Decrypt an answer."""
        msg = aiocoap.Message.decode(data)
        inner, _ = self.ctx.unprotect(msg, request_id)
        code = int(inner.code)
        return Reply(f"{code >> 5}.{code & 0x1F:02d}", bytes(inner.payload))

    async def post(self, path: str, payload: bytes) -> Reply:
        """One protected exchange."""
        datagram, token, request_id = self.request(path, payload)
        return self.reply(await self.udp.exchange(datagram, token), request_id)


class MqttMeter:
    """A meter's MQTT client with its own account: subscribes to its down topic."""

    def __init__(self, port: int, mqtt: dict[str, str]) -> None:
        self.topic_up = mqtt["topic"]
        self.topic_down = self.topic_up.removesuffix("/up") + "/down"
        self.topic_res = self.topic_up.removesuffix("/up") + "/res"
        self.received: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.subacks: queue.Queue[list[int]] = queue.Queue()
        self._acked = threading.Event()
        client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=f"dev-{uuid.uuid4().hex[:8]}",
            protocol=paho.MQTTv5,
        )
        client.username_pw_set(mqtt["username"], mqtt["password"])
        client.on_message = lambda _c, _u, m: self.received.put((m.topic, bytes(m.payload)))
        client.on_subscribe = lambda _c, _u, _m, reasons, _p: self.subacks.put(
            [r.value for r in reasons]
        )
        connected = threading.Event()
        client.on_connect = lambda *_a: connected.set()
        self.client = client
        client.connect("127.0.0.1", port)
        client.loop_start()
        assert connected.wait(10), "the broker did not accept the device's connection"

    def subscribe(self, topic: str | None = None) -> list[int]:
        """Subscribe (QoS 1) to `topic` (default: own down topic); the SUBACK reason codes."""
        self.client.subscribe(topic or self.topic_down, qos=1)
        return self.subacks.get(timeout=10)

    def publish(self, topic: str, payload: bytes) -> int:
        """Publish at QoS 1 and wait for the PUBACK; its reason code."""
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(10)
        return info.rc

    def next_message(self, timeout_s: float) -> tuple[str, bytes] | None:
        """The next message received, or None after `timeout_s`."""
        try:
            return self.received.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def close(self) -> None:
        """Disconnect."""
        self.client.disconnect()
        self.client.loop_stop()
