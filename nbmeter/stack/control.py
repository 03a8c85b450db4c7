"""`nbmeter stack up | down | status | env`: choose a way, start, stop and describe the stack."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from nbmeter.stack import mosquitto, postgres
from nbmeter.stack.config import (
    DB_NAME,
    DB_USER,
    PG_MAJOR,
    StackConfig,
    StackError,
    say,
    stack_secrets,
)
from nbmeter.stack.debian import (
    PG_PACKAGES,
    apt_install,
    codename,
    ensure_trixie_root,
    is_root,
    mount_pseudo_filesystems,
    package_available,
    run,
    unmount_pseudo_filesystems,
)

COMPOSE_FILE = Path(__file__).resolve().parents[2] / "docker-compose.yml"


def docker_engine() -> bool:
    """True when a Docker engine (not only the client) answers and compose is there."""
    if not shutil.which("docker"):
        return False
    for cmd in (["docker", "info"], ["docker", "compose", "version"]):
        proc = subprocess.run(cmd, capture_output=True, check=False)
        if proc.returncode != 0:
            return False
    return True


def choose_way(cfg: StackConfig) -> str:
    """docker, native or chroot: the first that works here (or the forced one)."""
    if cfg.forced_way:
        return cfg.forced_way
    if docker_engine():
        return "docker"
    if codename() and package_available(PG_PACKAGES[1]):
        return "native"
    if codename() and is_root():
        return "chroot"
    if codename():
        msg = (
            "this Debian has no postgresql-17-timescaledb package and building a Debian 13 "
            "root needs root: run `nbmeter stack up` as root once, or install Docker"
        )
    else:
        msg = (
            "no way to start TimescaleDB here: install Docker (then `docker compose` runs "
            "docker-compose.yml), or use Debian 12/13 as root, or set NBMETER_DATABASE_URL "
            "and NBMETER_MQTT_URL to servers you run yourself"
        )
    raise StackError(msg)


def _server(cfg: StackConfig, way: str) -> postgres.Server:
    return postgres.chroot_server(cfg) if way == "chroot" else postgres.native_server(cfg)


def database_url(cfg: StackConfig) -> str:
    """The URL clients use for the project's database (or the external one)."""
    if cfg.external_db:
        return cfg.external_db
    password = quote(stack_secrets(cfg)["db_password"], safe="")
    return f"postgresql://{DB_USER}:{password}@127.0.0.1:{cfg.pg_port}/{DB_NAME}"


def up(cfg: StackConfig) -> str:
    """Bring the stack up (idempotent); return a one-line summary."""
    started = time.monotonic()
    cfg.home.mkdir(parents=True, exist_ok=True)
    parts: list[str] = []
    need_db, need_mqtt = not cfg.external_db, not cfg.external_mqtt
    way = choose_way(cfg) if (need_db or need_mqtt) else "external"
    if way == "docker":
        _compose_up(cfg, need_db=need_db, need_mqtt=need_mqtt)
        parts.append("docker compose services up")
    else:
        if need_db:
            password = stack_secrets(cfg)["db_password"]
            if way == "chroot":
                ensure_trixie_root(cfg.root)
                mount_pseudo_filesystems(cfg.root)
            elif way == "native" and not Path(f"/usr/lib/postgresql/{PG_MAJOR}/bin").exists():
                apt_install(list(PG_PACKAGES))
            server = _server(cfg, way)
            done = postgres.bring_up(server, password)
            parts.append(f"TimescaleDB ({way}) {done} on 127.0.0.1:{cfg.pg_port}")
        if need_mqtt:
            done = mosquitto.bring_up(cfg)
            parts.append(
                f"Mosquitto {done} on 127.0.0.1:{cfg.mqtt_port}, TLS on "
                f"{cfg.mqtt_tls_bind}:{cfg.mqtt_tls_port}"
            )
    if not need_db:
        parts.append(f"database external ({_host_of(cfg.external_db)})")
    if not need_mqtt:
        parts.append(f"broker external ({_host_of(cfg.external_mqtt)})")
    return f"stack ready in {time.monotonic() - started:.1f} s: " + "; ".join(parts)


def _host_of(url: str | None) -> str:
    parts = urlsplit(url or "")
    return f"{parts.hostname}:{parts.port}" if parts.hostname else "?"


def down(cfg: StackConfig) -> str:
    """Stop what `up` started (data is kept); return a summary."""
    if docker_engine() and cfg.forced_way in (None, "docker") and _compose_running():
        _compose(["down"])
        return "docker compose services stopped (volumes kept)"
    stopped = []
    for way in ("chroot", "native"):
        server = _server(cfg, way)
        if server.initialised() and server.running():
            server.stop()
            stopped.append(f"TimescaleDB ({way})")
    if cfg.root.exists():
        unmount_pseudo_filesystems(cfg.root)
    if mosquitto.running(cfg):
        mosquitto.stop(cfg)
        stopped.append("Mosquitto")
    return "stopped: " + (", ".join(stopped) if stopped else "nothing was running") + " (data kept)"


def status(cfg: StackConfig) -> tuple[bool, list[str]]:
    """Whether everything needed is up, and one line per service."""
    lines: list[str] = []
    ok = True
    if cfg.external_db:
        lines.append(f"database: external {_host_of(cfg.external_db)}")
    else:
        server = next(
            (s for s in (_server(cfg, "chroot"), _server(cfg, "native")) if s.initialised()),
            None,
        )
        if server is not None and server.running():
            lines.append(f"database: running on 127.0.0.1:{cfg.pg_port}, {server.version()}")
        elif mosquitto.port_open(cfg.pg_port) and _compose_running():
            lines.append(f"database: running in docker on 127.0.0.1:{cfg.pg_port}")
        else:
            ok = False
            lines.append("database: stopped (run `nbmeter stack up`)")
    if cfg.external_mqtt:
        lines.append(f"broker: external {_host_of(cfg.external_mqtt)}")
    elif mosquitto.running(cfg) or (mosquitto.port_open(cfg.mqtt_port) and _compose_running()):
        lines.append(
            f"broker: running on 127.0.0.1:{cfg.mqtt_port}, TLS on "
            f"{cfg.mqtt_tls_bind}:{cfg.mqtt_tls_port}, {mosquitto.version()}"
        )
    else:
        ok = False
        lines.append("broker: stopped (run `nbmeter stack up`)")
    lines.append(f"state: {cfg.home}")
    return ok, lines


def env_lines(cfg: StackConfig, *, export: bool = False) -> list[str]:
    """`NAME='value'` lines (with `export ` when asked) for a shell to eval."""
    prefix = "export " if export else ""
    values = {"NBMETER_DATABASE_URL": database_url(cfg)}
    if cfg.external_mqtt:
        values["NBMETER_MQTT_URL"] = cfg.external_mqtt
    else:
        # the collector account's URL, the provisioning account's, and the key that seals
        # device secrets at rest
        values |= mosquitto.prepare_credentials(cfg)
        values.setdefault("NBMETER_MQTT_URL", f"mqtt://127.0.0.1:{cfg.mqtt_port}")
        # the same collector account over TLS, and the CA that verifies the broker
        ca = mosquitto.prepare_tls(cfg).ca_cert
        plain = urlsplit(values["NBMETER_MQTT_URL"])
        tls = plain._replace(
            scheme="mqtts",
            netloc=plain.netloc.rsplit(":", 1)[0] + f":{cfg.mqtt_tls_port}",
            query=f"ca={quote(str(ca), safe='/')}",
        )
        values["NBMETER_MQTTS_URL"] = urlunsplit(tls)
        values["NBMETER_MQTT__CA_FILE"] = str(ca)
    return [f"{prefix}{k}='{v}'" for k, v in values.items()]


def _compose(args: list[str], cfg: StackConfig | None = None) -> str:
    env = dict(os.environ)
    # compose reads the whole file, so the collector's and API's required key must have a
    # value even for the services this starts (TimescaleDB, Mosquitto), which never see it
    env.setdefault("NBMETER_CREDENTIALS_KEY", "unused-by-the-stack-services")
    if cfg is not None:
        collector_url = urlsplit(mosquitto.prepare_credentials(cfg).get("NBMETER_MQTT_URL", ""))
        env |= {
            "NBMETER_DB_PASSWORD": stack_secrets(cfg)["db_password"],
            "NBMETER_PG_PORT": str(cfg.pg_port),
            "NBMETER_MQTT_PORT": str(cfg.mqtt_port),
            "NBMETER_MQTT_TLS_PORT": str(cfg.mqtt_tls_port),
            "NBMETER_MQTT_TLS_BIND": cfg.mqtt_tls_bind,
            "NBMETER_MQTT_COLLECTOR_PASSWORD": quote(collector_url.password or "", safe=""),
            "NBMETER_MOSQUITTO_DIR": str(cfg.mosquitto_dir),
        }
    return run(
        ["docker", "compose", "-f", str(COMPOSE_FILE), *args], what="docker compose", env=env
    )


def _compose_running() -> bool:
    if not shutil.which("docker"):
        return False
    proc = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE_FILE), "ps", "-q"],
        env={"NBMETER_CREDENTIALS_KEY": "unused-by-the-stack-services", **os.environ},
        capture_output=True,
        text=True,
        check=False,
    )
    return proc.returncode == 0 and bool(proc.stdout.strip())


def _compose_up(cfg: StackConfig, *, need_db: bool, need_mqtt: bool) -> None:
    services = [s for s, need in (("timescaledb", need_db), ("mosquitto", need_mqtt)) if need]
    say(f"docker compose up {' '.join(services)} ...")
    cfg.mosquitto_dir.mkdir(parents=True, exist_ok=True)
    mosquitto.prepare_credentials(cfg)
    mosquitto.prepare_tls(cfg)
    mosquitto.render_docker(cfg)
    _compose(["up", "-d", "--wait", *services], cfg)


def compose_command(cfg: StackConfig) -> list[str] | None:
    """A docker compose v2 command line (plugin, standalone, or the Debian 13 root's)."""
    if shutil.which("docker"):
        proc = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
        if proc.returncode == 0:
            return ["docker", "compose"]
    for path in (shutil.which("docker-compose"), cfg.root / "usr/bin/docker-compose"):
        if path and Path(path).exists():
            version = subprocess.run(
                [str(path), "version"], capture_output=True, text=True, check=False
            )
            if (
                version.returncode == 0
                and " v1." not in version.stdout
                and "version 1." not in version.stdout
            ):
                return [str(path)]
    return None


DTLS_SOCKET = "DTLSSocket==0.2.3"  # as pinned in pyproject's `dtls` extra
CHROMIUM = "/usr/bin/chromium"


def tools(cfg: StackConfig) -> list[str]:
    """Install the test tools (coap-client, DTLSSocket, Chromium, docker compose v2) where
    possible; describe them."""
    notes: list[str] = []
    if not shutil.which("coap-client-notls"):
        if is_root() and codename():
            apt_install(["libcoap3-bin"])
        else:
            notes.append("coap-client missing (Debian package libcoap3-bin): interop test skips")
    if importlib.util.find_spec("DTLSSocket") is None:  # the `dtls` extra (coaps://)
        if is_root() and codename():
            apt_install(["autoconf", "automake", "libtool"])  # it builds tinydtls
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", DTLS_SOCKET], check=False)
        if importlib.util.find_spec("DTLSSocket") is None:
            notes.append(f"{DTLS_SOCKET} missing (the dtls extra): DTLS-PSK tests skip")
    # the console's browser tests drive Debian's Chromium (Playwright cannot fetch its own)
    if not Path(CHROMIUM).exists():
        if is_root() and codename():
            apt_install(["chromium"])
        else:
            notes.append("chromium missing (Debian package chromium): console browser tests skip")
    if compose_command(cfg) is None:
        if is_root() and (cfg.root / "usr/bin/apt-get").exists():
            apt_install(["docker-compose"], root=cfg.root)
        else:
            notes.append("docker compose v2 missing: the compose file check skips")
    return notes or ["test tools present: coap-client, DTLSSocket, chromium, docker compose"]
