"""The stack's own CA and broker certificate, and the TLS settings `nbmeter stack` uses."""

from __future__ import annotations

import contextlib
import os
import shlex
import ssl
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from cryptography import x509

from nbmeter.stack.config import StackError, load_config
from nbmeter.stack.control import env_lines
from nbmeter.stack.mosquitto import render_docker
from nbmeter.stack.tls import ensure_certificates

NBMETER = [sys.executable, "-m", "nbmeter.cli"]


def _server_context(files_dir: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(files_dir / "server.crt", files_dir / "server.key")
    return context


def _handshake(files_dir: Path, ca: Path, server_hostname: str) -> str:
    """Run a TLS handshake in memory between the broker's certificate and a client."""
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    server = _server_context(files_dir).wrap_bio(s_in, s_out, server_side=True)
    client_ctx = ssl.create_default_context(cafile=str(ca))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=server_hostname)
    for _ in range(10):
        for side in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    return str(client.version())


def test_certificates_verify_for_the_names_they_carry(tmp_path: Path) -> None:
    """The server certificate verifies against the stack's CA for its names, no other."""
    files = ensure_certificates(tmp_path, ["localhost", "127.0.0.1", "broker.example"])
    assert _handshake(tmp_path, files.ca_cert, "broker.example") in ("TLSv1.2", "TLSv1.3")
    with pytest.raises(ssl.SSLCertVerificationError, match="match"):
        _handshake(tmp_path, files.ca_cert, "other.example")
    assert (tmp_path / "ca.key").stat().st_mode & 0o777 == 0o600
    assert files.server_key.stat().st_mode & 0o777 == 0o600


def test_certificates_are_made_once_and_reissued_for_new_names(tmp_path: Path) -> None:
    """A second call keeps everything; new names reissue the server certificate, same CA."""
    first = ensure_certificates(tmp_path, ["localhost"])
    ca, server = first.ca_cert.read_bytes(), first.server_cert.read_bytes()
    again = ensure_certificates(tmp_path, ["localhost"])
    assert (again.ca_cert.read_bytes(), again.server_cert.read_bytes()) == (ca, server)
    ensure_certificates(tmp_path, ["localhost", "meters.example"])
    assert first.ca_cert.read_bytes() == ca
    reissued = x509.load_pem_x509_certificate(first.server_cert.read_bytes())
    names = reissued.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "meters.example" in names.get_values_for_type(x509.DNSName)


def test_env_prints_the_mqtts_url_and_the_ca(monkeypatch: pytest.MonkeyPatch) -> None:
    """`nbmeter stack env` prints NBMETER_MQTTS_URL (TLS port, ?ca=) and the CA's path."""
    monkeypatch.delenv("NBMETER_MQTT_URL", raising=False)  # the stack's own broker
    cfg = load_config()
    values = dict(shlex.split(line)[0].split("=", 1) for line in env_lines(cfg))
    tls = urlsplit(values["NBMETER_MQTTS_URL"])
    assert tls.scheme == "mqtts"
    assert tls.port == cfg.mqtt_tls_port
    ca = Path(parse_qs(tls.query)["ca"][0])
    assert ca == Path(values["NBMETER_MQTT__CA_FILE"])
    assert ca.is_file()
    assert _handshake(cfg.tls_dir, ca, "127.0.0.1") in ("TLSv1.2", "TLSv1.3")


def test_tls_port_defaults_to_the_next_one_and_must_differ(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """NBMETER_MQTT_TLS_PORT defaults to the plain port + 1; the plain port itself is refused."""
    monkeypatch.setenv("NBMETER_MQTT_PORT", "41883")
    monkeypatch.delenv("NBMETER_MQTT_TLS_PORT", raising=False)
    assert load_config().mqtt_tls_port == 41884
    monkeypatch.setenv("NBMETER_MQTT_TLS_PORT", "41883")
    with pytest.raises(StackError, match="NBMETER_MQTT_TLS_PORT"):
        load_config()
    proc = subprocess.run(
        [*NBMETER, "stack", "status"],
        capture_output=True,
        text=True,
        env={**os.environ},
        check=False,
    )
    assert proc.returncode == 1
    assert "NBMETER_MQTT_TLS_PORT" in proc.stderr


def test_compose_broker_config_has_the_tls_listener(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The config rendered for docker-compose.yml's broker listens with TLS on 8883 with
    the stack's certificate, at the paths inside the image."""
    monkeypatch.setenv("NBMETER_HOME", str(tmp_path))
    cfg = load_config()
    cfg.mosquitto_dir.mkdir(parents=True)
    conf = render_docker(cfg).read_text(encoding="utf-8").splitlines()
    assert "listener 8883 0.0.0.0" in conf
    assert "certfile /mosquitto/config/tls/server.crt" in conf
    assert "plugin /usr/lib/mosquitto_dynamic_security.so" in conf
