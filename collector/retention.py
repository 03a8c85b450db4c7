"""The collector's chunk upkeep: every `every_s`, drop the expired raw-archive and
quarantine chunks (storage.retention), then rebuild the indexes of closed readings chunks
packed (storage.compaction, on a connection of its own: REINDEX CONCURRENTLY runs outside
any transaction and may take minutes on a city's day). One collector at a time does each."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import structlog

from collector.settings import RetentionSettings
from storage import compaction, retention
from storage.errors import StorageError
from storage.pool import Pool, connection

log = structlog.get_logger("collector.retention")


async def run(pool: Pool, settings: RetentionSettings, database_url: str) -> None:
    """Drop expired chunks and compact closed ones now and every `settings.every_s` until
    cancelled."""
    if not settings.enabled:
        return
    policy = retention.Retention(settings.raw_uplinks_days, settings.quarantine_days)
    while True:
        try:
            async with connection(pool, "dropping expired chunks", timeout_s=10.0) as conn:
                dropped = await retention.drop_expired(conn, policy)
            if dropped is not None and any(dropped.values()):
                log.info("retention.dropped", **{t: len(c) for t, c in dropped.items()})
        except (StorageError, TimeoutError) as exc:  # the next round tries again
            log.warning("retention.failed", error=str(exc))
        if settings.compact:
            await _compact(database_url, timedelta(hours=settings.compact_after_h))
        await asyncio.sleep(settings.every_s)


async def _compact(database_url: str, after: timedelta) -> None:
    try:
        done = await compaction.compact_closed_at(database_url, after=after)
    except StorageError as exc:  # the next round tries again
        log.warning("compaction.failed", error=str(exc))
        return
    for c in done or ():
        log.info(
            "compaction.done",
            chunk=c.chunk,
            index_bytes_before=c.index_bytes_before,
            index_bytes_after=c.index_bytes_after,
        )
