"""A real Mosquitto for tests: the stack's broker, or one started from the project's template.

`free_port`, `Broker` and `start_broker` are shared by the collector tests and the
end-to-end simulation; the `broker` and `own_broker` fixtures live in tests/conftest.py.
A broker started here has both listeners of the template: plain MQTT on `port` and TLS
on `tls_port`, with a CA of its own in `state_dir/tls`.
"""

from __future__ import annotations

import getpass
import os
import random
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from nbmeter.stack.tls import ensure_certificates

_HANDED_OUT: set[int] = set()


def _ports_below_ephemeral() -> tuple[int, int]:
    """Ports the kernel never picks for an outgoing connection: those below its ephemeral
    range (10000 up to it), or (0, 0) when that range starts too low to leave room."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0, 0
    return (10000, low - 1) if low > 12000 else (0, 0)


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A loopback port nothing listens on right now, for a server a test starts later.

    It comes from below the kernel's ephemeral range: a port bound to 0 and closed again
    comes from that range, and an outgoing connection (a pool's, a client's) made before
    the server starts could take it (seen: the e2e collector's push server refused with
    "address already in use"). Never the same port twice in one test process."""
    low, high = _ports_below_ephemeral()
    for _ in range(200 if high else 0):
        port = random.randint(low, high)
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Broker:
    """A running broker: the collector's URL and the provisioning (admin) URL."""

    url: str
    admin_url: str
    port: int
    tls_port: int | None = None
    ca_file: Path | None = None

    def tls_url(self, url: str | None = None) -> str:
        """`url` (default: the collector's) on the TLS listener: mqtts://, same account,
        `?ca=` the broker's CA."""
        if self.tls_port is None:
            pytest.skip("this broker has no TLS listener (run `nbmeter stack up` again)")
        parts = urlsplit(url or self.url)
        netloc = parts.netloc.rsplit(":", 1)[0] + f":{self.tls_port}"
        query = f"ca={self.ca_file}" if self.ca_file else ""
        return urlunsplit(parts._replace(scheme="mqtts", netloc=netloc, query=query))


def start_broker(
    state_dir: Path, port: int, tls_port: int | None = None
) -> subprocess.Popen[bytes]:
    """Start Mosquitto from the project's template in `state_dir` (TLS on `tls_port`, or a
    free port); wait until it listens."""
    ensure_certificates(state_dir / "tls", ["localhost", "127.0.0.1"])
    template = resources.files("nbmeter.stack").joinpath("mosquitto.conf").read_text("utf-8")
    body = template.format(
        port=port, tls_port=tls_port or free_port(), tls_bind="127.0.0.1", state_dir=state_dir
    )
    body += f"\nlog_dest file {state_dir}/mosquitto.log\n"
    if os.geteuid() == 0:
        body += f"user {getpass.getuser()}\n"
    conf = state_dir / "mosquitto.conf"
    conf.write_text(body, encoding="utf-8")
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    proc = subprocess.Popen([binary, "-c", str(conf)])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"Mosquitto did not start; see {state_dir}/mosquitto.log")
