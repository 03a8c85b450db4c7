"""Provision one meter's transport credentials; the secrets are returned once, stored never.

`provision_device(...)` creates the meter (if absent) in its tenant, a fresh OSCORE context
(stored sealed under the credentials key), a broker account whose ACL allows publishing
only to `nbmeter/<tenant-slug>/<address>/up` (created on the running broker over dynsec;
the database keeps a hash), and stores the meter's OMS/wM-Bus AES-128 key when given
(sealed; it is the meter's factory key, so it is never generated or shown here). Calling
it again rotates the credentials: the old ones stop working. `revoke_device(...)` deletes
a meter's OSCORE context and broker account (its readings and meter stay). Either change
reaches running collectors when its transaction commits (NOTIFY, migration 0030).
`rotation_oscore(...)` is the rollover without a gap instead (a rotate_key command): a new
context staged beside the current one, which keeps working until the device confirms
the new one (migration 0048, `storage.oscore_rollover`). They
raise `ProvisionError` with a message for the operator, and storage errors
(`storage.errors`) when the database fails.
"""

from __future__ import annotations

import asyncio
import secrets
import string
from dataclasses import dataclass, field

from aiocoap import oscore

from devices.broker import BrokerError, dynsec
from devices.topics import device_username, down_topic, result_topic, uplink_topic
from storage import credentials, dtls, oscore_rollover
from storage import platforms as platform_store
from storage.pool import Connection, connected

OSCORE_ALGORITHM = "AES-CCM-16-64-128"  # RFC 8613 default; HKDF SHA-256
SERVER_SENDER_ID = b"\x00"  # our Sender ID: unique per context, so one value serves all
_PSK_ALPHABET = string.ascii_letters + string.digits


class ProvisionError(Exception):
    """Provisioning failed; nothing the operator must undo (the message says what to do)."""


@dataclass(frozen=True)
class ProvisionedDevice:
    """What to load into the meter. Shown once: nbmeter keeps only sealed or hashed copies."""

    meter_id: int
    tenant: str
    address: str
    oscore: dict[str, str] = field(default_factory=dict)  # hex; the device's point of view
    mqtt: dict[str, str] = field(default_factory=dict)  # username, password, topic
    platforms: dict[str, str] = field(default_factory=dict)  # platform -> its device identity
    dtls: dict[str, str] = field(default_factory=dict)  # psk_identity, psk (and its hex)


def _broker_commands(username: str, password: str, topic: str) -> list[dict[str, object]]:
    role = f"device:{username}"
    # its own topics only: publish uplinks and answers, subscribe to (and so receive) its
    # own commands; the broker's default refuses every other publish and subscription
    own = (
        ("publishClientSend", topic),
        ("publishClientSend", result_topic(topic)),
        ("subscribeLiteral", down_topic(topic)),
    )
    return [
        {"command": "deleteClient", "username": username},
        {"command": "deleteRole", "rolename": role},
        {"command": "createRole", "rolename": role},
        *(
            {"command": "addRoleACL", "rolename": role, "acltype": t, "topic": f, "allow": True}
            for t, f in own
        ),
        {
            "command": "createClient",
            "username": username,
            "password": password,
            "roles": [{"rolename": role}],
        },
    ]


async def provision_device(
    database_url: str,
    tenant_slug: str,
    address: str,
    *,
    credentials_key: str,
    mqtt_admin_url: str | None = None,
    kind: str = "water",
    meter_format: str = "cjt188",
    oscore: bool = True,
    aes_key: bytes | None = None,
    platform_ids: dict[str, str] | None = None,
    dtls_psk: bool = False,
) -> ProvisionedDevice:
    """Create or rotate the credentials of meter `address` of tenant `tenant_slug`.

    OSCORE when `oscore`; an MQTT account when `mqtt_admin_url` (the broker's admin URL,
    NBMETER_MQTT_ADMIN_URL) is given; the meter's AES-128 key (16 bytes, OMS security
    mode 5 / ELL) is stored sealed when `aes_key` is given, and never returned.
    `platform_ids` maps an operator platform (onenet, oceanconnect) to the identity it
    names the meter by (device id or IMEI), so that platform's pushes reach it.
    `dtls_psk` makes a DTLS-PSK identity and key for coaps:// (stored sealed). Returns
    the secrets to show once.
    """
    platform_ids = platform_ids or {}
    for platform, device_id in platform_ids.items():
        if platform not in platform_store.PLATFORMS or not 1 <= len(device_id) <= 128:
            msg = f"platform identity {platform}={device_id!r}: name one of"
            raise ProvisionError(f"{msg} {', '.join(platform_store.PLATFORMS)}, 1-128 chars")
    try:
        key = credentials.parse_key(credentials_key)
    except ValueError as exc:
        raise ProvisionError(f"NBMETER_CREDENTIALS_KEY: {exc}") from exc
    if aes_key is not None and len(aes_key) != credentials.AES_KEY_BYTES:
        msg = f"the AES key must be {credentials.AES_KEY_BYTES} bytes (got {len(aes_key)})"
        raise ProvisionError(msg)
    async with connected(database_url, "provisioning a device") as conn, conn.transaction():
        tenant = await credentials.tenant_by_slug(conn, tenant_slug)
        if tenant is None:
            raise ProvisionError(f"no tenant {tenant_slug!r}: create it first")
        try:
            meter_id = await credentials.ensure_meter(
                conn, tenant[0], address, kind=kind, fmt=meter_format
            )
        except credentials.RemovedMeterError as exc:
            raise ProvisionError(str(exc)) from exc
        meter = credentials.MeterRef(meter_id, tenant[0], address)
        if aes_key is not None:
            await credentials.store_aes_key(conn, key, meter, aes_key)
        for platform, device_id in platform_ids.items():
            await platform_store.store_device(conn, meter, platform, device_id)
        dtls_out: dict[str, str] = {}
        if dtls_psk:
            # random identity: it travels in the clear in the handshake, so it names
            # neither tenant nor meter. The key: 16 bytes (tinydtls' DTLS_PSK_MAX_KEY_LEN)
            # of letters and digits (about 95 bits), since coap-client and many modules
            # take it as text; psk_hex for those that take hex
            identity = secrets.token_hex(8)
            psk = "".join(secrets.choice(_PSK_ALPHABET) for _ in range(16))
            await dtls.store_psk(conn, key, meter, identity, psk.encode())
            dtls_out = {"psk_identity": identity, "psk": psk, "psk_hex": psk.encode().hex()}
        oscore_out: dict[str, str] = {}
        if oscore:
            oscore_out = await _new_oscore(conn, key, meter)
        mqtt_out: dict[str, str] = {}
        if mqtt_admin_url:
            username = device_username(tenant_slug, address)
            password = secrets.token_urlsafe(18)
            digest, salt, iterations = credentials.hash_password(password, iterations=10_000)
            await credentials.store_mqtt(
                conn,
                meter,
                username=username,
                password_hash=f"pbkdf2-sha512${iterations}${salt}${digest}",
            )
            topic = uplink_topic(tenant_slug, address)
            # broker last, inside the transaction: a failure leaves no half-made row
            await _apply_on_broker(mqtt_admin_url, username, password, topic)
            mqtt_out = {"username": username, "password": password, "topic": topic}
    return ProvisionedDevice(
        meter_id, tenant_slug, address, oscore_out, mqtt_out, dict(platform_ids), dtls_out
    )


async def create_platform_secret(
    database_url: str, tenant_slug: str, platform: str, *, credentials_key: str
) -> str:
    """Create (or rotate) tenant `tenant_slug`'s endpoint secret for `platform`; return it.

    Stored sealed under the credentials key; shown once. The old secret stops working
    within the collectors' `secret_ttl_s` (5 s)."""
    if platform not in platform_store.PLATFORMS:
        raise ProvisionError(f"no platform {platform!r}: {', '.join(platform_store.PLATFORMS)}")
    try:
        key = credentials.parse_key(credentials_key)
    except ValueError as exc:
        raise ProvisionError(f"NBMETER_CREDENTIALS_KEY: {exc}") from exc
    secret = secrets.token_urlsafe(24)  # URL-safe: OceanConnect carries it in the URL
    async with connected(database_url, "creating a platform secret") as conn, conn.transaction():
        tenant = await credentials.tenant_by_slug(conn, tenant_slug)
        if tenant is None:
            raise ProvisionError(f"no tenant {tenant_slug!r}: create it first")
        await platform_store.store_secret(conn, key, tenant[0], platform, secret.encode())
    return secret


@dataclass(frozen=True)
class RevokedDevice:
    """What `revoke_device` removed."""

    meter_id: int
    tenant: str
    address: str
    oscore: bool  # an OSCORE context was deleted
    mqtt: str | None  # the broker account deleted, if there was one
    dtls: bool = False  # a DTLS-PSK credential was deleted


async def revoke_device(
    database_url: str, tenant_slug: str, address: str, *, mqtt_admin_url: str | None = None
) -> RevokedDevice:
    """Delete the OSCORE context and broker account of meter `address` of `tenant_slug`.

    Its CoAP requests get 4.01 as soon as this commits; its broker account is deleted on
    the broker when `mqtt_admin_url` is given (else the operator is told to). The meter
    and its readings stay.
    """
    async with connected(database_url, "revoking a device") as conn, conn.transaction():
        tenant = await credentials.tenant_by_slug(conn, tenant_slug)
        if tenant is None:
            raise ProvisionError(f"no tenant {tenant_slug!r}")
        meter_id = await credentials.active_meter(conn, tenant[0], address)
        if meter_id is None:
            raise ProvisionError(f"no active meter {address!r} in tenant {tenant_slug!r}")
        had_oscore = await credentials.revoke_oscore(conn, meter_id)
        had_dtls = await dtls.revoke_psk(conn, meter_id)
        username = await credentials.revoke_mqtt(conn, meter_id)
        if username is not None:
            if mqtt_admin_url is None:
                msg = (
                    f"meter {address} has the broker account {username!r}: set"
                    " NBMETER_MQTT_ADMIN_URL so it is deleted on the broker too"
                )
                raise ProvisionError(msg)
            # broker last, inside the transaction: a failure leaves the account in both
            await _delete_on_broker(mqtt_admin_url, username)
    return RevokedDevice(meter_id, tenant_slug, address, had_oscore, username, had_dtls)


async def _delete_on_broker(admin_url: str, username: str) -> None:
    commands: list[dict[str, object]] = [
        {"command": "deleteClient", "username": username},
        {"command": "deleteRole", "rolename": f"device:{username}"},
    ]
    try:
        responses = await asyncio.to_thread(dynsec, admin_url, commands)
    except BrokerError as exc:
        raise ProvisionError(f"broker: {exc}") from exc
    failed = [r for r in responses[:1] if r.get("error")]
    if failed:
        raise ProvisionError(f"broker refused deleteClient: {failed[0]['error']}")


class _Derivation(oscore.SecurityContextUtils):  # type: ignore[misc]  # aiocoap: untyped base
    def __init__(self, sender_id: bytes, recipient_id: bytes) -> None:
        self.alg_aead = oscore.algorithms[oscore.DEFAULT_ALGORITHM]
        self.hashfun = oscore.hashfunctions[oscore.DEFAULT_HASHFUNCTION]
        self.sender_id, self.recipient_id, self.id_context = sender_id, recipient_id, None


def derive(
    kid: bytes, sender_id: bytes, master_secret: bytes, master_salt: bytes
) -> tuple[bytes, bytes, bytes]:
    """(sender key, recipient key, common IV) of the server's side of a device's context
    (RFC 8613 §3.2.1, by aiocoap's own derivation), stored sealed with its secrets so the
    collector derives nothing when it loads the context."""
    ctx = _Derivation(sender_id, kid)
    ctx.derive_keys(master_salt, master_secret)
    return bytes(ctx.sender_key), bytes(ctx.recipient_key), bytes(ctx.common_iv)


async def _free_kid(conn: Connection, meter_id: int) -> bytes:
    for _ in range(5):  # a random 6-byte kid collides with odds ~n/2^48; retry anyway
        kid = secrets.token_bytes(6)
        if not await credentials.oscore_kid_taken(conn, kid, meter_id):
            return kid
    raise ProvisionError("could not draw a unique OSCORE key id; try again")  # pragma: no cover


def device_oscore(
    kid: bytes, sender_id: bytes, master_secret: bytes, master_salt: bytes
) -> dict[str, str]:
    """A context as the device loads it (hex, the device's point of view), from ours:
    `kid` is the device's Sender ID, `sender_id` ours."""
    return {
        "sender_id": kid.hex(),
        "recipient_id": sender_id.hex(),
        "master_secret": master_secret.hex(),
        "master_salt": master_salt.hex(),
        "algorithm": OSCORE_ALGORITHM,
        "kdf": "HKDF-SHA256",
    }


async def _new_oscore(conn: Connection, key: bytes, meter: credentials.MeterRef) -> dict[str, str]:
    kid = await _free_kid(conn, meter.meter_id)
    master_secret, master_salt = secrets.token_bytes(16), secrets.token_bytes(8)
    await credentials.store_oscore(
        conn,
        key,
        meter,
        kid=kid,
        sender_id=SERVER_SENDER_ID,
        master_secret=master_secret,
        master_salt=master_salt,
        derived=derive(kid, SERVER_SENDER_ID, master_secret, master_salt),
    )
    return device_oscore(kid, SERVER_SENDER_ID, master_secret, master_salt)


async def rotation_oscore(
    conn: Connection, key: bytes, meter_id: int, command_id: int
) -> dict[str, str] | None:
    """The new OSCORE context rotate_key `command_id` carries to `meter_id` (the device's
    point of view, as provisioning shows it): the one staged for it before (a resend
    carries the same), else a fresh one staged now beside the current context (migration
    0048: a new master secret, salt and key id). None when the meter has no OSCORE
    context to roll over from. Storage errors and CredentialsError as `storage` raises."""
    for _ in range(2):  # a concurrent staging wins: take what it staged
        staged = await oscore_rollover.staged_for(conn, key, meter_id, command_id)
        if not staged.rollable:
            return None
        if staged.context is not None:
            ctx = staged.context
            return device_oscore(ctx.kid, ctx.sender_id, ctx.master_secret, ctx.master_salt)
        kid = await _free_kid(conn, meter_id)
        master_secret, master_salt = secrets.token_bytes(16), secrets.token_bytes(8)
        fresh = await oscore_rollover.stage(
            conn, key, meter_id, kid=kid, sender_id=SERVER_SENDER_ID,
            master_secret=master_secret, master_salt=master_salt,
            derived=derive(kid, SERVER_SENDER_ID, master_secret, master_salt),
            command_id=command_id,
        )  # fmt: skip
        if fresh:
            return device_oscore(kid, SERVER_SENDER_ID, master_secret, master_salt)
    return None


async def _apply_on_broker(admin_url: str, username: str, password: str, topic: str) -> None:
    commands = _broker_commands(username, password, topic)
    try:
        responses = await asyncio.to_thread(dynsec, admin_url, commands)
    except BrokerError as exc:
        raise ProvisionError(f"broker: {exc}") from exc
    # the two deletes fail harmlessly for a new device; the rest must succeed
    failed = [r for r in responses[2:] if r.get("error")]
    if failed:
        raise ProvisionError(f"broker refused {failed[0]['command']}: {failed[0]['error']}")
