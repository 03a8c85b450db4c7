"""The compact-frame formats this process decodes with: per tenant, read from and added to
the database (storage.compact_formats, migration 0053).

A wM-Bus / OMS meter sends compact frames (EN 13757-3: signature, data CRC and values,
no DIF/VIF header) most of the time and a full frame now and then; a compact frame
decodes only through the header a full frame of its model taught. `CompactFormats`
holds what each tenant's full frames taught, and never lends one tenant's formats to
another's frames: every decode call that reads compact frames is one tenant's
(collector.store's rounds; one shared by several tenants learns and lends nothing).

- `view(conn, tenant)`: the `decoder.mbus_compact.DeferredCache` one decode call of the
  tenant uses: it reads with the tenant's formats (read from the database the first time
  the tenant is seen) and the vendor table, and keeps what the call's full frames teach
  apart, with the meters that taught it;
- `refresh(conn, tenant)`: after a compact frame found no format, the tenant's formats
  are read again (at most every `refresh_s`), in case another process learned it;
- `unheld(tenant, view)`: what the call learned that is new to the process; the caller
  keeps what meters whose uplink was stored taught: a frame refused after decoding
  teaches nothing;
- `persist(conn, tenant, formats)` in the batch's transaction, then `adopt(tenant,
  stored)` once it committed. Only a new format costs a write, never a frame.

A stored row whose signature is not the CRC-16 of its bytes (damaged) is not used, and
its key is not written again: its compact frames stay quarantined (logged
`compact_format.damaged`) until the row is deleted.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import structlog

from decoder.mbus_compact import DeferredCache, Key, SignatureCache
from decoder.mbus_link import crc16_en13757
from decoder.vendors.compact_formats import known_format
from storage import compact_formats
from storage.pool import Connection

log = structlog.get_logger("collector.compact")

# a tenant's formats are read again after a miss at most this often; a format another
# process learned is read by every process within it, so the second sweep
# (SWEEP_AGAIN_S after the format was learned) finds every frame refused meanwhile
REFRESH_S = 5.0
SWEEP_AGAIN_S = 60.0
# formats a tenant may hold: a fleet has a handful of models and layouts, so past this the
# full frames teaching new ones are noise or an attack (one authenticated meter sending
# ever new headers), which would grow memory, the table and its sweeps without end; their
# compact frames stay quarantined (unknown_compact) and can be re-decoded by hand later
MAX_FORMATS_PER_TENANT = 1000


def key_name(key: Key) -> str:
    """A format key as text: MAN/version/type/signature (hex, as SignatureCache.to_dict)."""
    return f"{key[0]}/{key[1]:02x}/{key[2]:02x}/{key[3]:04x}"


class CompactFormats:
    """Per tenant: (manufacturer, version, device type, signature) -> DIF/VIF header."""

    def __init__(
        self, *, refresh_s: float = REFRESH_S, max_formats: int = MAX_FORMATS_PER_TENANT
    ) -> None:
        """Nothing read yet; a tenant's formats are read when it is first decoded."""
        self._refresh_s = refresh_s
        self._max_formats = max_formats
        self._caches: dict[int, SignatureCache] = {}
        self._damaged: dict[int, set[Key]] = {}  # rows not used, nor written again
        self._read_at: dict[int, float] = {}

    async def view(self, conn: Connection, tenant: int | None) -> DeferredCache:
        """One decode call's cache for `tenant` (None: no tenant, the vendor table only)."""
        if tenant is None:
            return DeferredCache()
        cache = self._caches.get(tenant)
        if cache is None:
            cache = await self._read(conn, tenant)
        return DeferredCache(cache)

    async def refresh(self, conn: Connection, tenant: int | None) -> bool:
        """Read `tenant`'s formats again unless they were read within `refresh_s`; whether
        that brought a format this process did not hold."""
        if tenant is None or time.monotonic() - self._read_at.get(tenant, -1e9) < self._refresh_s:
            return False
        before = self._caches.get(tenant, SignatureCache()).to_dict()
        return (await self._read(conn, tenant)).to_dict() != before

    async def _read(self, conn: Connection, tenant: int) -> SignatureCache:
        self._read_at[tenant] = time.monotonic()
        entries: dict[Key, bytes] = {}
        damaged = self._damaged[tenant] = set()
        for key, fmt in (await compact_formats.load(conn, tenant)).items():
            if crc16_en13757(fmt) != key[3]:
                log.warning("compact_format.damaged", tenant_id=tenant, key=key_name(key))
                damaged.add(key)
                continue
            entries[key] = fmt
        cache = self._caches[tenant] = SignatureCache(entries)
        return cache

    def unheld(self, tenant: int | None, view: DeferredCache) -> dict[Key, bytes]:
        """What `view`'s call learned that `tenant` does not hold yet (nor the vendor table
        knows); the caller keeps those a trusted meter taught (`view.teachers`)."""
        if tenant is None or not view.teachers:
            return {}
        held = self._caches.get(tenant, SignatureCache())
        damaged = self._damaged.get(tenant, set())
        new = {
            key: fmt
            for key, fmt in view.learned.items()
            if key not in held and key not in damaged and known_format(key[0], key[3]) != fmt
        }
        room = self._max_formats - len(held)
        if len(new) > room:
            log.warning(
                "compact_format.limit_reached",
                tenant_id=tenant,
                held=len(held),
                refused=len(new) - max(room, 0),
                limit=self._max_formats,
            )
            new = dict(sorted(new.items())[: max(room, 0)])
        return new

    async def persist(
        self, conn: Connection, tenant: int, formats: Mapping[Key, bytes]
    ) -> dict[Key, bytes]:
        """Store `formats` (in the caller's transaction); the formats stored under their
        keys, for `adopt` once the transaction committed."""
        stored, added = await compact_formats.learn(conn, tenant, formats)
        for key in added:
            log.info("compact_format.learned", tenant_id=tenant, key=key_name(key))
        for key, fmt in stored.items():
            if fmt != formats[key]:  # a CRC-16 collision, or a damaged row: the first stays
                log.warning("compact_format.conflict", tenant_id=tenant, key=key_name(key))
        return stored

    def adopt(self, tenant: int, stored: Mapping[Key, bytes]) -> None:
        """Decode `tenant`'s frames with `stored` (committed) from now on."""
        cache = self._caches.get(tenant)
        if cache is None:  # never read: its first view reads them with the rest
            return
        for key, fmt in stored.items():
            if crc16_en13757(fmt) == key[3]:
                cache.learn(key[:3], fmt)
            else:
                self._damaged.setdefault(tenant, set()).add(key)
