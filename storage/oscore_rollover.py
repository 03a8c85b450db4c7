"""OSCORE context rollover (migration 0048): a new context staged beside the current one.

A rotate_key command for an OSCORE device carries a new context (master secret, salt and
a new key id), which is staged here when the command is first sent (`stage`), sealed as
the current one is (`storage.credentials.seal`, the bare meter id as associated data).
The collector accepts both until the device confirms the new one:

- by a request that verifies under the pending kid (`promote`, in the transaction that
  commits that request, before its replay window is saved: the window lands on the new
  current context);
- by acknowledging the command that staged it (`promote_acknowledged`).

Promotion makes the pending context the current one with a fresh replay window and
server sequence number, and forgets the old kid. Which context a command carries is
`staged_for`'s answer: the one it staged (pending, or already confirmed), else none yet.

Errors: `StorageUnavailableError` when the database cannot be reached; `CredentialsError`
when a sealed secret does not open with the given key.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import asyncpg

from storage.credentials import OscoreSecret, open_oscore_blob, oscore_blob, seal

# commands whose staged context may still be taken by the device
_OPEN = ("queued", "sent")


@dataclass(frozen=True)
class Staged:
    """What a rotate_key command carries: `context` (the one it, or an open rotate_key
    before it, staged; None: stage a new one), or nothing when the meter has no OSCORE
    context to roll over from (`rollable` False)."""

    rollable: bool
    context: OscoreSecret | None = None


def _secret(key: bytes, row: asyncpg.Record, prefix: str, *, pending: bool) -> OscoreSecret:
    meter_id = int(row["meter_id"])
    secret, salt, derived = open_oscore_blob(key, bytes(row[f"{prefix}sealed"]), meter_id)
    return OscoreSecret(
        meter_id=meter_id,
        tenant_id=int(row["tenant_id"]),
        address=str(row["address"]),
        kid=bytes(row[f"{prefix}kid"]),
        sender_id=bytes(row[f"{prefix}sender_id"]),
        master_secret=secret,
        master_salt=salt,
        replay_index=None,
        replay_bits=None,
        derived=derived,
        pending=pending,
    )


async def staged_for(
    conn: asyncpg.Connection, key: bytes, meter_id: int, command_id: int
) -> Staged:
    """The context rotate_key `command_id` carries to `meter_id` (see `Staged`): the one
    it staged, pending or already confirmed; or a pending one an open rotate_key staged
    (replacing it could strand a device that already took it). CredentialsError if a
    sealed secret does not open."""
    row = await conn.fetchrow(
        "SELECT c.meter_id, c.tenant_id, m.address, c.oscore_kid, c.oscore_sender_id,"
        " c.oscore_sealed, c.oscore_command, c.oscore_pending_kid AS pending_kid,"
        " c.oscore_pending_sender_id AS pending_sender_id,"
        " c.oscore_pending_sealed AS pending_sealed, c.oscore_pending_command,"
        " (SELECT state FROM commands WHERE command_id = c.oscore_pending_command)"
        " AS pending_state"
        " FROM device_credentials c JOIN meters m USING (meter_id)"
        " WHERE c.meter_id = $1 AND c.oscore_kid IS NOT NULL AND m.removed_at IS NULL",
        meter_id,
    )
    if row is None:
        return Staged(rollable=False)
    if row["pending_kid"] is not None and (
        row["oscore_pending_command"] == command_id or row["pending_state"] in _OPEN
    ):
        return Staged(True, _secret(key, row, "pending_", pending=True))
    if row["oscore_command"] == command_id:  # confirmed already (its answer was lost)
        return Staged(True, _secret(key, row, "oscore_", pending=False))
    return Staged(rollable=True)


async def stage(
    conn: asyncpg.Connection,
    key: bytes,
    meter_id: int,
    *,
    kid: bytes,
    sender_id: bytes,
    master_secret: bytes,
    master_salt: bytes,
    derived: tuple[bytes, bytes, bytes] | None,
    command_id: int,
) -> bool:
    """Stage a new context for `meter_id` beside its current one, by rotate_key
    `command_id`; False when the meter has no current context, or an open rotate_key's
    pending context is there (ask `staged_for` again). `kid` must be free (see
    `storage.credentials.oscore_kid_taken`; the unique constraint holds it)."""
    blob = oscore_blob(master_secret, master_salt, derived)
    done = await conn.execute(
        "UPDATE device_credentials c SET oscore_pending_kid = $2,"
        " oscore_pending_sender_id = $3, oscore_pending_sealed = $4, oscore_pending_at = now(),"
        " oscore_pending_command = $5 WHERE c.meter_id = $1 AND c.oscore_kid IS NOT NULL"
        " AND (c.oscore_pending_kid IS NULL OR NOT EXISTS (SELECT 1 FROM commands"
        " WHERE command_id = c.oscore_pending_command AND state = ANY($6::text[])))",
        meter_id,
        kid,
        sender_id,
        seal(key, blob, meter_id),
        command_id,
        list(_OPEN),
    )
    return done.split()[-1] == "1"


_PROMOTE = (
    "UPDATE device_credentials SET oscore_kid = oscore_pending_kid,"
    " oscore_sender_id = oscore_pending_sender_id, oscore_sealed = oscore_pending_sealed,"
    " oscore_command = oscore_pending_command, oscore_replay_index = NULL,"
    " oscore_replay_bits = NULL, oscore_server_seq = 0, oscore_pending_kid = NULL,"
    " oscore_pending_sender_id = NULL, oscore_pending_sealed = NULL,"
    " oscore_pending_at = NULL, oscore_pending_command = NULL, rotated_at = now()"
)


async def promote(conn: asyncpg.Connection, kids: Iterable[bytes]) -> list[int]:
    """The pending contexts of `kids` become their meters' current ones (a request verified
    under them); returns the meter ids promoted (a kid no longer pending is left alone)."""
    rows = await conn.fetch(
        f"{_PROMOTE} WHERE oscore_pending_kid = ANY($1::bytea[]) RETURNING meter_id",
        sorted(set(kids)),
    )
    return [int(r[0]) for r in rows]


async def promote_acknowledged(
    conn: asyncpg.Connection, meter_id: int, command_ids: Sequence[int]
) -> bool:
    """Promote `meter_id`'s pending context if the rotate_key command that staged it is
    among `command_ids` and acknowledged (the device confirmed it by answering)."""
    done = await conn.execute(
        f"{_PROMOTE} WHERE meter_id = $1 AND oscore_pending_kid IS NOT NULL"
        " AND oscore_pending_command = ANY($2::bigint[]) AND EXISTS ("
        " SELECT 1 FROM commands WHERE command_id = oscore_pending_command"
        " AND kind = 'rotate_key' AND state = 'acknowledged')",
        meter_id,
        list(command_ids),
    )
    return done.split()[-1] == "1"
