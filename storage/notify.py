"""LISTEN/NOTIFY, one loop for every listener: `listen(dsn, channel, on_notify, on_state)`.

`listen` holds one dedicated connection (not a pool's: a pooled connection would be reset
under us, and UNLISTENed) and calls:

- `on_notify(payload)` for each notification on `channel`;
- `on_state(True, None)` once listening (again): anything sent while we were away was
  missed, so a cache drops its entries here and returns to its long TTL, a queue looks
  for work;
- `on_state(False, why)` when the connection cannot be opened, is closed (the server's
  termination, a restart) or stops answering: a heartbeat `SELECT 1` runs every
  `check_every_s` and must answer within `check_timeout_s`, so a connection that died
  silently (no FIN, a hung server) is found within their sum; `why` is `STOPPED` when
  the task is cancelled.

It runs until cancelled, reconnecting with a backoff that doubles from `retry_min_s` to
at most `retry_max_s` and starts again from `retry_min_s` once a connection listens. An
exception raised by a callback is logged (`notify_callback.failed`) and does not end the
loop: a bug in one consumer must not silence its notifications for the process's life.

Users: the OSCORE credentials (`listen_credentials`, CHANNEL, migration 0030),
`storage.apikeys.listen_key_changes` (migration 0031), the re-decode queue's
`storage.redecode_queue.listen` (migration 0032) and the collectors' pending-command view
(`storage.pending_commands.listen`, migration 0055).
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import asyncpg
import structlog

log = structlog.get_logger("storage.notify")

CHANNEL: Final = "nbmeter_credentials"
APP_NAME: Final = "nbmeter-credentials"  # the listening connection's name in pg_stat_activity
STOPPED: Final = "stopped"  # on_state's reason when the listening task is cancelled

OnNotify = Callable[[str], None]
OnState = Callable[[bool, str | None], None]

# what ends one connection's listening: the network, the server, a timed-out heartbeat
_LOST: Final = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


def _call(what: str, channel: str, fn: Callable[[], None]) -> None:
    """Run a callback; log its exception instead of letting it end the loop."""
    try:
        fn()
    except Exception:  # a consumer's bug: log it, keep listening
        log.exception("notify_callback.failed", callback=what, channel=channel)


async def listen(
    dsn: str,
    channel: str,
    on_notify: OnNotify,
    on_state: OnState,
    *,
    app_name: str,
    check_every_s: float = 1.0,
    check_timeout_s: float = 2.0,
    retry_min_s: float = 0.2,
    retry_max_s: float = 5.0,
) -> None:
    """LISTEN on `channel` until cancelled (see the module docstring); never returns.

    `app_name` names the connection in pg_stat_activity (so an operator, or a test, can
    find it). Raises nothing but CancelledError: any other error is a lost connection
    (an unexpected one is logged too) and is retried.
    """
    delay = retry_min_s
    listened = False

    def state(up: bool, why: str | None) -> None:
        nonlocal listened
        listened = listened or up
        on_state(up, why)

    try:
        while True:
            try:
                why = await _listen_once(
                    dsn, channel, on_notify, state, app_name, check_every_s, check_timeout_s
                )
            except _LOST as exc:
                why = f"{type(exc).__name__}: {exc}"
            except Exception as exc:  # the task's top level: a bug must not end listening
                log.exception("notify_listener.failed", channel=channel)
                why = f"unexpected {type(exc).__name__}: {exc}"
            _call("on_state", channel, functools.partial(on_state, False, why))
            if listened:  # it listened: this loss is a fresh start, not one more failure
                delay, listened = retry_min_s, False
            await asyncio.sleep(delay)
            delay = min(delay * 2, retry_max_s)
    except asyncio.CancelledError:
        _call("on_state", channel, functools.partial(on_state, False, STOPPED))
        raise


async def _listen_once(
    dsn: str,
    channel: str,
    on_notify: OnNotify,
    on_state: OnState,
    app_name: str,
    check_every_s: float,
    check_timeout_s: float,
) -> str:
    """Listen on one connection until it is lost; return why. Raises _LOST errors."""
    conn: asyncpg.Connection | None = None
    lost = asyncio.Event()

    def notified(_conn: object, _pid: int, _channel: str, payload: object) -> None:
        _call("on_notify", channel, functools.partial(on_notify, str(payload)))

    try:
        conn = await asyncpg.connect(
            dsn, timeout=check_timeout_s, server_settings={"application_name": app_name}
        )
        conn.add_termination_listener(lambda _conn: lost.set())
        await conn.add_listener(channel, notified)
        _call("on_state", channel, functools.partial(on_state, True, None))
        while not lost.is_set():
            try:
                await asyncio.wait_for(lost.wait(), check_every_s)
            except TimeoutError:
                # a silent network loss shows only when a query goes unanswered
                await conn.fetchval("SELECT 1", timeout=check_timeout_s)
        return "connection closed"
    finally:
        if conn is not None:
            conn.terminate()


# --- the OSCORE credentials' channel --------------------------------------------------------


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
    """`listen` on CHANNEL (migration 0030's triggers, sent when a provisioning, rotation,
    revocation or meter removal commits): `on_change(change)` per notification
    (`on_change(None)`: unreadable), `on_lost(why)` when notifications may have been
    missed (not when cancelled), `on_ready()` once listening (again)."""

    def state(up: bool, why: str | None) -> None:
        if up:
            on_ready()
        elif why != STOPPED:
            on_lost(why or "connection lost")

    await listen(
        dsn,
        CHANNEL,
        lambda payload: on_change(parse_change(payload)),
        state,
        app_name=APP_NAME,
        check_every_s=check_every_s,
        check_timeout_s=check_timeout_s,
        retry_max_s=retry_max_s,
    )
