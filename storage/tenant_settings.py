"""A tenant's own settings (its tenants row) as its utility manages them, with an audit trail.

SETTINGS names what may change. `update` applies the given values in one transaction and
records every value that really changed (who, when, old, new) in tenant_settings_changes
(migration 0032). The slug is not a setting: it names the tenant in every device's MQTT
topic and broker account. Errors: InvalidTimezoneError (storage.apikeys) for a zone this
host does not know.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

import asyncpg

from storage.apikeys import check_timezone
from storage.pool import translating

Conn = asyncpg.Connection | asyncpg.Pool

# name: shown to people; timezone: billing cycles and interval reads in local time (a
# change moves the boundaries of cycles not published yet); allow_plain_coap: lab use,
# CoAP uplinks without OSCORE
SETTINGS: Final = ("name", "timezone", "allow_plain_coap")
_COLUMNS = "tenant_id, slug, name, timezone, allow_plain_coap, created_at"


@translating("reading the tenant's settings")
async def get(conn: Conn, tenant_id: int) -> asyncpg.Record | None:
    """The tenant's row (tenant_id, slug, settings, created_at), or None."""
    return await conn.fetchrow(f"SELECT {_COLUMNS} FROM tenants WHERE tenant_id = $1", tenant_id)


@translating("updating the tenant's settings")
async def update(
    conn: asyncpg.Connection, tenant_id: int, values: Mapping[str, Any], changed_by: str
) -> asyncpg.Record | None:
    """Apply `values` (keys in SETTINGS) and audit each change; the new row, or None."""
    unknown = sorted(set(values) - set(SETTINGS))
    if unknown:
        msg = f"not tenant settings: {unknown}; settable: {list(SETTINGS)}"
        raise ValueError(msg)
    if values.get("timezone") is not None:
        check_timezone(values["timezone"])
    async with conn.transaction():
        old = await conn.fetchrow(
            f"SELECT {_COLUMNS} FROM tenants WHERE tenant_id = $1 FOR UPDATE", tenant_id
        )
        if old is None:
            return None
        changed = {k: v for k, v in values.items() if old[k] != v}
        if not changed:
            return old
        names = list(changed)
        sets = ", ".join(f"{k} = ${i}" for i, k in enumerate(names, start=2))
        new = await conn.fetchrow(
            f"UPDATE tenants SET {sets} WHERE tenant_id = $1 RETURNING {_COLUMNS}",
            tenant_id,
            *(changed[k] for k in names),
        )
        assert new is not None  # the row was read above in this transaction: UPDATE finds it
        await conn.executemany(
            "INSERT INTO tenant_settings_changes (tenant_id, changed_by, field, old_value,"
            " new_value) VALUES ($1, $2, $3, $4::jsonb, $5::jsonb)",
            [(tenant_id, changed_by, k, json.dumps(old[k]), json.dumps(new[k])) for k in names],
        )
    return new


@translating("listing the tenant's settings changes")
async def changes(conn: Conn, tenant_id: int, *, limit: int = 100) -> list[asyncpg.Record]:
    """The tenant's latest setting changes, newest first (old and new values as JSON text)."""
    return await conn.fetch(
        "SELECT change_id, changed_at, changed_by, field, old_value::text AS old_value,"
        " new_value::text AS new_value FROM tenant_settings_changes WHERE tenant_id = $1"
        f" ORDER BY change_id DESC LIMIT {int(limit)}",
        tenant_id,
    )
