"""DTLS-PSK credentials of devices (migration 0038): PSK identity -> sealed key -> meter.

`store_psk` seals a device's pre-shared key under the credentials key (meter id and
purpose `dtls-psk` as associated data) and records its identity; `load_psks` opens those
stored or rotated since an instant (all of them at first) for the collector's in-memory
table (the DTLS handshake asks for a key synchronously, inside the record layer, so it
cannot wait for a query); `revoke_psk` deletes one (announced by NOTIFY, migration 0038).
Errors: asyncpg's (callers translate them); `CredentialsError` from `unseal`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from storage.credentials import CredentialsError, MeterRef, seal, unseal

_PURPOSE = "dtls-psk"


@dataclass(frozen=True)
class Psk:
    """One device's opened DTLS-PSK credential and its meter."""

    identity: bytes
    key: bytes
    meter: MeterRef


async def store_psk(
    conn: asyncpg.Connection, key: bytes, meter: MeterRef, identity: str, psk: bytes
) -> None:
    """Store (or rotate) `meter`'s PSK identity and key (sealed under `key`)."""
    await conn.execute(
        "INSERT INTO dtls_credentials (meter_id, tenant_id, psk_identity, psk_sealed)"
        " VALUES ($1, $2, $3, $4) ON CONFLICT (meter_id) DO UPDATE SET"
        " psk_identity = EXCLUDED.psk_identity, psk_sealed = EXCLUDED.psk_sealed,"
        " rotated_at = now()",
        meter.meter_id,
        meter.tenant_id,
        identity,
        seal(key, psk, meter.meter_id, _PURPOSE),
    )


async def revoke_psk(conn: asyncpg.Connection, meter_id: int) -> bool:
    """Delete `meter_id`'s DTLS credential; True if it had one."""
    return bool(
        await conn.fetchval(
            "DELETE FROM dtls_credentials WHERE meter_id = $1 RETURNING true", meter_id
        )
    )


# a key stored by a transaction that began before a read but committed after it carries
# a rotated_at before that read: each read goes back this far to take it too
_OVERLAP = timedelta(minutes=2)


async def load_psks(
    conn: asyncpg.Connection, key: bytes, since: datetime | None = None
) -> tuple[list[Psk], list[int], datetime | None]:
    """The opened PSKs of active meters stored or rotated after `since` (None: all), the
    meters whose sealed key does not open, and the instant to pass as `since` next."""
    now = await conn.fetchval("SELECT now()")
    rows = await conn.fetch(
        "SELECT d.psk_identity, d.psk_sealed, m.meter_id, m.tenant_id, m.address, m.format"
        " FROM dtls_credentials d JOIN meters m USING (meter_id) WHERE m.removed_at IS NULL"
        " AND ($1::timestamptz IS NULL OR d.rotated_at > $1)",
        None if since is None else since - _OVERLAP,
    )
    out: list[Psk] = []
    broken: list[int] = []
    for r in rows:
        meter = MeterRef(
            int(r["meter_id"]), int(r["tenant_id"]), str(r["address"]), str(r["format"])
        )
        try:
            psk = unseal(key, bytes(r["psk_sealed"]), meter.meter_id, _PURPOSE)
        except CredentialsError:
            broken.append(meter.meter_id)
            continue
        out.append(Psk(str(r["psk_identity"]).encode(), psk, meter))
    return out, broken, now
