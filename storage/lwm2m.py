"""LwM2M 1.1 registrations (migration 0046): Register, Update, De-register, look-ups.

The collector's Registration interface (`collector.lwm2m`) calls these. A registration
belongs to one meter; an endpoint name is that meter's address. Rules:

- `lab_meter(endpoint, slug)`: a plain CoAP client (lab tenants only) is the active meter
  whose address is the endpoint name, in a tenant that allows plain CoAP (`slug` narrows
  it to one tenant; an endpoint found in two lab tenants without a slug is refused);
- `register` closes the meter's open registration (reason `replaced`) and opens a new
  one with a random id; `update` refreshes an open, unexpired one (the caller passes
  the meter it authenticated, or None for plain CoAP, where the id is the capability);
- `deregister` closes it (reason `deregistered`); a registration past `expires_at` is
  ignored by every look-up (the client missed its lifetime and must register again).

Errors: storage errors from the database; `NoRegistrationError` (a StorageError) when an
update or de-register names no open, unexpired registration of that meter.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from storage.errors import StorageError
from storage.pool import translating

_COLUMNS = (
    "registration_id, tenant_id, meter_id, endpoint, lwm2m_version, lifetime_s, binding,"
    " queue_mode, peer, transport, objects, registered_at, updated_at, expires_at,"
    " deregistered_at, reason"
)


class NoRegistrationError(StorageError):
    """No open, unexpired registration with that id (of that meter)."""


@dataclass(frozen=True)
class Registration:
    """One registration row."""

    registration_id: str
    tenant_id: int
    meter_id: int
    endpoint: str
    lwm2m_version: str
    lifetime_s: int
    binding: str
    queue_mode: bool
    peer: str
    transport: int
    objects: str
    registered_at: datetime
    updated_at: datetime
    expires_at: datetime
    deregistered_at: datetime | None
    reason: str | None


@dataclass(frozen=True)
class LabMeter:
    """A meter a plain CoAP client may register as."""

    meter_id: int
    tenant_id: int
    address: str


@translating("finding a lab meter")
async def lab_meter(
    conn: asyncpg.Connection | asyncpg.Pool, endpoint: str, slug: str | None
) -> LabMeter | None:
    """The active meter named `endpoint` in a plain-CoAP tenant (`slug`, if given); None
    when there is none, or more than one without a slug."""
    rows = await conn.fetch(
        "SELECT m.meter_id, m.tenant_id, m.address FROM meters m JOIN tenants t USING (tenant_id)"
        " WHERE t.allow_plain_coap AND m.address = $1 AND m.removed_at IS NULL"
        " AND ($2::text IS NULL OR t.slug = $2) LIMIT 2",
        endpoint,
        slug,
    )
    if len(rows) != 1:
        return None
    return LabMeter(int(rows[0][0]), int(rows[0][1]), str(rows[0][2]))


@translating("registering an LwM2M client")
async def register(  # a registration's own fields, all keyword-only
    conn: asyncpg.Connection,
    *,
    tenant_id: int,
    meter_id: int,
    endpoint: str,
    lwm2m_version: str,
    lifetime_s: int,
    binding: str,
    queue_mode: bool,
    peer: str,
    transport: int,
    objects: str,
) -> Registration:
    """Open a registration for the meter (closing its open one); the new row."""
    async with conn.transaction():
        await conn.execute(
            "UPDATE lwm2m_registrations SET deregistered_at = now(), reason = 'replaced'"
            " WHERE meter_id = $1 AND deregistered_at IS NULL",
            meter_id,
        )
        row = await conn.fetchrow(
            "INSERT INTO lwm2m_registrations (registration_id, tenant_id, meter_id, endpoint,"
            " lwm2m_version, lifetime_s, binding, queue_mode, peer, transport, objects,"
            " expires_at) VALUES ($1, $2, $3, $4, $5, $6::integer, $7, $8, $9, $10, $11,"
            f" now() + make_interval(secs => $6::integer)) RETURNING {_COLUMNS}",
            secrets.token_hex(8),
            tenant_id,
            meter_id,
            endpoint,
            lwm2m_version,
            lifetime_s,
            binding,
            queue_mode,
            peer,
            transport,
            objects,
        )
    assert row is not None
    return Registration(**dict(row))


@translating("updating an LwM2M registration")
async def update(  # what an Update may change, all keyword-only
    conn: asyncpg.Connection | asyncpg.Pool,
    registration_id: str,
    *,
    meter_id: int | None,
    peer: str,
    lifetime_s: int | None = None,
    binding: str | None = None,
    queue_mode: bool | None = None,
    objects: str | None = None,
) -> Registration:
    """Refresh an open, unexpired registration (of `meter_id`, if given) from `peer`;
    NoRegistrationError if there is none. A new lifetime restarts the expiry."""
    row = await conn.fetchrow(
        "UPDATE lwm2m_registrations SET peer = $3, updated_at = now(),"
        " lifetime_s = coalesce($4::integer, lifetime_s), binding = coalesce($5, binding),"
        " queue_mode = coalesce($6, queue_mode), objects = coalesce($7, objects),"
        " expires_at = now() + make_interval(secs => coalesce($4::integer, lifetime_s))"
        " WHERE registration_id = $1 AND ($2::bigint IS NULL OR meter_id = $2)"
        " AND deregistered_at IS NULL AND expires_at > now()"
        f" RETURNING {_COLUMNS}",
        registration_id,
        meter_id,
        peer,
        lifetime_s,
        binding,
        queue_mode,
        objects,
    )
    if row is None:
        msg = f"no open registration {registration_id!r}"
        raise NoRegistrationError(msg)
    return Registration(**dict(row))


@translating("de-registering an LwM2M client")
async def deregister(
    conn: asyncpg.Connection | asyncpg.Pool, registration_id: str, *, meter_id: int | None
) -> Registration:
    """Close an open, unexpired registration (of `meter_id`, if given); NoRegistrationError."""
    row = await conn.fetchrow(
        "UPDATE lwm2m_registrations SET deregistered_at = now(), reason = 'deregistered'"
        " WHERE registration_id = $1 AND ($2::bigint IS NULL OR meter_id = $2)"
        " AND deregistered_at IS NULL AND expires_at > now()"
        f" RETURNING {_COLUMNS}",
        registration_id,
        meter_id,
    )
    if row is None:
        msg = f"no open registration {registration_id!r}"
        raise NoRegistrationError(msg)
    return Registration(**dict(row))


@translating("finding an LwM2M registration")
async def current(
    conn: asyncpg.Connection | asyncpg.Pool, *, meter_id: int | None = None, peer: str = ""
) -> Registration | None:
    """The open, unexpired registration of `meter_id`, or else the latest one from `peer`."""
    row = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM lwm2m_registrations"
        " WHERE deregistered_at IS NULL AND expires_at > now()"
        " AND (meter_id = $1 OR ($1::bigint IS NULL AND peer = $2))"
        " ORDER BY updated_at DESC LIMIT 1",
        meter_id,
        peer,
    )
    return None if row is None else Registration(**dict(row))
