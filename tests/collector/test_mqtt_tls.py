"""MQTT over TLS on the real Mosquitto: the stack's CA, host name checked, no plain text.

The broker here is this session's own, started from the project's template, so it has
the TLS listener and a CA of its own whatever state the shared stack is in.
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import uuid
from pathlib import Path

import asyncpg
import paho.mqtt.client as paho
import pytest
from brokerkit import Broker
from collector_testkit import cjt188_frame, hour
from conftest import collector_settings, wait_count
from mqtt_testkit import session_present

from collector.main import run
from collector.mqtt import BrokerAddress, MqttError, MqttSubscriber
from collector.pipeline import Pipeline
from collector.settings import MqttSettings, PipelineSettings
from devices.provision import ProvisionedDevice
from nbmeter.stack.tls import ensure_certificates
from simulator.mqtt import MqttCredentials, publish

MINE = "SELECT count(*) FROM readings WHERE meter_id = $1"


def _creds(device: ProvisionedDevice) -> MqttCredentials:
    return MqttCredentials(device.mqtt["username"], device.mqtt["password"], device.mqtt["topic"])


def _sim_url(broker: Broker, ca: Path | None) -> str:
    url = f"mqtts://127.0.0.1:{broker.tls_port}"
    return f"{url}?ca={ca}" if ca else url


async def _pipeline_that_never_commits() -> Pipeline:
    async def commit(_batch: object) -> None:
        raise AssertionError

    return Pipeline(PipelineSettings(), commit)  # type: ignore[arg-type]


async def test_collector_over_mqtts_stores_and_acks(
    db_url: str,
    own_broker: Broker,
    credentials_key: str,
    pool: asyncpg.Pool,
    own_broker_device: ProvisionedDevice,
) -> None:
    """A collector on mqtts:// (the stack's CA) stores TLS uplinks and acks every one."""
    base = collector_settings(db_url, own_broker, credentials_key)
    mqtt = MqttSettings(
        client_id=f"tls-{uuid.uuid4().hex[:8]}",
        share_group=f"tls-{uuid.uuid4().hex[:8]}",
        ca_file=own_broker.ca_file,
    )
    settings = base.model_copy(update={"mqtt_url": own_broker.tls_url(), "mqtt": mqtt})
    stop, started = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(run(settings, stop=stop, started=started))
    await asyncio.wait_for(started.wait(), 20)
    await asyncio.sleep(0.5)  # subscribed: the connection is made in the background
    frames = [cjt188_frame(own_broker_device.address, 10_000 * (h + 1), hour(h)) for h in range(5)]
    url = _sim_url(own_broker, own_broker.ca_file)
    results = [await publish(url, _creds(own_broker_device), f, qos=1) for f in frames]
    assert [(r.acked, r.error) for r in results] == [(1, "")] * 5
    assert await wait_count(pool, 5, MINE, own_broker_device.meter_id) == 5
    stop.set()
    await asyncio.wait_for(task, 40)
    # acked: the graceful stop could end the session, nothing was left in it
    assert not session_present(own_broker.tls_url(), mqtt.client_id)


async def test_plain_mqtt_on_the_tls_port_is_refused(
    own_broker: Broker, own_broker_device: ProvisionedDevice
) -> None:
    """A device speaking plain MQTT to the TLS port gets no session and publishes nothing."""
    result = await publish(
        f"mqtt://127.0.0.1:{own_broker.tls_port}", _creds(own_broker_device), b"x", qos=1
    )
    assert result.acked == 0
    assert result.error
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.username_pw_set(own_broker_device.mqtt["username"], own_broker_device.mqtt["password"])
    client.connect("127.0.0.1", own_broker.tls_port)
    codes = set()
    for _ in range(30):  # the broker closes the socket on the unencrypted CONNECT
        codes.add(client.loop(0.1))
        if paho.MQTT_ERR_CONN_LOST in codes or paho.MQTT_ERR_NO_CONN in codes:
            break
    assert codes & {paho.MQTT_ERR_CONN_LOST, paho.MQTT_ERR_NO_CONN}
    assert not client.is_connected()


def test_plain_listener_is_loopback_only(own_broker: Broker) -> None:
    """The rendered broker config binds the plain listener to 127.0.0.1 and nowhere else."""
    assert own_broker.ca_file is not None
    conf = (own_broker.ca_file.parent.parent / "mosquitto.conf").read_text(encoding="utf-8")
    listeners = [line.split() for line in conf.splitlines() if line.startswith("listener ")]
    plain = [parts for parts in listeners if parts[1] == str(own_broker.port)]
    assert plain == [["listener", str(own_broker.port), "127.0.0.1"]]
    assert len(listeners) == 2


async def test_wrong_ca_fails_with_a_clear_error(
    tmp_path: Path, own_broker: Broker, own_broker_device: ProvisionedDevice
) -> None:
    """A CA that did not sign the broker's certificate: the collector refuses to start and
    says which setting to fix; the simulated meter reports the verification failure."""
    other = ensure_certificates(tmp_path / "other-ca", ["localhost", "127.0.0.1"]).ca_cert
    settings = MqttSettings(client_id=f"tls-{uuid.uuid4().hex[:8]}", ca_file=other)
    subscriber = MqttSubscriber(
        own_broker.tls_url(), settings, await _pipeline_that_never_commits()
    )
    with pytest.raises(MqttError, match="does not verify") as caught:
        await subscriber.start()
    assert "NBMETER_MQTT__CA_FILE" in str(caught.value)
    assert str(other) in str(caught.value)
    result = await publish(_sim_url(own_broker, other), _creds(own_broker_device), b"x", qos=1)
    assert result.acked == 0
    assert result.error.startswith("TLS: the broker's certificate")


async def test_host_name_is_checked(
    own_broker: Broker, own_broker_device: ProvisionedDevice
) -> None:
    """The broker's certificate names localhost and 127.0.0.1; another name is refused."""
    assert own_broker.ca_file is not None
    name = socket.gethostname()
    if name in ("localhost", "127.0.0.1"):
        pytest.skip("this host's name is one the test certificate names")
    context = ssl.create_default_context(cafile=str(own_broker.ca_file))
    with (
        socket.create_connection(("127.0.0.1", own_broker.tls_port), timeout=5) as sock,
        pytest.raises(ssl.SSLCertVerificationError, match="match"),
        context.wrap_socket(sock, server_hostname=name),
    ):
        pass
    with (
        socket.create_connection(("127.0.0.1", own_broker.tls_port), timeout=5) as sock,
        context.wrap_socket(sock, server_hostname="localhost") as tls,
    ):
        assert tls.version() in ("TLSv1.2", "TLSv1.3")


async def test_missing_ca_file_is_a_clear_error(own_broker: Broker, tmp_path: Path) -> None:
    """A CA path that does not exist fails at once, naming the file and the setting."""
    settings = MqttSettings(ca_file=tmp_path / "nope.crt")
    with pytest.raises(MqttError, match=r"nope\.crt does not exist"):
        MqttSubscriber(own_broker.tls_url(), settings, await _pipeline_that_never_commits())


@pytest.mark.parametrize(
    ("url", "tls", "port", "ca"),
    [
        ("mqtt://u:p@broker:1884", False, 1884, None),
        ("mqtt://broker", False, 1883, None),
        ("mqtts://broker", True, 8883, None),
        ("mqtts://u:p%40x@broker:51884?ca=/etc/nbmeter/ca.crt", True, 51884, "/etc/nbmeter/ca.crt"),
    ],
)
def test_broker_url_names_tls_port_and_ca(url: str, tls: bool, port: int, ca: str | None) -> None:
    """mqtt:// is plain (1883), mqtts:// is TLS (8883) with an optional ?ca= file."""
    address = BrokerAddress.parse(url)
    assert (address.tls, address.port, address.ca_file) == (tls, port, Path(ca) if ca else None)


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://broker", "mqtt:// or mqtts://"),
        ("mqtt://broker?ca=/x.crt", "needs mqtts://"),
        ("mqtts://broker?cafile=/x.crt", "unknown parameter"),
    ],
)
def test_bad_broker_url_says_what_is_wrong(url: str, says: str) -> None:
    """A broker URL the collector cannot use is refused with what to change."""
    with pytest.raises(ValueError, match=re.escape(says)):
        BrokerAddress.parse(url)
