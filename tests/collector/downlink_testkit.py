"""A meter's side of the mailbox over MQTT for tests, with the device's own account (over
CoAP, collector_testkit's OscoreMeter and RawCoap); the meter's command handling is the
simulator's (`simulator.commands.CommandExecutor`)."""

from __future__ import annotations

import queue
import threading
import uuid

import paho.mqtt.client as paho


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
