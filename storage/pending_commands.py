"""Which meters may have a pending command (migration 0055): the whole set, and its news.

A collector claims a meter's pending commands in each of its windows (`storage.mailbox.
claim`), and almost always finds none. It keeps the meters that may have one instead
(`collector.pending`), from two sources:

- `meters(conn, limit)`: every meter with a command in a PENDING state, from one scan of
  the `commands_pending` index; None when there are more than `limit`;
- `listen(dsn, on_meters, on_state)`: CHANNEL's notifications (migration 0055: sent when a
  command becomes pending commits) as lists of meter ids, `on_meters(None)` for a payload
  that is not one. The loop, heartbeat and reconnects are `storage.notify.listen`'s.

Load the set only once listening (`on_state(True, None)`): a command committed before the
load's snapshot is in the set, one committed after it is announced to a connection that
was listening already. Nothing is announced when a command stops being pending: a meter
leaves the set at the next load.

Errors: database errors as storage errors (`storage.pool.translating`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import asyncpg

from storage import notify
from storage.command_states import PENDING
from storage.pool import translating

CHANNEL: Final = "nbmeter_pending_commands"  # payload: meter ids, comma-separated
APP_NAME: Final = "nbmeter-pending-commands"  # the listening connection in pg_stat_activity

# the states as literals, not a parameter: the planner proves the partial index's
# predicate (state IN ('queued', 'sent')) only from constants
_MEMBERS: Final = (
    "SELECT array_agg(meter_id) FROM (SELECT DISTINCT meter_id FROM commands"
    " WHERE state IN ({states}) LIMIT $1) AS m"
).format(states=", ".join(f"'{s}'" for s in sorted(PENDING)))


def parse(payload: str) -> list[int] | None:
    """The meter ids of a CHANNEL payload, or None when it is not a list of ids."""
    try:
        return [int(part) for part in payload.split(",")]
    except ValueError:
        return None


@translating("loading the meters with pending commands")
async def meters(conn: asyncpg.Connection | asyncpg.Pool, limit: int) -> list[int] | None:
    """The meters with a command in a PENDING state (expired ones not yet moved included),
    or None when there are more than `limit`."""
    found: list[int] | None = await conn.fetchval(_MEMBERS, limit + 1)
    if found is None:  # array_agg of no rows
        return []
    return None if len(found) > limit else found


async def listen(
    dsn: str,
    on_meters: Callable[[list[int] | None], None],
    on_state: Callable[[bool, str | None], None],
    *,
    check_every_s: float = 2.0,
    retry_max_s: float = 5.0,
) -> None:
    """Forever: LISTEN on CHANNEL over a connection of its own; cancel to stop.

    `on_meters(ids)` per notification (None: unreadable, so the set must be loaded again);
    `on_state` is `storage.notify.listen`'s (True once listening, again after each
    reconnect; False with why when notifications may be missed from then on). A dead
    connection is found within twice `check_every_s`.
    """
    await notify.listen(
        dsn,
        CHANNEL,
        lambda payload: on_meters(parse(payload)),
        on_state,
        app_name=APP_NAME,
        check_every_s=check_every_s,
        check_timeout_s=check_every_s,
        retry_max_s=retry_max_s,
    )
