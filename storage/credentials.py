"""Device identities and their transport credentials, stored sealed or hashed, never clear.

The collector authenticates a device (OSCORE context, MQTT broker account) and must then
know which meter it is. This module is the SQL side of that: it creates meters and their
credential rows, looks them up by OSCORE key id (a current context's, or one a rotate_key
staged beside it: `storage.oscore_rollover`), tenant slug or MQTT topic, and persists
OSCORE replay windows with the answer given to each OSCORE uplink (migration 0030: a
retransmission after a crash gets that answer again). Changes to a context are announced
by a trigger (NOTIFY nbmeter_credentials, see `storage.notify`). Secrets cross it only
as arguments and return values:

- OSCORE master secret and salt, and OMS/wM-Bus AES-128 meter keys (migration 0011), are
  sealed with AES-256-GCM under a 32-byte key-encryption key (`NBMETER_CREDENTIALS_KEY`);
  the meter id (and, for AES keys, the purpose) is the associated data.
- MQTT passwords are hashed (PBKDF2-SHA512, the broker's own format); only the broker
  verifies them.

Errors: `StorageUnavailableError` when the database cannot be reached; `CredentialsError`
when a sealed secret does not open with the given key (wrong key, or tampering).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import asyncpg
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from storage import pgarrays
from storage.errors import StorageError
from storage.rows import INSTALLED_S_SQL

KEY_BYTES = 32
AES_KEY_BYTES = 16  # OMS / EN 13757-7: AES-128
_NONCE_BYTES = 12
_AES_PURPOSE = "oms-aes"
_NO_PENDING_OSCORE = (
    "oscore_pending_kid = NULL, oscore_pending_sender_id = NULL, oscore_pending_sealed = NULL,"
    " oscore_pending_at = NULL, oscore_pending_command = NULL"
)


class CredentialsError(StorageError):
    """A sealed credential could not be opened (wrong credentials key or tampered row)."""


class OscoreSecret(NamedTuple):
    """One device's OSCORE context as stored: key id, sender id, sealed-open secrets.

    A named tuple, not a frozen dataclass: the collector builds one per cold context (each
    city-day uplink), and a frozen dataclass's __init__ costs 2 µs of it."""

    meter_id: int
    tenant_id: int
    address: str
    kid: bytes  # the device's Sender ID = our Recipient ID
    sender_id: bytes  # our Sender ID towards the device
    master_secret: bytes
    master_salt: bytes
    replay_index: int | None
    replay_bits: int | None
    # sender key, recipient key and common IV as derived from the two above (RFC 8613
    # §3.2.1) when provisioning stored them: the collector then skips the three HKDFs a
    # context costs (each meter reports once a day, so every uplink meets a cold cache)
    derived: tuple[bytes, bytes, bytes] | None = None
    # the context a rotate_key staged beside the current one (migration 0048): a request
    # that verifies under it confirms it (`promote_oscore`); its window starts empty
    pending: bool = False
    meter_format: str | None = None  # meters.format, when the lookup read it
    installed_s: int | None = None  # meters.installed_at (epoch s, floor), likewise


# The plaintext of a sealed OSCORE context: a version byte (1), then each field as one
# length byte and its bytes: master secret, master salt and, where stored, sender key,
# recipient key, common IV. Contexts sealed before it are JSON of hex strings (first byte
# "{"), still opened: parsing that cost a cold context 4 µs of the collector's CPU.
_BLOB_V1 = 1
_BLOB_FIELDS = (2, 5)  # secret and salt; with the derived keys and IV


def oscore_blob(
    master_secret: bytes, master_salt: bytes, derived: tuple[bytes, bytes, bytes] | None = None
) -> bytes:
    """The plaintext of a sealed OSCORE context: master secret, salt, derived keys if given."""
    fields = (master_secret, master_salt, *(derived or ()))
    if any(len(f) > 255 for f in fields):
        raise ValueError("an OSCORE master secret, salt or key is at most 255 bytes")
    return bytes([_BLOB_V1]) + b"".join([bytes([len(f)]) + f for f in fields])


def open_oscore_blob(
    key: bytes, sealed: bytes, meter_id: int
) -> tuple[bytes, bytes, tuple[bytes, bytes, bytes] | None]:
    """(master secret, salt, derived keys or None) of `meter_id`'s sealed OSCORE context;
    CredentialsError if it does not open with `key` (or opens to no context we know)."""
    opened = unseal(key, sealed, meter_id)
    if opened[:1] == b"{":
        return _open_json_blob(opened)
    fields, pos, end = [], 1, len(opened)
    while pos < end:
        n = opened[pos]
        fields.append(opened[pos + 1 : pos + 1 + n])
        pos += 1 + n
    if opened[:1] != bytes([_BLOB_V1]) or pos != end or len(fields) not in _BLOB_FIELDS:
        msg = f"the OSCORE secret of meter {meter_id} is not a context this version reads"
        raise CredentialsError(msg)
    derived = (fields[2], fields[3], fields[4]) if len(fields) == 5 else None
    return fields[0], fields[1], derived


def _open_json_blob(opened: bytes) -> tuple[bytes, bytes, tuple[bytes, bytes, bytes] | None]:
    fields = json.loads(opened.decode())  # str: no encoding sniffing
    secret, salt = bytes.fromhex(fields["secret"]), bytes.fromhex(fields["salt"])
    try:
        derived = (
            bytes.fromhex(fields["sender_key"]),
            bytes.fromhex(fields["recipient_key"]),
            bytes.fromhex(fields["common_iv"]),
        )
    except KeyError:  # sealed before derived keys were stored
        derived = None
    return secret, salt, derived


@dataclass(frozen=True)
class MeterRef:
    """A meter as the collector needs it: ids and the address it reports."""

    meter_id: int
    tenant_id: int
    address: str
    format: str | None = None  # meters.format, where the lookup read it


def parse_key(text: str) -> bytes:
    """Decode a base64 (urlsafe or standard) credentials key; raise ValueError unless 32 bytes."""
    padded = text.strip() + "=" * (-len(text.strip()) % 4)
    raw = base64.urlsafe_b64decode(padded.replace("+", "-").replace("/", "_"))
    if len(raw) != KEY_BYTES:
        msg = f"the credentials key must be {KEY_BYTES} bytes, base64-encoded (got {len(raw)})"
        raise ValueError(msg)
    return raw


def new_key() -> str:
    """A fresh credentials key, base64url text (32 random bytes)."""
    return base64.urlsafe_b64encode(secrets.token_bytes(KEY_BYTES)).decode("ascii")


def _aad(meter_id: int, purpose: str) -> bytes:
    # the OSCORE blob (0010) binds the bare meter id; newer secrets add their purpose
    return (str(meter_id) if not purpose else f"{meter_id}/{purpose}").encode()


@functools.lru_cache(maxsize=4)
def _aead(key: bytes) -> AESGCM:
    # one cipher object per credentials key: building it costs more than opening a row
    # (2 µs of the collector's CPU per cold OSCORE context, as bench/oscore_path.py counts)
    return AESGCM(key)


def seal(key: bytes, plaintext: bytes, meter_id: int, purpose: str = "") -> bytes:
    """Encrypt `plaintext` for (`meter_id`, `purpose`) under `key`: nonce || AES-256-GCM."""
    nonce = secrets.token_bytes(_NONCE_BYTES)
    return nonce + _aead(key).encrypt(nonce, plaintext, _aad(meter_id, purpose))


def unseal(key: bytes, sealed: bytes, meter_id: int, purpose: str = "") -> bytes:
    """Decrypt what `seal` made for (`meter_id`, `purpose`); CredentialsError if it won't open."""
    try:
        return _aead(key).decrypt(
            sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], _aad(meter_id, purpose)
        )
    except (InvalidTag, ValueError) as exc:
        what = "OSCORE secret" if not purpose else f"{purpose} key"
        msg = f"the {what} of meter {meter_id} does not open with this credentials key"
        raise CredentialsError(msg) from exc


def hash_password(password: str, *, iterations: int = 101) -> tuple[str, str, int]:
    """PBKDF2-SHA512 hash of `password` as Mosquitto's dynamic-security plugin stores it.

    Returns (password_b64, salt_b64, iterations).
    """
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
    return base64.b64encode(digest).decode(), base64.b64encode(salt).decode(), iterations


async def tenant_by_slug(conn: asyncpg.Connection, slug: str) -> tuple[int, bool] | None:
    """(tenant_id, allow_plain_coap) of the tenant `slug`, or None when there is none."""
    row = await conn.fetchrow(
        "SELECT tenant_id, allow_plain_coap FROM tenants WHERE slug = $1", slug
    )
    return None if row is None else (int(row[0]), bool(row[1]))


async def tenants_by_slug(conn: asyncpg.Connection, slugs: Sequence[str]) -> dict[str, int]:
    """Slug -> tenant_id of those of `slugs` that name a tenant (the others are left out)."""
    rows = await conn.fetch("SELECT slug, tenant_id FROM tenants WHERE slug = ANY($1)", slugs)
    return {str(r[0]): int(r[1]) for r in rows}


async def plain_coap_tenants(conn: asyncpg.Connection) -> dict[str, int]:
    """Slug -> tenant_id of every tenant that allows plain CoAP (lab tenants: a few)."""
    rows = await conn.fetch("SELECT slug, tenant_id FROM tenants WHERE allow_plain_coap")
    return {str(r[0]): int(r[1]) for r in rows}


async def tenant_slug(conn: asyncpg.Connection, tenant_id: int) -> str:
    """The slug of tenant `tenant_id` (raise LookupError when it does not exist)."""
    slug = await conn.fetchval("SELECT slug FROM tenants WHERE tenant_id = $1", tenant_id)
    if slug is None:
        msg = f"no tenant {tenant_id}"
        raise LookupError(msg)
    return str(slug)


class RemovedMeterError(ValueError):
    """The address belongs to a removed meter and no active one: not created again."""


async def ensure_meter(
    conn: asyncpg.Connection, tenant_id: int, address: str, *, kind: str, fmt: str
) -> int:
    """The active meter `address` of `tenant_id`, created (kind, format) when absent.

    RemovedMeterError if the address's meter was removed: a new row would claim the old
    meter's history (installed since 1970); a reinstallation is registered with its date.
    """
    row = await conn.fetchrow(
        "SELECT meter_id, removed_at FROM meters WHERE tenant_id = $1 AND address = $2"
        " ORDER BY removed_at IS NULL DESC, removed_at DESC LIMIT 1",
        tenant_id,
        address,
    )
    meter_id = row["meter_id"] if row is not None and row["removed_at"] is None else None
    if row is not None and meter_id is None:
        msg = (
            f"meter {address} was removed at {row['removed_at'].isoformat()}; register its"
            " reinstallation with its date first (POST /v1/meters with installed_at)"
        )
        raise RemovedMeterError(msg)
    if meter_id is None:
        meter_id = await conn.fetchval(
            "INSERT INTO meters (tenant_id, address, kind, format) VALUES ($1, $2, $3, $4)"
            " RETURNING meter_id",
            tenant_id,
            address,
            kind,
            fmt,
        )
    return int(meter_id)


async def meters_by_topic(
    conn: asyncpg.Connection, pairs: Iterable[tuple[str, str]]
) -> dict[tuple[str, str], MeterRef]:
    """Map (tenant slug, address) of MQTT topics `nbmeter/<slug>/<address>/up` to meters."""
    wanted = sorted(set(pairs))
    if not wanted:
        return {}
    rows = await conn.fetch(
        "SELECT t.slug, m.address, m.meter_id, m.tenant_id, m.format FROM meters m JOIN tenants t"
        " USING (tenant_id) JOIN unnest($1::text[], $2::text[]) AS w(slug, address)"
        " ON t.slug = w.slug AND m.address = w.address WHERE m.removed_at IS NULL",
        [s for s, _ in wanted],
        [a for _, a in wanted],
    )
    return {
        (str(r[0]), str(r[1])): MeterRef(int(r[2]), int(r[3]), str(r[1]), str(r[4])) for r in rows
    }


async def store_oscore(
    conn: asyncpg.Connection,
    key: bytes,
    meter: MeterRef,
    *,
    kid: bytes,
    sender_id: bytes,
    master_secret: bytes,
    master_salt: bytes,
    derived: tuple[bytes, bytes, bytes] | None = None,
) -> None:
    """Store (or replace) the OSCORE context of `meter`, sealed; reset its replay window
    and drop a context a rotate_key staged (provisioning again replaces everything).

    `derived`: the context's sender key, recipient key and common IV (our point of view),
    stored with the secrets so the collector need not derive them again."""
    blob = oscore_blob(master_secret, master_salt, derived)
    await conn.execute(
        "INSERT INTO device_credentials (meter_id, tenant_id, oscore_kid, oscore_sender_id,"
        " oscore_sealed) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (meter_id) DO UPDATE SET"
        " oscore_kid = EXCLUDED.oscore_kid, oscore_sender_id = EXCLUDED.oscore_sender_id,"
        " oscore_sealed = EXCLUDED.oscore_sealed, oscore_replay_index = NULL,"
        " oscore_replay_bits = NULL, oscore_server_seq = 0, rotated_at = now(),"
        f" oscore_command = NULL, {_NO_PENDING_OSCORE}",
        meter.meter_id,
        meter.tenant_id,
        kid,
        sender_id,
        seal(key, blob, meter.meter_id),
    )


async def store_mqtt(
    conn: asyncpg.Connection, meter: MeterRef, *, username: str, password_hash: str
) -> None:
    """Record `meter`'s broker username and the hash of its password."""
    await conn.execute(
        "INSERT INTO device_credentials (meter_id, tenant_id, mqtt_username, mqtt_password_hash)"
        " VALUES ($1, $2, $3, $4) ON CONFLICT (meter_id) DO UPDATE SET"
        " mqtt_username = EXCLUDED.mqtt_username,"
        " mqtt_password_hash = EXCLUDED.mqtt_password_hash, rotated_at = now()",
        meter.meter_id,
        meter.tenant_id,
        username,
        password_hash,
    )


# The contexts of a batch of key ids ($1: a bytea[] literal, `storage.pgarrays`): current
# and pending kids each by their own unique index (one query, two probes), each row's
# meter by its primary key. The LIMIT keeps that a per-row probe: joined plainly, a batch
# of a few hundred key ids was planned as a hash join over a sequential scan of every
# meter (bench/pg_steps.py --explain), a cost that grows with the fleet, not the batch.
_METER_OF_CREDENTIAL = (
    " JOIN LATERAL (SELECT address, format, "
    + INSTALLED_S_SQL  # meters' (device_credentials has no installed_at)
    + " AS installed_s FROM meters WHERE meters.meter_id = c.meter_id"
    " AND removed_at IS NULL LIMIT 1) m ON true"
)
LOAD_OSCORE_SQL = (
    "SELECT c.oscore_kid, c.meter_id, c.tenant_id, m.address, c.oscore_sender_id,"
    " c.oscore_sealed, c.oscore_replay_index, c.oscore_replay_bits, false, m.format,"
    " m.installed_s FROM device_credentials c"
    + _METER_OF_CREDENTIAL
    + " WHERE c.oscore_kid = ANY($1::text::bytea[])"
    " UNION ALL SELECT c.oscore_pending_kid, c.meter_id, c.tenant_id, m.address,"
    " c.oscore_pending_sender_id, c.oscore_pending_sealed, NULL, NULL, true, m.format,"
    " m.installed_s FROM device_credentials c"
    + _METER_OF_CREDENTIAL
    + " WHERE c.oscore_pending_kid = ANY($1::text::bytea[])"
)


async def load_oscore_many(
    conn: asyncpg.Connection, key: bytes, kids: Iterable[bytes]
) -> tuple[dict[bytes, OscoreSecret], list[int]]:
    """The OSCORE contexts of `kids` in one query: (kid -> opened secret, unopenable meters).

    A kid is a meter's current context's or the one a rotate_key staged beside it
    (`pending`, migration 0048; its replay window starts empty). Unknown kids are absent.
    A row whose secret does not open with `key` is left out and its meter id listed, so
    one bad row does not hide the others.
    """
    wanted = sorted(set(kids))
    if not wanted:
        return {}, []
    rows = await conn.fetch(LOAD_OSCORE_SQL, pgarrays.byteas(wanted))
    found: dict[bytes, OscoreSecret] = {}
    unopenable: list[int] = []
    for row in rows:
        try:
            secret, salt, derived = open_oscore_blob(key, bytes(row[5]), int(row[1]))
        except CredentialsError:
            unopenable.append(int(row[1]))
            continue
        kid = bytes(row[0])
        found[kid] = OscoreSecret(
            meter_id=int(row[1]),
            tenant_id=int(row[2]),
            address=str(row[3]),
            kid=kid,
            sender_id=bytes(row[4]),
            master_secret=secret,
            master_salt=salt,
            replay_index=row[6],
            replay_bits=row[7],
            derived=derived,
            pending=bool(row[8]),
            meter_format=str(row[9]),
            installed_s=int(row[10]),
        )
    return found, unopenable


async def oscore_kid_taken(conn: asyncpg.Connection, kid: bytes, meter_id: int) -> bool:
    """True when another meter than `meter_id` holds the OSCORE key id `kid` (as its
    current or its pending context's)."""
    taken = await conn.fetchval(
        "SELECT 1 FROM device_credentials WHERE (oscore_kid = $1 OR oscore_pending_kid = $1)"
        " AND meter_id <> $2",
        kid,
        meter_id,
    )
    return taken is not None


async def revoke_oscore(conn: asyncpg.Connection, meter_id: int) -> bool:
    """Delete `meter_id`'s OSCORE context, and one staged beside it (its requests get
    4.01); False if it had none."""
    kid = await conn.fetchval(
        f"UPDATE device_credentials SET {_NO_PENDING_OSCORE}, oscore_kid = NULL,"
        " oscore_sender_id = NULL, oscore_sealed = NULL, oscore_replay_index = NULL,"
        " oscore_replay_bits = NULL, oscore_command = NULL, rotated_at = now()"
        " WHERE meter_id = $1 AND oscore_kid IS NOT NULL RETURNING meter_id",
        meter_id,
    )
    return kid is not None


async def revoke_mqtt(conn: asyncpg.Connection, meter_id: int) -> str | None:
    """Forget `meter_id`'s broker account; return its username (None if it had none)."""
    username = await conn.fetchval(
        "UPDATE device_credentials c SET mqtt_username = NULL, mqtt_password_hash = NULL,"
        " rotated_at = now() FROM device_credentials o WHERE c.meter_id = o.meter_id"
        " AND c.meter_id = $1 AND o.mqtt_username IS NOT NULL RETURNING o.mqtt_username",
        meter_id,
    )
    return None if username is None else str(username)


async def active_meter(conn: asyncpg.Connection, tenant_id: int, address: str) -> int | None:
    """The active meter `address` of `tenant_id`, or None."""
    found = await conn.fetchval(
        "SELECT meter_id FROM meters WHERE tenant_id = $1 AND address = $2 AND removed_at IS NULL",
        tenant_id,
        address,
    )
    return None if found is None else int(found)


# One OSCORE uplink as committed: (meter_id, replay index, replay bits, its partial IV,
# the context's kid, outcome status, quarantine reason, detail)
OscoreCommit = tuple[int, int, int, int, bytes, str, str, str]


async def save_replay_windows(
    conn: asyncpg.Connection, commits: Iterable[OscoreCommit]
) -> set[tuple[bytes, int]]:
    """Persist the replay windows and record each uplink's answer, in the caller's
    transaction; return the (kid, partial IV) pairs that were recorded already.

    A window is the context's (meter and kid: an uplink of a rotated-out context moves
    nothing); it never moves backwards, and windows of several processes merge (bitwise
    OR at the newer index), so a sequence number one process admitted stays seen. Each
    (kid, partial IV) is recorded once with its outcome, for `oscore_answer`. A pair
    recorded already was admitted before, by another process whose window this one's
    cached copy had not seen (or by this one before a restart): the request is a replay,
    and its caller must answer it as one (the recorded answer, `oscore_answer`).
    """
    rows = list(commits)
    if not rows:
        return set()
    latest: dict[tuple[int, bytes], tuple[int, int]] = {}
    for meter_id, index, bits, _piv, kid, *_ in rows:  # arrival order: the newest last
        if (meter_id, kid) not in latest or latest[meter_id, kid][0] <= index:
            latest[meter_id, kid] = (index, bits)
    # RFC 8613 §7.4 window of 32: bits fit a bigint; merge old bits shifted to the new index
    await conn.execute(
        "UPDATE device_credentials c SET oscore_replay_index = w.idx,"
        " oscore_replay_bits = CASE WHEN c.oscore_replay_index IS NULL"
        " OR w.idx - c.oscore_replay_index >= 62 THEN w.bits"
        " ELSE w.bits | (c.oscore_replay_bits >> (w.idx - c.oscore_replay_index)::int) END"
        " FROM unnest($1::text::bigint[], $2::text::bytea[], $3::text::bigint[],"
        " $4::text::bigint[]) AS w(meter_id, kid, idx, bits)"
        " WHERE c.meter_id = w.meter_id AND c.oscore_kid = w.kid"
        " AND (c.oscore_replay_index IS NULL OR c.oscore_replay_index <= w.idx)",
        # literals, as every array of this batch's statements (`storage.pgarrays`)
        pgarrays.bigints([k[0] for k in latest]),
        pgarrays.byteas([k[1] for k in latest]),
        pgarrays.bigints([v[0] for v in latest.values()]),
        pgarrays.bigints([v[1] for v in latest.values()]),
    )
    # the primary key decides, across processes: a concurrent insert of the same pair waits
    # for the other transaction and then inserts nothing
    pivs, kids = pgarrays.bigints([r[3] for r in rows]), pgarrays.byteas([r[4] for r in rows])
    status = await conn.execute(
        "INSERT INTO oscore_answers (meter_id, piv, kid, status, reason, detail)"
        " SELECT * FROM unnest($1::text::bigint[], $2::text::bigint[], $3::text::bytea[],"
        " $4::text::text[], $5::text::text[], $6::text::text[]) ON CONFLICT (kid, piv) DO NOTHING",
        pgarrays.bigints([r[0] for r in rows]),
        pivs,
        kids,
        pgarrays.texts([r[5] for r in rows]),
        pgarrays.texts([r[6] for r in rows]),
        pgarrays.texts([r[7] for r in rows]),
    )
    if int(status.rsplit(" ", 1)[1]) == len(rows):
        return set()  # the common case: every pair is new (no row per uplink comes back)
    # some pair was there: those recorded by an earlier transaction are the replays (a
    # pair twice in this batch was recorded here, by its first uplink)
    old = await conn.fetch(
        "SELECT a.kid, a.piv FROM oscore_answers a"
        " JOIN unnest($1::text::bytea[], $2::text::bigint[]) AS w(kid, piv) USING (kid, piv)"
        " WHERE a.xmin <> pg_current_xact_id()::xid",
        kids,
        pivs,
    )
    return {(bytes(r[0]), int(r[1])) for r in old}


async def oscore_answer(
    conn: asyncpg.Connection, kid: bytes, piv: int
) -> tuple[str, str, str] | None:
    """(status, reason, detail) recorded for context `kid`'s uplink with partial IV `piv`."""
    row = await conn.fetchrow(
        "SELECT status, reason, detail FROM oscore_answers WHERE kid = $1 AND piv = $2",
        kid,
        piv,
    )
    return None if row is None else (str(row[0]), str(row[1]), str(row[2]))


async def next_server_seqno(
    conn: asyncpg.Connection, meter_id: int, kid: bytes, count: int = 1
) -> int | None:
    """Reserve `count` server OSCORE sequence numbers of context `kid`; return the last.

    The numbers last-count+1 .. last are the caller's alone, across processes and
    restarts. None when the context is gone (revoked or rotated meanwhile).
    """
    seqno = await conn.fetchval(
        "UPDATE device_credentials SET oscore_server_seq = oscore_server_seq + $3"
        " WHERE meter_id = $1 AND oscore_kid = $2 RETURNING oscore_server_seq",
        meter_id,
        kid,
        count,
    )
    return None if seqno is None else int(seqno)


async def prune_oscore_answers(conn: asyncpg.Connection, older_than_s: float) -> int:
    """Delete answers recorded more than `older_than_s` ago; return how many."""
    done = await conn.execute(
        "DELETE FROM oscore_answers WHERE answered_at < now() - make_interval(secs => $1)",
        older_than_s,
    )
    return int(done.split()[-1])


async def store_aes_key(
    conn: asyncpg.Connection, key: bytes, meter: MeterRef, aes_key: bytes
) -> None:
    """Store (or replace) `meter`'s OMS/wM-Bus AES-128 key, sealed; ValueError unless 16 B."""
    if len(aes_key) != AES_KEY_BYTES:
        msg = f"an OMS AES key is {AES_KEY_BYTES} bytes (got {len(aes_key)})"
        raise ValueError(msg)
    await conn.execute(
        "INSERT INTO device_credentials (meter_id, tenant_id, aes_key_sealed)"
        " VALUES ($1, $2, $3) ON CONFLICT (meter_id) DO UPDATE SET"
        " aes_key_sealed = EXCLUDED.aes_key_sealed, rotated_at = now()",
        meter.meter_id,
        meter.tenant_id,
        seal(key, aes_key, meter.meter_id, _AES_PURPOSE),
    )


def open_aes_key(key: bytes, meter_id: int, sealed: bytes) -> bytes:
    """The AES key `store_aes_key` sealed for `meter_id`; CredentialsError if it won't open."""
    return unseal(key, sealed, meter_id, _AES_PURPOSE)


async def sealed_aes_keys(
    conn: asyncpg.Connection, pairs: Iterable[tuple[int, str]]
) -> dict[tuple[int, str], tuple[int, bytes]]:
    """(meter_id, sealed AES key) of the active meters (tenant_id, address) in `pairs`.

    One query; pairs whose meter is unknown or has no AES key are absent. Open each with
    `open_aes_key` (kept apart so one unopenable row does not hide the others).
    """
    wanted = sorted(set(pairs))
    if not wanted:
        return {}
    rows = await conn.fetch(
        "SELECT m.tenant_id, m.address, m.meter_id, c.aes_key_sealed FROM meters m"
        " JOIN unnest($1::bigint[], $2::text[]) AS w(tenant_id, address)"
        " ON m.tenant_id = w.tenant_id AND m.address = w.address"
        " JOIN device_credentials c ON c.meter_id = m.meter_id"
        " WHERE m.removed_at IS NULL AND c.aes_key_sealed IS NOT NULL",
        [t for t, _ in wanted],
        [a for _, a in wanted],
    )
    return {(int(r[0]), str(r[1])): (int(r[2]), bytes(r[3])) for r in rows}


async def stage_aes_key(
    conn: asyncpg.Connection, key: bytes, meter_id: int, aes_key: bytes,
    command_id: int | None = None,
) -> bool:  # fmt: skip
    """Stage `aes_key` as `meter_id`'s pending OMS key beside its current one (migration
    0047), by rotate_key `command_id` if any; False when the meter has no current AES key.
    ValueError unless 16 bytes."""
    if len(aes_key) != AES_KEY_BYTES:
        msg = f"an OMS AES key is {AES_KEY_BYTES} bytes (got {len(aes_key)})"
        raise ValueError(msg)
    done = await conn.execute(
        "UPDATE device_credentials SET aes_key_pending_sealed = $2, aes_key_pending_at = now(),"
        " aes_key_pending_command = $3 WHERE meter_id = $1 AND aes_key_sealed IS NOT NULL",
        meter_id,
        seal(key, aes_key, meter_id, _AES_PURPOSE),
        command_id,
    )
    return done.split()[-1] == "1"


async def sealed_pending_aes_keys(
    conn: asyncpg.Connection, pairs: Iterable[tuple[int, str]]
) -> dict[tuple[int, str], tuple[int, bytes]]:
    """(meter_id, sealed pending AES key) of the active meters (tenant_id, address) in
    `pairs` that have one; open each with `open_aes_key`."""
    wanted = sorted(set(pairs))
    if not wanted:
        return {}
    rows = await conn.fetch(
        "SELECT m.tenant_id, m.address, m.meter_id, c.aes_key_pending_sealed FROM meters m"
        " JOIN unnest($1::bigint[], $2::text[]) AS w(tenant_id, address)"
        " ON m.tenant_id = w.tenant_id AND m.address = w.address"
        " JOIN device_credentials c ON c.meter_id = m.meter_id"
        " WHERE m.removed_at IS NULL AND c.aes_key_pending_sealed IS NOT NULL",
        [t for t, _ in wanted],
        [a for _, a in wanted],
    )
    return {(int(r[0]), str(r[1])): (int(r[2]), bytes(r[3])) for r in rows}


async def promote_aes_keys(conn: asyncpg.Connection, meter_ids: Iterable[int]) -> list[int]:
    """The pending AES key becomes the current one (the device confirmed it); returns the
    meter ids promoted (a meter with no pending key any more is left as it is)."""
    rows = await conn.fetch(
        "UPDATE device_credentials SET aes_key_sealed = aes_key_pending_sealed,"
        " aes_key_command = aes_key_pending_command, aes_key_pending_sealed = NULL,"
        " aes_key_pending_at = NULL, aes_key_pending_command = NULL, rotated_at = now()"
        " WHERE meter_id = ANY($1::bigint[]) AND aes_key_pending_sealed IS NOT NULL"
        " RETURNING meter_id",
        sorted(set(meter_ids)),
    )
    return [int(r[0]) for r in rows]


async def pending_aes_key(
    conn: asyncpg.Connection, key: bytes, meter_id: int, command_id: int
) -> bytes | None:
    """The AES key rotate_key `command_id` carries to `meter_id`: the key it staged
    (pending, or already confirmed and current), else a fresh one staged now. None when
    the meter has no current key to roll over from."""
    row = await conn.fetchrow(
        "SELECT aes_key_sealed, aes_key_command, aes_key_pending_sealed,"
        " aes_key_pending_command FROM device_credentials"
        " WHERE meter_id = $1 AND aes_key_sealed IS NOT NULL",
        meter_id,
    )
    if row is None:
        return None
    if row["aes_key_pending_command"] == command_id and row["aes_key_pending_sealed"]:
        return open_aes_key(key, meter_id, bytes(row["aes_key_pending_sealed"]))
    if row["aes_key_command"] == command_id:  # confirmed by a frame under it already
        return open_aes_key(key, meter_id, bytes(row["aes_key_sealed"]))
    fresh = secrets.token_bytes(AES_KEY_BYTES)
    return fresh if await stage_aes_key(conn, key, meter_id, fresh, command_id) else None


async def promote_acknowledged_rotation(
    conn: asyncpg.Connection, meter_id: int, command_ids: Sequence[int]
) -> bool:
    """Promote `meter_id`'s pending AES key if the rotate_key command that staged it is
    among `command_ids` and acknowledged (the device confirmed it by answering)."""
    done = await conn.execute(
        "UPDATE device_credentials SET aes_key_sealed = aes_key_pending_sealed,"
        " aes_key_command = aes_key_pending_command, aes_key_pending_sealed = NULL,"
        " aes_key_pending_at = NULL, aes_key_pending_command = NULL, rotated_at = now()"
        " WHERE meter_id = $1 AND aes_key_pending_sealed IS NOT NULL"
        " AND aes_key_pending_command = ANY($2::bigint[]) AND EXISTS ("
        " SELECT 1 FROM commands WHERE command_id = aes_key_pending_command"
        " AND kind = 'rotate_key' AND state = 'acknowledged')",
        meter_id,
        list(command_ids),
    )
    return done.split()[-1] == "1"
