"""The local stack `nbmeter stack up` starts: real TimescaleDB, real Mosquitto, compose file."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from nbmeter.stack.config import load_config
from nbmeter.stack.control import compose_command, env_lines
from storage.credentials import new_key

REPO = Path(__file__).resolve().parents[2]
NBMETER = [sys.executable, "-m", "nbmeter.cli"]


def _uses_own_stack() -> bool:
    own_db = load_config().pg_port == int(
        os.environ.get("NBMETER_DATABASE_URL", "").rsplit(":", 1)[-1].split("/")[0] or 0
    )
    return own_db


async def test_timescaledb_extension_is_loaded(server_url: str) -> None:
    """The server preloads timescaledb and the nbmeter database has the extension."""
    conn = await asyncpg.connect(server_url)
    try:
        preload = await conn.fetchval("SELECT current_setting('shared_preload_libraries')")
        version = await conn.fetchval(
            "SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'"
        )
        # a hypertable can only be made when the extension is really loaded
        tx = conn.transaction()
        await tx.start()
        await conn.execute("CREATE TABLE stack_probe (t timestamptz NOT NULL, v int)")
        made = await conn.fetchval("SELECT count(*) FROM create_hypertable('stack_probe', 't')")
        await tx.rollback()
    finally:
        await conn.close()
    assert "timescaledb" in preload
    assert version is not None
    assert version.startswith("2.")
    assert made == 1


def test_second_up_is_a_fast_no_op() -> None:
    """`nbmeter stack up` on a running stack changes nothing: it builds, installs and starts
    nothing (what it says shows it; a time bound would only measure the machine's load)."""
    if not _uses_own_stack():
        pytest.skip("NBMETER_DATABASE_URL points at an external server: no stack to check")
    env = {
        k: v for k, v in os.environ.items() if k not in ("NBMETER_DATABASE_URL", "NBMETER_MQTT_URL")
    }
    proc = subprocess.run(
        [*NBMETER, "stack", "up"], capture_output=True, text=True, env=env, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "already running" in proc.stderr
    said = proc.stderr.lower()
    for step in ("debootstrap", "installing", "initdb", "starting", "restarting"):
        assert step not in said, f"a second `stack up` did {step!r}:\n{proc.stderr}"


def test_env_lines_evaluate_in_a_shell() -> None:
    """`nbmeter stack env` prints NAME='value' lines a POSIX shell can eval and export."""
    lines = env_lines(load_config(), export=True)
    script = "\n".join(lines) + '\nprintf \'%s\\n\' "$NBMETER_DATABASE_URL" "$NBMETER_MQTT_URL"'
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True)
    db, mqtt = out.stdout.splitlines()
    assert db.startswith("postgresql://")
    assert mqtt.startswith("mqtt://")
    assert all(shlex.split(line)[1].split("=", 1)[0].startswith("NBMETER_") for line in lines)


def test_status_reports_both_services() -> None:
    """`nbmeter stack status` exits 0 and names the database and the broker."""
    proc = subprocess.run(
        [*NBMETER, "stack", "status"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "database:" in proc.stdout
    assert "broker:" in proc.stdout


def test_compose_file_is_valid() -> None:
    """`docker compose config` accepts docker-compose.yml with its four services."""
    compose = compose_command(load_config())
    if compose is None:
        pytest.skip("no docker compose v2 here (`nbmeter stack tools` installs it as root)")
    proc = subprocess.run(
        [*compose, "-f", str(REPO / "docker-compose.yml"), "config", "--services"],
        capture_output=True,
        text=True,
        env={**os.environ, "NBMETER_CREDENTIALS_KEY": new_key()},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert set(proc.stdout.split()) == {"timescaledb", "mosquitto", "collector", "api"}


def test_compose_needs_the_credentials_key() -> None:
    """Without NBMETER_CREDENTIALS_KEY compose refuses the file with a message naming it
    (the collector and API would otherwise run with no key: adding a webhook answers 503)."""
    compose = compose_command(load_config())
    if compose is None:
        pytest.skip("no docker compose v2 here (`nbmeter stack tools` installs it as root)")
    env = {k: v for k, v in os.environ.items() if k != "NBMETER_CREDENTIALS_KEY"}
    proc = subprocess.run(
        [*compose, "-f", str(REPO / "docker-compose.yml"), "config", "--services"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert proc.returncode != 0
    assert "set NBMETER_CREDENTIALS_KEY to the 32-byte base64 key" in proc.stderr
    rendered = subprocess.run(
        [*compose, "-f", str(REPO / "docker-compose.yml"), "config", "--format", "json"],
        capture_output=True,
        text=True,
        env={**env, "NBMETER_CREDENTIALS_KEY": "k3y"},
        check=True,
    )
    services = json.loads(rendered.stdout)["services"]
    for name in ("collector", "api"):
        assert services[name]["environment"]["NBMETER_CREDENTIALS_KEY"] == "k3y"


def test_bad_port_setting_is_a_clear_error() -> None:
    """A non-numeric NBMETER_PG_PORT is refused with a message naming the variable."""
    env = {**os.environ, "NBMETER_PG_PORT": "fivefivefour"}
    proc = subprocess.run(
        [*NBMETER, "stack", "status"], capture_output=True, text=True, env=env, check=False
    )
    assert proc.returncode == 1
    assert "NBMETER_PG_PORT" in proc.stderr
