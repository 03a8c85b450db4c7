"""Where the stack keeps its state, which ports it uses, and the secrets it generated.

Environment (all optional):
  NBMETER_HOME          state directory (default ~/.local/share/nbmeter)
  NBMETER_PG_PORT       loopback port of the project's PostgreSQL (default 55432)
  NBMETER_MQTT_PORT     loopback port of the project's Mosquitto, plain MQTT (default 51883)
  NBMETER_MQTT_TLS_PORT its TLS listener for devices and collectors (default plain + 1)
  NBMETER_MQTT_TLS_BIND address the TLS listener binds (default 127.0.0.1; 0.0.0.0 or the
                        host's address where meters must reach it)
  NBMETER_MQTT_TLS_HOSTS extra names/addresses, comma-separated, in the broker certificate
  NBMETER_STACK         force a way: docker, native or chroot (default: detect)
  NBMETER_DATABASE_URL  use this database; start none
  NBMETER_MQTT_URL      use this broker; start none
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

PG_MAJOR = 17
DB_NAME = "nbmeter"
DB_USER = "nbmeter"


class StackError(Exception):
    """The stack could not be brought to the asked state; the message says what to do."""


@dataclass(frozen=True)
class StackConfig:
    """Resolved stack settings: state directory, ports, and overrides from the environment."""

    home: Path
    pg_port: int
    mqtt_port: int
    mqtt_tls_port: int
    mqtt_tls_bind: str
    mqtt_tls_hosts: tuple[str, ...]
    forced_way: str | None
    external_db: str | None
    external_mqtt: str | None

    @property
    def root(self) -> Path:
        """The Debian 13 root used on hosts whose own Debian lacks TimescaleDB."""
        return self.home / "debian-trixie"

    @property
    def mosquitto_dir(self) -> Path:
        """Mosquitto's config, persistence and credential files."""
        return self.home / "mosquitto"

    @property
    def tls_dir(self) -> Path:
        """The stack's CA and the broker's certificate (see nbmeter/stack/tls.py)."""
        return self.mosquitto_dir / "tls"

    @property
    def secrets_file(self) -> Path:
        """Generated passwords (mode 0600)."""
        return self.home / "secrets.json"


def _port(name: str, default: int) -> int:
    raw = os.environ.get(name, str(default))
    try:
        port = int(raw)
    except ValueError:
        msg = f"{name}={raw!r} is not a port number"
        raise StackError(msg) from None
    if not 1024 <= port <= 65535:
        msg = f"{name}={port} is outside 1024-65535"
        raise StackError(msg)
    return port


def load_config() -> StackConfig:
    """Read the stack settings from the environment (see the module docstring)."""
    home = Path(os.environ.get("NBMETER_HOME") or Path.home() / ".local/share/nbmeter")
    way = os.environ.get("NBMETER_STACK") or None
    if way not in (None, "docker", "native", "chroot"):
        msg = f"NBMETER_STACK={way!r}: use docker, native or chroot (or leave it unset)"
        raise StackError(msg)
    mqtt_port = _port("NBMETER_MQTT_PORT", 51883)
    tls_port = _port("NBMETER_MQTT_TLS_PORT", mqtt_port + 1)
    if tls_port == mqtt_port:
        msg = f"NBMETER_MQTT_TLS_PORT={tls_port} is the plain MQTT port: choose another"
        raise StackError(msg)
    extra = os.environ.get("NBMETER_MQTT_TLS_HOSTS", "")
    return StackConfig(
        home=home.expanduser().resolve(),
        pg_port=_port("NBMETER_PG_PORT", 55432),
        mqtt_port=mqtt_port,
        mqtt_tls_port=tls_port,
        mqtt_tls_bind=os.environ.get("NBMETER_MQTT_TLS_BIND") or "127.0.0.1",
        mqtt_tls_hosts=tuple(h.strip() for h in extra.split(",") if h.strip()),
        forced_way=way,
        external_db=os.environ.get("NBMETER_DATABASE_URL") or None,
        external_mqtt=os.environ.get("NBMETER_MQTT_URL") or None,
    )


def stack_secrets(cfg: StackConfig) -> dict[str, str]:
    """The stack's generated passwords, created on first use and kept in `secrets_file`."""
    path = cfg.secrets_file
    data: dict[str, str] = {}
    if path.exists():
        data = json.loads(path.read_text(encoding="utf-8"))
    if "db_password" not in data:
        data["db_password"] = secrets.token_urlsafe(18)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2), encoding="utf-8")
        path.chmod(0o600)
    return data


def say(message: str) -> None:
    """Progress for a person: one line on stderr (stdout stays for `stack env`)."""
    print(f"nbmeter stack: {message}", file=sys.stderr, flush=True)
