"""Collectors as real processes (SIGTERM, kill -9) and a device that streams QoS 1 uplinks.

Used by the scale-down and TLS tests: they stop and kill collectors, which an in-process
collector cannot show.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from brokerkit import free_port
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from collector.mqtt import BrokerAddress, tls_context

REPO = Path(__file__).resolve().parents[2]


class CollectorProcess:
    """`python -m collector.main` with its own client id, logging JSON to a file."""

    def __init__(
        self,
        log_dir: Path,
        *,
        db_url: str,
        mqtt_url: str,
        key: str,
        client_id: str,
        group: str,
        will_delay_s: int = 60,
        ca_file: Path | None = None,
        coap_port: int | None = None,
        **extra: str,
    ) -> None:
        """Start the collector (not waiting for it: see `wait_log`) on `coap_port` (a free
        one by default; processes given the same port share it), with `extra` NBMETER_*
        settings."""
        self.client_id = client_id
        self.group = group
        self.metrics_port = int(extra.get("NBMETER_METRICS_PORT", "0"))
        self.log_path = log_dir / f"{client_id}-{uuid.uuid4().hex[:6]}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("NBMETER_")}
        env |= {
            "NBMETER_DATABASE_URL": db_url,
            "NBMETER_MQTT_URL": mqtt_url,
            "NBMETER_CREDENTIALS_KEY": key,
            "NBMETER_METRICS_PORT": "0",
            "NBMETER_LOG_JSON": "true",
            "NBMETER_COAP__HOST": "127.0.0.1",
            "NBMETER_COAP__PORT": str(coap_port or free_port(socket.SOCK_DGRAM)),
            "NBMETER_MQTT__CLIENT_ID": client_id,
            "NBMETER_MQTT__SHARE_GROUP": group,
            "NBMETER_MQTT__WILL_DELAY_S": str(will_delay_s),
            "NBMETER_MQTT__SESSION_EXPIRY_S": "600",
        }
        if ca_file is not None:
            env["NBMETER_MQTT__CA_FILE"] = str(ca_file)
        env |= extra
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "collector.main"],
            cwd=REPO,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def events(self, name: str) -> list[dict[str, Any]]:
        """The JSON log lines whose event is `name`."""
        out = []
        for line in self.log_path.read_text(encoding="utf-8", errors="replace").splitlines():
            if f'"{name}"' in line:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if record.get("event") == name:
                    out.append(record)
        return out

    def wait_log(self, name: str, within_s: float = 20, **fields: object) -> dict[str, Any]:
        """Wait for a log event `name` with `fields`; fail with the log if it never comes."""
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            for record in self.events(name):
                if all(record.get(k) == v for k, v in fields.items()):
                    return record
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        tail = self.log_path.read_text(encoding="utf-8", errors="replace")[-3000:]
        pytest.fail(f"{self.client_id}: no {name} {fields} within {within_s} s; log:\n{tail}")

    def counter(self, name: str, **labels: str) -> float:
        """The value of `name`{labels} on the process's /metrics (give it a metrics port
        with NBMETER_METRICS_PORT); 0 when that series was never counted."""
        assert self.metrics_port, "started without a metrics port"
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        want = {f'{k}="{v}"' for k, v in labels.items()}
        for line in text.splitlines():
            series, _, value = line.rpartition(" ")
            if series.split("{")[0] == name and want <= set(
                series.partition("{")[2].rstrip("}").split(",")
            ):
                return float(value)
        return 0.0

    def terminate(self, within_s: float = 60) -> int:
        """SIGTERM (graceful stop); return the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(within_s)

    def kill(self) -> None:
        """kill -9."""
        self.proc.kill()
        self.proc.wait(10)

    def close(self) -> None:
        """Kill it if it still runs; close the log."""
        if self.proc.poll() is None:
            self.kill()
        self._log.close()


def mqtt_client(url: str, client_id: str | None = None) -> paho.Client:
    """A paho MQTT 5 client with the URL's account and TLS settings (not connected)."""
    address = BrokerAddress.parse(url)
    client = paho.Client(
        paho.CallbackAPIVersion.VERSION2,
        client_id=client_id or f"dev-{uuid.uuid4().hex[:8]}",
        protocol=paho.MQTTv5,
    )
    if address.username:
        client.username_pw_set(address.username, address.password)
    context = tls_context(address)
    if context is not None:
        client.tls_set_context(context)
    return client


def session_present(url: str, client_id: str) -> bool:
    """Whether the broker holds a session for `client_id` (looked at, then removed)."""
    address = BrokerAddress.parse(url)
    client = mqtt_client(url, client_id)
    flags: dict[str, bool] = {}
    done = threading.Event()

    def on_connect(_c: Any, _u: Any, f: Any, _r: Any, _p: Any) -> None:
        flags["present"] = bool(f.session_present)
        done.set()

    client.on_connect = on_connect
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 0
    client.connect(address.host, address.port, clean_start=False, properties=props)
    client.loop_start()
    try:
        assert done.wait(10), "no CONNACK"
    finally:
        client.disconnect()
        client.loop_stop()
    return flags["present"]


class Streamer:
    """A device publishing QoS 1 uplinks at a steady rate in a thread, counting PUBACKs."""

    def __init__(self, url: str, port: int, creds: dict[str, str], frames: list[bytes]) -> None:
        """Prepare to publish `frames` on the device's topic (`url` gives host and TLS)."""
        self._frames = frames
        self._topic = creds["topic"]
        self._client = mqtt_client(url)
        self._client.username_pw_set(creds["username"], creds["password"])
        self._host = BrokerAddress.parse(url).host
        self._port = port
        self.acked: dict[int, int] = {}
        self._all = threading.Event()
        self._thread: threading.Thread | None = None
        self.sent = 0

    def start(self, rate_per_s: float) -> None:
        """Connect and publish every frame, `rate_per_s` a second, in a thread."""

        def on_publish(_c: Any, _u: Any, mid: int, reason: Any, _p: Any) -> None:
            self.acked[mid] = reason.value
            if len(self.acked) == len(self._frames):
                self._all.set()

        self._client.on_publish = on_publish
        self._client.connect(self._host, self._port)
        self._client.loop_start()

        def pump() -> None:
            started = time.monotonic()
            for i, frame in enumerate(self._frames):
                pause = started + i / rate_per_s - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                self._client.publish(self._topic, frame, qos=1)
                self.sent += 1

        self._thread = threading.Thread(target=pump, daemon=True)
        self._thread.start()

    def wait_sent(self, n: int, within_s: float = 30) -> None:
        """Block until `n` frames were handed to the broker connection."""
        deadline = time.monotonic() + within_s
        while self.sent < n and time.monotonic() < deadline:
            time.sleep(0.01)

    def finish(self, within_s: float = 60) -> list[int]:
        """Wait for every PUBACK; disconnect; return the reason codes (0 = accepted)."""
        assert self._thread is not None
        self._thread.join(within_s)
        assert self._all.wait(within_s), f"only {len(self.acked)} PUBACKs"
        self._client.disconnect()
        self._client.loop_stop()
        return list(self.acked.values())
