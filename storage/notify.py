"""LISTEN for credential changes: `listen_credentials(dsn, on_change, on_lost, on_ready)`.

Migration 0030's triggers send NOTIFY nbmeter_credentials in the transaction that
provisions, rotates or revokes a device's OSCORE context or removes its meter, so the
notification arrives when that transaction commits. `listen_credentials` holds one
dedicated connection (not a pool's: a pooled connection would be reset under us) and
calls:

- `on_change(CredentialChange)` for each notification;
- `on_lost()` when the connection is lost or stops answering (checked every
  `check_every_s`, each check bounded by `check_timeout_s`): notifications may have
  been missed, so the caller drops its caches and falls back to a short TTL;
- `on_ready()` once listening (again): the caller drops its caches once more (anything
  changed while we were away is read fresh) and returns to its long TTL.

It runs until cancelled, reconnecting with backoff (at most `retry_max_s`).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg

CHANNEL = "nbmeter_credentials"
APP_NAME = "nbmeter-credentials"  # the listening connection's name in pg_stat_activity


@dataclass(frozen=True, slots=True)
class CredentialChange:
    """One notification: the meter whose context changed and its old/new key ids."""

    meter_id: int
    kids: tuple[bytes, ...]


def parse_change(payload: str) -> CredentialChange | None:
    """The change a NOTIFY payload describes; None when it is not one of ours."""
    try:
        data = json.loads(payload)
        return CredentialChange(
            int(data["meter_id"]), tuple(bytes.fromhex(k) for k in data.get("kids") or ())
        )
    except (ValueError, KeyError, TypeError):
        return None


async def listen_credentials(
    dsn: str,
    on_change: Callable[[CredentialChange | None], None],
    on_lost: Callable[[str], None],
    on_ready: Callable[[], None],
    *,
    check_every_s: float = 1.0,
    check_timeout_s: float = 2.0,
    retry_max_s: float = 5.0,
) -> None:
    """Listen until cancelled (see the module docstring). `on_change(None)`: unreadable."""
    delay = 0.2
    while True:
        conn: asyncpg.Connection | None = None
        lost = asyncio.Event()
        try:
            conn = await asyncpg.connect(
                dsn, timeout=check_timeout_s, server_settings={"application_name": APP_NAME}
            )
            conn.add_termination_listener(lambda _c, ev=lost: ev.set())
            await conn.add_listener(
                CHANNEL, lambda _c, _p, _ch, payload: on_change(parse_change(payload))
            )
            on_ready()
            delay = 0.2
            while not lost.is_set():
                try:
                    await asyncio.wait_for(lost.wait(), check_every_s)
                except TimeoutError:
                    # a silent network loss shows only when a query goes unanswered
                    await conn.fetchval("SELECT 1", timeout=check_timeout_s)
            reason = "connection closed"
        except asyncio.CancelledError:
            if conn is not None:
                conn.terminate()
            raise
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
        if conn is not None:
            conn.terminate()
        on_lost(reason)
        await asyncio.sleep(delay)
        delay = min(delay * 2, retry_max_s)
