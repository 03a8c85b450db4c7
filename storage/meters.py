"""Meter addresses (as the meters report them) resolved to database meter ids, with a cache.

`MeterDirectory(pool).resolve(tenant_id, addresses)` returns an int64 array of meter ids,
-1 where the tenant has no active meter with that address (the writer then rejects the
row as `unknown_meter`). Found addresses are cached for `ttl_s`; misses are not cached,
so a meter registered a moment ago resolves on its next uplink. A meter exchange keeps
the old mapping until the entry expires or `forget(tenant_id)` is called.

Errors: StorageUnavailableError (retry), SchemaError, StorageError, via `translated`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import asyncpg
import numpy as np
import numpy.typing as npt

from storage.pool import translated

UNKNOWN = -1
_RESOLVE = (
    "SELECT address, meter_id FROM meters"
    " WHERE tenant_id = $1 AND removed_at IS NULL AND address = ANY($2::text[])"
)


class MeterDirectory:
    """Address → meter id per tenant, cached; one per process, safe to share between tasks."""

    def __init__(self, pool: asyncpg.Pool, *, ttl_s: float = 300.0, max_entries: int = 2_000_000):
        """Resolve through `pool`; keep found ids `ttl_s` seconds, at most `max_entries`."""
        self._pool = pool
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        # (tenant_id, address) -> (meter_id, monotonic expiry)
        self._cache: dict[tuple[int, str], tuple[int, float]] = {}

    async def resolve(
        self,
        tenant_id: int,
        addresses: Iterable[str] | npt.NDArray[np.object_],
        conn: asyncpg.Connection | None = None,
    ) -> npt.NDArray[np.int64]:
        """Meter ids of `addresses` for the tenant's active meters, -1 for unknown ones."""
        wanted = list(addresses)
        out = np.full(len(wanted), UNKNOWN, np.int64)
        now = time.monotonic()
        missing: dict[str, list[int]] = {}
        for i, address in enumerate(wanted):
            hit = self._cache.get((tenant_id, address))
            if hit is not None and hit[1] > now:
                out[i] = hit[0]
            else:
                missing.setdefault(address, []).append(i)
        if missing:
            with translated("resolving meter addresses"):
                if conn is None:
                    rows = await self._pool.fetch(_RESOLVE, tenant_id, list(missing))
                else:
                    rows = await conn.fetch(_RESOLVE, tenant_id, list(missing))
            if len(self._cache) + len(rows) > self._max_entries:
                self._cache.clear()  # simpler than LRU, and a refill is one query per batch
            expires = now + self._ttl_s
            for row in rows:
                self._cache[(tenant_id, row["address"])] = (row["meter_id"], expires)
                out[missing[row["address"]]] = row["meter_id"]
        return out

    def forget(self, tenant_id: int | None = None) -> None:
        """Drop cached entries of one tenant (after a meter exchange), or of all tenants."""
        if tenant_id is None:
            self._cache.clear()
            return
        for key in [k for k in self._cache if k[0] == tenant_id]:
            del self._cache[key]
