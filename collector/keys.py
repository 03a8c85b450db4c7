"""OMS / wireless M-Bus AES keys of a batch's meters, for `decoder.decode_batch(keys=...)`.

`MeterKeys` caches, per process, (tenant_id, address) -> the meter's AES-128 key or None
(no key) for `ttl_s`, bounded to `max_entries`; `get(conn, pairs)` answers from the cache
and loads every uncached pair in one query (`storage.credentials.sealed_aes_keys`), so a
batch costs at most one round trip and a warm batch none. A key that does not open with
the credentials key is logged (meter id only) and treated as absent: its meter's frames
quarantine as "no key" rather than failing the batch.

`KeyRing` is the mapping handed to the decoder: it remembers which meter ids the decoder
asked for and did not find, so a frame of a meter not known in advance (plain CoAP: the
tenant is known, the meter only once decoded) can be retried with keys loaded for it.
Keys are never logged; `KeyRing`'s repr shows meter ids only.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import structlog

from storage import credentials
from storage.pool import Connection

log = structlog.get_logger("collector.keys")

Pair = tuple[int, str]  # (tenant_id, address as the meter reports it)


class KeyRing(dict[str, bytes]):
    """Meter id -> AES key for one decode call; records the ids asked for and missing."""

    def __init__(self, keys: dict[str, bytes] | None = None) -> None:
        """Start with `keys` and no recorded misses."""
        super().__init__(keys or {})
        self.missed: set[str] = set()
        self.asked: set[str] = set()  # every meter id looked up (key rollover: the pending)

    def get(self, meter_id: str, default: bytes | None = None) -> bytes | None:  # type: ignore[override]  # str keys only
        """The key of `meter_id`, recording a miss (the decoder's lookup)."""
        found = super().get(meter_id)
        if meter_id != "*":
            self.asked.add(meter_id)
        if found is None:
            if meter_id != "*":  # the decoder's wildcard fallback, not a meter
                self.missed.add(meter_id)
            return default
        return found

    def __bool__(self) -> bool:
        """Always true: an empty ring must still be consulted, so misses are recorded."""
        return True

    def __repr__(self) -> str:
        """Meter ids only, never key bytes."""
        return f"KeyRing(meters={sorted(self)!r}, missed={sorted(self.missed)!r})"


class MeterKeys:
    """Cache of meters' AES keys (and of their absence), loaded in bulk."""

    def __init__(
        self, credentials_key: bytes | None, *, ttl_s: float = 300.0, max_entries: int = 500_000
    ) -> None:
        """Open sealed keys with `credentials_key` (None: no keys at all)."""
        self._key = credentials_key
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._cache: dict[Pair, tuple[bytes | None, float]] = {}

    async def get(
        self, conn: Connection, pairs: Iterable[Pair], *, fresh: bool = False
    ) -> dict[Pair, bytes | None]:
        """Key (or None) of every pair; uncached ones (all, if `fresh`) in one query."""
        out: dict[Pair, bytes | None] = {}
        if self._key is None:
            return dict.fromkeys(pairs)
        now = time.monotonic()
        todo: list[Pair] = []
        for pair in pairs:
            hit = None if fresh else self._cache.get(pair)
            if hit is not None and hit[1] > now:
                out[pair] = hit[0]
            else:
                todo.append(pair)
        if not todo:
            return out
        found = await credentials.sealed_aes_keys(conn, todo)
        if len(self._cache) + len(todo) > self._max_entries:
            self._cache.clear()  # simpler than LRU; a refill is one query per batch
        expires = now + self._ttl_s
        for pair in todo:
            aes = self._open(found.get(pair))
            self._cache[pair] = (aes, expires)
            out[pair] = aes
        return out

    def _open(self, sealed: tuple[int, bytes] | None) -> bytes | None:
        if sealed is None or self._key is None:
            return None
        try:
            return credentials.open_aes_key(self._key, *sealed)
        except credentials.CredentialsError:
            log.error("aes_key.unopenable", meter_id=sealed[0])
            return None

    async def pending(
        self, conn: Connection, pairs: Iterable[Pair]
    ) -> dict[Pair, tuple[int, bytes]]:
        """(meter_id, pending key) of the pairs with a key staged beside the current one
        (always from the database: asked only for frames the current key did not open)."""
        if self._key is None:
            return {}
        found = await credentials.sealed_pending_aes_keys(conn, pairs)
        out: dict[Pair, tuple[int, bytes]] = {}
        for pair, sealed in found.items():
            aes = self._open(sealed)
            if aes is not None:
                out[pair] = (sealed[0], aes)
        return out

    async def promote(self, conn: Connection, confirmed: dict[Pair, tuple[int, bytes]]) -> None:
        """The devices in `confirmed` sent under their pending key: it becomes current."""
        done = set(await credentials.promote_aes_keys(conn, [m for m, _ in confirmed.values()]))
        expires = time.monotonic() + self._ttl_s
        for pair, (meter_id, aes) in confirmed.items():
            if meter_id in done:
                self._cache[pair] = (aes, expires)
                log.info("aes_key.promoted", meter_id=meter_id)

    def forget(self) -> None:
        """Drop every cached entry (after keys were rotated)."""
        self._cache.clear()
