"""The project's Mosquitto broker: host package, project config, own ports and state.

The config template `mosquitto.conf` beside this file belongs to the collector (it
decides authentication and ACLs); this module renders it into the state directory,
lets the collector prepare the credential files the template names, makes the stack's
CA and the broker's certificate (nbmeter/stack/tls.py), and runs the broker as a daemon
with a pid file: plain MQTT on loopback, MQTT over TLS on its own port.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from importlib import resources
from pathlib import Path

from nbmeter.stack.config import StackConfig, StackError, say
from nbmeter.stack.debian import apt_install, run
from nbmeter.stack.tls import TlsFiles, ensure_certificates

_FALLBACK = """\
# no collector broker config shipped: anonymous loopback broker for development only
listener {port} 127.0.0.1
allow_anonymous true
persistence true
persistence_location {state_dir}/
"""


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """True when something accepts TCP connections on host:port."""
    with socket.socket() as sock:
        sock.settimeout(0.3)
        return sock.connect_ex((host, port)) == 0


def _pid(cfg: StackConfig) -> int | None:
    path = cfg.mosquitto_dir / "mosquitto.pid"
    try:
        pid = int(path.read_text(encoding="utf-8").strip())
    except (OSError, ValueError):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return pid if b"mosquitto" in cmdline else None


def running(cfg: StackConfig) -> bool:
    """True when the project's broker process is alive and listening."""
    return _pid(cfg) is not None and port_open(cfg.mqtt_port)


def _render(cfg: StackConfig) -> tuple[Path, bool]:
    """Write the broker config; return its path and whether it changed."""
    template = resources.files("nbmeter.stack").joinpath("mosquitto.conf")
    text = template.read_text(encoding="utf-8") if template.is_file() else _FALLBACK
    directory = cfg.mosquitto_dir
    body = text.format(
        port=cfg.mqtt_port,
        tls_port=cfg.mqtt_tls_port,
        tls_bind=cfg.mqtt_tls_bind,
        state_dir=directory,
    )
    body += f"\npid_file {directory}/mosquitto.pid\nlog_dest file {directory}/mosquitto.log\n"
    if os.geteuid() == 0:
        # as root, mosquitto would switch to the `mosquitto` user, who cannot read our state
        body += f"user {getpass.getuser()}\n"
    conf = directory / "mosquitto.conf"
    conf.write_text(body, encoding="utf-8")
    # compare with the config the running broker was started with, not the last render
    started = directory / "mosquitto.conf.started"
    old = started.read_text(encoding="utf-8") if started.exists() else None
    return conf, old != body


def render_docker(cfg: StackConfig) -> Path:
    """The same config for docker-compose.yml's broker (best effort: paths inside the
    image, plain 1883 and TLS 8883 in the container; compose publishes them on the host)."""
    template = resources.files("nbmeter.stack").joinpath("mosquitto.conf").read_text("utf-8")
    inside = "/mosquitto/config"
    body = template.format(port=1883, tls_port=8883, tls_bind="0.0.0.0", state_dir=inside)
    # the collector container reaches the broker over the compose network (as mqtts://);
    # compose publishes the plain port on the host's loopback only
    body = body.replace("listener 1883 127.0.0.1", "listener 1883")
    body = body.replace(
        f"plugin {inside}/mosquitto_dynamic_security.so",
        "plugin /usr/lib/mosquitto_dynamic_security.so",
    )
    body = body.replace(f"persistence_location {inside}/", "persistence_location /mosquitto/data/")
    path = cfg.mosquitto_dir / "mosquitto-docker.conf"
    path.write_text(body, encoding="utf-8")
    return path


def prepare_credentials(cfg: StackConfig) -> dict[str, str]:
    """Create the broker's credential files (`devices.broker`); return their env additions."""
    try:
        from devices.broker import prepare_broker_files
    except ImportError:
        return {}
    return dict(prepare_broker_files(cfg.mosquitto_dir, port=cfg.mqtt_port))


def tls_hosts(cfg: StackConfig) -> list[str]:
    """The names and addresses the broker certificate is issued for."""
    hosts = ["localhost", "127.0.0.1", "::1", socket.gethostname(), "mosquitto"]
    if cfg.mqtt_tls_bind not in ("0.0.0.0", "::"):
        hosts.append(cfg.mqtt_tls_bind)
    return [*hosts, *cfg.mqtt_tls_hosts]


def prepare_tls(cfg: StackConfig) -> TlsFiles:
    """The stack's CA and the broker certificate, made once (renewed when due)."""
    return ensure_certificates(cfg.tls_dir, tls_hosts(cfg))


def _ensure_acls(cfg: StackConfig, env: dict[str, str]) -> None:
    """Add live the collector ACLs a broker state from an older version lacks."""
    admin = env.get("NBMETER_MQTT_ADMIN_URL")
    if not admin:
        return
    from devices.broker import BrokerError, ensure_collector_acls

    try:
        added = ensure_collector_acls(admin)
    except BrokerError as exc:
        msg = f"could not update the collector's broker ACLs: {exc}"
        raise StackError(msg) from exc
    if added:
        say(f"added {added} collector ACL(s) to the broker on 127.0.0.1:{cfg.mqtt_port}")


def bring_up(cfg: StackConfig) -> str:
    """Start the broker unless it runs; return what was done."""
    cfg.mosquitto_dir.mkdir(parents=True, exist_ok=True)
    env = prepare_credentials(cfg)
    prepare_tls(cfg)
    conf, changed = _render(cfg)
    if running(cfg):
        if not changed:
            _ensure_acls(cfg, env)
            return "already running"
        say("the broker config changed: restarting Mosquitto ...")
        stop(cfg)
    for port, name in (
        (cfg.mqtt_port, "NBMETER_MQTT_PORT"),
        (cfg.mqtt_tls_port, "NBMETER_MQTT_TLS_PORT"),
    ):
        if port_open(port):
            msg = (
                f"127.0.0.1:{port} is taken by another program: stop it or choose "
                f"another port with {name}"
            )
            raise StackError(msg)
    binary = _binary()
    if not Path(binary).exists():
        apt_install(["mosquitto"])
    say(
        f"starting Mosquitto on 127.0.0.1:{cfg.mqtt_port} (plain) and "
        f"{cfg.mqtt_tls_bind}:{cfg.mqtt_tls_port} (TLS) ..."
    )
    log = cfg.mosquitto_dir / "mosquitto.log"
    run([binary, "-c", str(conf), "-d"], what=f"starting Mosquitto (log: {log})")
    (cfg.mosquitto_dir / "mosquitto.conf.started").write_text(
        conf.read_text(encoding="utf-8"), encoding="utf-8"
    )
    started = time.monotonic()
    for port in (cfg.mqtt_port, cfg.mqtt_tls_port):
        while not port_open(port):
            waited = time.monotonic() - started
            if waited > 15 or (waited > 2 and _pid(cfg) is None):
                lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
                last = lines[-1].split(": ", 1)[-1] if lines else "no log"
                msg = f"Mosquitto did not open port {port} ({last}); see {log}"
                raise StackError(msg)
            time.sleep(0.1)
    _ensure_acls(cfg, env)
    return "started"


def stop(cfg: StackConfig) -> None:
    """Stop the broker (SIGTERM; it saves its persistent sessions first)."""
    pid = _pid(cfg)
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while _pid(cfg) is not None and time.monotonic() < deadline:
        time.sleep(0.1)


def _binary() -> str:
    # Debian installs it in /usr/sbin, which a non-root PATH often lacks
    return shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def version() -> str:
    """Mosquitto's version as the binary reports it."""
    proc = subprocess.run([_binary(), "-h"], capture_output=True, text=True, check=False)
    first = (proc.stdout or proc.stderr).splitlines()
    return first[0].strip() if first else "mosquitto"
