"""`nbmeter tenant platform-secret` and `nbmeter device provision --dtls --platform`: the
secrets are shown once and stored only sealed (real database, the real CLI as a process)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid

import asyncpg
import pytest

from storage.credentials import new_key


async def _cli(db_url: str, key: str, *argv: str) -> tuple[int, str, str]:
    env = {**os.environ, "NBMETER_DATABASE_URL": db_url, "NBMETER_CREDENTIALS_KEY": key}
    env.pop("NBMETER_MQTT_ADMIN_URL", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nbmeter.cli", *argv, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()


@pytest.fixture
async def slug(pool: asyncpg.Pool) -> str:
    """A tenant of its own."""
    name = f"c-{uuid.uuid4().hex[:12]}"
    await pool.execute("INSERT INTO tenants (slug, name) VALUES ($1, $1)", name)
    return name


async def test_platform_secret_is_shown_once_and_stored_sealed(
    db_url: str, pool: asyncpg.Pool, slug: str
) -> None:
    """The secret is printed (stdout) with the URL path to subscribe (stderr); the row
    holds no copy of it in the clear; a second call rotates it."""
    key = new_key()
    code, out, err = await _cli(db_url, key, "tenant", "platform-secret", slug, "oceanconnect")
    assert code == 0, err
    secret = out.strip()
    assert len(secret) >= 24
    assert f"/p/{slug}/oceanconnect/{secret}" in err
    sealed = await pool.fetchval(
        "SELECT secret_sealed FROM platform_secrets s JOIN tenants t USING (tenant_id)"
        " WHERE t.slug = $1 AND s.platform = 'oceanconnect'",
        slug,
    )
    assert secret.encode() not in bytes(sealed)
    code, again, _ = await _cli(db_url, key, "tenant", "platform-secret", slug, "oceanconnect")
    assert code == 0
    assert again.strip() != secret


async def test_unknown_tenant_is_refused(db_url: str) -> None:
    """No tenant of that slug: exit 1 with a message, nothing printed on stdout."""
    code, out, err = await _cli(db_url, new_key(), "tenant", "platform-secret", "nope", "onenet")
    assert code == 1
    assert out == ""
    assert "no tenant 'nope'" in err


async def test_device_provision_with_dtls_and_platform_identity(
    db_url: str, pool: asyncpg.Pool, slug: str
) -> None:
    """`--dtls --platform onenet=IMEI`: the PSK identity and key printed once, the key
    stored sealed, the IMEI mapped to the meter; `revoke` deletes the DTLS credential."""
    key, address = new_key(), f"{uuid.uuid4().int % 10**14:014d}"
    code, out, err = await _cli(
        db_url, key, "device", "provision", slug, address, "--no-oscore", "--no-mqtt",
        "--dtls", "--platform", "onenet=869975031234567",
    )  # fmt: skip
    assert code == 0, err
    shown = json.loads(out)
    assert shown["platforms"] == {"onenet": "869975031234567"}
    psk = shown["dtls"]["psk"]
    assert len(psk) == 16
    assert shown["dtls"]["psk_hex"] == psk.encode().hex()
    row = await pool.fetchrow(
        "SELECT psk_identity, psk_sealed FROM dtls_credentials WHERE meter_id = $1",
        shown["meter_id"],
    )
    assert row["psk_identity"] == shown["dtls"]["psk_identity"]
    assert psk.encode() not in bytes(row["psk_sealed"])
    mapped = await pool.fetchval(
        "SELECT meter_id FROM platform_devices WHERE platform = 'onenet'"
        " AND platform_device_id = '869975031234567' AND tenant_id ="
        " (SELECT tenant_id FROM tenants WHERE slug = $1)",
        slug,
    )
    assert mapped == shown["meter_id"]
    code, out, err = await _cli(db_url, key, "device", "revoke", slug, address)
    assert code == 0, err
    assert json.loads(out)["dtls"] is True
    gone = await pool.fetchval(
        "SELECT count(*) FROM dtls_credentials WHERE meter_id = $1", shown["meter_id"]
    )
    assert gone == 0


async def test_bad_platform_identity_is_a_usage_error(db_url: str, slug: str) -> None:
    """`--platform` without PLATFORM=ID is refused by the argument parser."""
    code, _, err = await _cli(
        db_url, new_key(), "device", "provision", slug, "00000000000001", "--platform", "imei"
    )
    assert code == 2
    assert "--platform" in err
