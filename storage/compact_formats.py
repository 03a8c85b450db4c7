"""Compact-frame formats learned per tenant (migration 0053), and the frames they unlock.

A compact frame (EN 13757-3, CI 79 / 7B / 73) decodes only through the DIF/VIF header a
full frame of its meter model sent (`decoder.mbus_compact`). The collector keeps, per
tenant, the headers its stored full frames taught, keyed by (manufacturer, version,
device type, signature):

- `load(conn, tenant_id)`: a tenant's formats;
- `learn(conn, tenant_id, formats)`, inside the batch's transaction, only when a format
  is new to the process: a key stored before keeps its first format (another one under
  the same key is a CRC-16 collision, and a compact frame read through the wrong one
  fails its data CRC); a new one NOTIFYs the collectors' re-decode loops;
- `sweep(conn, again_after_s=...)`: for each new format, queues a re-decode of the
  tenant's quarantined frames it was missing for (`unknown_compact` rows naming its
  model and signature, `storage.quarantine.request_all_matching`), once at once and
  once more `again_after_s` after it was learned (frames another collector refused
  before it had read the format). `refused_detail` is the quarantine detail of such a row.

Errors: database errors as storage errors (storage.pool.translating).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import asyncpg

from decoder.columns import ErrorCode
from decoder.mbus_compact import Key, not_learned
from storage import quarantine
from storage.pool import translating
from storage.reasons import Reason
from storage.redecode_queue import CHANNEL

REQUESTED_BY: Final = "collector:compact-format"  # who the sweep's jobs say asked

_KEY = "manufacturer, version, device_type, signature"


def refused_detail(key: Key) -> str:
    """The quarantine detail of a frame refused for want of format `key`.

    The collector writes an undecodable frame's detail as '<error code>: <message>'
    (collector.verdict), the message here being the decoder's `not_learned`."""
    return f"{ErrorCode.UNKNOWN_COMPACT.name.lower()}: {not_learned(key[:3], key[3])}"


@translating("reading learned compact-frame formats")
async def load(conn: asyncpg.Connection | asyncpg.Pool, tenant_id: int) -> dict[Key, bytes]:
    """The formats `tenant_id`'s full frames taught: key -> DIF/VIF header bytes."""
    rows = await conn.fetch(
        f"SELECT {_KEY}, format FROM compact_formats WHERE tenant_id = $1", tenant_id
    )
    return {(r[0], r[1], r[2], r[3]): bytes(r[4]) for r in rows}


@translating("storing learned compact-frame formats")
async def learn(
    conn: asyncpg.Connection, tenant_id: int, formats: Mapping[Key, bytes]
) -> tuple[dict[Key, bytes], list[Key]]:
    """Store `formats` of `tenant_id` where their key is new (in the caller's transaction).

    Returns the format stored under every given key (this one, or the one stored first)
    and the keys stored by this call; if there are any, the re-decode loops are woken
    (NOTIFY, delivered at commit) to sweep for the frames they decode.
    """
    keys = sorted(formats)  # one order for every writer: two batches never wait in a cycle
    new = await conn.fetch(
        f"INSERT INTO compact_formats (tenant_id, {_KEY}, format)"
        " SELECT $1, * FROM unnest($2::text[], $3::smallint[], $4::smallint[],"
        " $5::integer[], $6::bytea[])"
        " ON CONFLICT DO NOTHING RETURNING " + _KEY,
        tenant_id,
        [k[0] for k in keys],
        [k[1] for k in keys],
        [k[2] for k in keys],
        [k[3] for k in keys],
        [formats[k] for k in keys],
    )
    added = [(r[0], r[1], r[2], r[3]) for r in new]
    stored = dict(formats)
    if len(added) < len(keys):  # stored before (another process, or a collision)
        stored.update(await load(conn, tenant_id))
    if added:
        await conn.execute("SELECT pg_notify($1, 'compact_format')", CHANNEL)
    return {k: stored[k] for k in keys}, added


@dataclass(frozen=True, slots=True)
class Swept:
    """A format whose refused frames were queued: its tenant and key, the jobs made
    (none when no open row was refused for it) and how many rows they hold."""

    tenant_id: int
    key: Key
    job_ids: tuple[int, ...]
    n_items: int


@translating("queueing the frames learned compact formats decode")
async def sweep(conn: asyncpg.Connection, *, again_after_s: float, limit: int = 20) -> list[Swept]:
    """Queue re-decodes for up to `limit` formats due a sweep (see the module doc), each in
    one transaction with its `swept_at`; formats another process sweeps are skipped."""
    done: list[Swept] = []
    while len(done) < limit:
        async with conn.transaction():
            row = await conn.fetchrow(
                f"SELECT tenant_id, {_KEY} FROM compact_formats"
                " WHERE swept_at IS NULL OR (swept_at < learned_at + make_interval(secs => $1)"
                "  AND now() >= learned_at + make_interval(secs => $1))"
                " ORDER BY learned_at LIMIT 1 FOR UPDATE SKIP LOCKED",
                again_after_s,
            )
            if row is None:
                break
            tenant_id, key = row[0], (row[1], row[2], row[3], row[4])
            flt = quarantine.Filter(reason=Reason.UNDECODABLE, detail_prefix=refused_detail(key))
            jobs = await quarantine.request_all_matching(conn, tenant_id, flt, REQUESTED_BY)
            await conn.execute(
                "UPDATE compact_formats SET swept_at = now() WHERE tenant_id = $1"
                " AND manufacturer = $2 AND version = $3 AND device_type = $4 AND signature = $5",
                tenant_id,
                *key,
            )
        n = sum(j.n_items for j in jobs)
        done.append(Swept(tenant_id, key, tuple(j.job_id for j in jobs), n))
    return done
