"""The local stack: a TimescaleDB server and a Mosquitto broker that nbmeter starts itself.

`up()` picks the first way that works on this machine and makes both services ready:

1. external: NBMETER_DATABASE_URL / NBMETER_MQTT_URL are set, so that service is used
   as it is and nothing is started for it;
2. docker: a Docker engine answers, so `docker compose` runs docker-compose.yml;
3. native: Debian packages postgresql-17-timescaledb (Debian 13 and later): it is
   installed and PostgreSQL runs from the host's binaries;
4. chroot: Debian 12: a minimal Debian 13 root (debootstrap, from the mirror this
   machine's apt already uses) holds PostgreSQL 17 + TimescaleDB, run in it on loopback.

Mosquitto runs from the host's package (installed when missing) with the project's
config (`mosquitto.conf` beside this file). All state lives under `state_dir()`,
outside the repository, and is reused: a second `up` only checks, and an `up` after a
crash restarts what died. Every failure is a `StackError` whose message says what to do.
"""

from __future__ import annotations

from nbmeter.stack.config import StackConfig, StackError, load_config
from nbmeter.stack.control import down, env_lines, status, up

__all__ = ["StackConfig", "StackError", "down", "env_lines", "load_config", "status", "up"]
