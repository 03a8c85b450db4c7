"""The meters that may have a pending command, as this collector knows them: whose window
needs a claim.

Every window claims the meter's pending commands (`collector.downlink`), and almost
always there are none: in bench/cityday.py's city day those empty claims were ~3 % of
the collector's CPU, and more of the database's. `PendingView.may_have(meter_id)` is
False only for a meter that certainly has nothing to claim, and its window skips the
claim (counted in `nbmeter_collector_command_claims_skipped_total`).

The view is a set of meter ids, live only while all three hold:
- the listener LISTENs on `storage.pending_commands.CHANNEL` (migration 0055 announces a
  meter when a command of its becomes pending, at commit);
- a full load (`storage.pending_commands.meters`) begun after it started listening has
  completed: a command committed before the load's snapshot is in the load, one
  committed after it is announced (notifications that arrive during the load are added
  to what it returns);
- the set holds at most `cap` meters (fleet-wide jobs can queue commands to millions).
Otherwise `may_have` is True for every meter: every window claims, as without the view.
It is loaded again every `reload_every_s` (how long a meter whose commands have all been
answered, expired or cancelled stays in the set), after every reconnect (notifications
sent while away were missed), and after a notification that cannot be read. A failed
load is retried after `retry_s`; until a later one completes, a view that was live stays
live (the listener kept it current) and one that was not stays not.

What the view can delay, never lose: a command whose notification arrives after its
meter's window was checked goes out in the meter's next window, as one that commits a
moment after the claim does; so does one committed while a dead listener connection is
still taken for alive (at most twice `check_every_s`), whose meter the reload after the
reconnect brings back. A meter stays in the set while its command is `sent` and not
answered: the command goes out again in every window, as the mailbox's rules say.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Final

import structlog

from collector import metrics
from storage import pending_commands
from storage.errors import StorageError
from storage.notify import STOPPED
from storage.pool import Pool, connection

log = structlog.get_logger("collector.pending")

# ~65 MB of Python set at the cap; beyond it every window claims (3 % CPU) until it shrinks
CAP: Final = 1_000_000
RELOAD_EVERY_S: Final = 60.0
RETRY_S: Final = 5.0
CHECK_EVERY_S: Final = 2.0  # the listener's heartbeat: a dead connection found within 2x


class PendingView:
    """The meters that may have a pending command (see the module docstring)."""

    def __init__(
        self,
        pool: Pool,
        dsn: str,
        *,
        cap: int = CAP,
        reload_every_s: float = RELOAD_EVERY_S,
        retry_s: float = RETRY_S,
        check_every_s: float = CHECK_EVERY_S,
    ) -> None:
        """A view of the database at `dsn` (its own LISTEN connection), loaded on `pool`;
        not live until `run()` has listened and loaded."""
        self._pool = pool
        self._dsn = dsn
        self._cap = cap
        self._reload_every_s = reload_every_s
        self._retry_s = retry_s
        self._check_every_s = check_every_s
        self._meters: set[int] | None = None  # None: not live, every window claims
        self._listening = False
        # bumped whenever the view stops being current: a load begun before cannot make
        # it live (its snapshot may miss what the lost notifications said)
        self._epoch = 0
        self._noted: set[int] | None = None  # notified while a load runs
        self._wake = asyncio.Event()
        self._failed = False  # the last load failed: retry after retry_s
        self._over_cap = False  # said once, not at every load
        metrics.PENDING_VIEW_LIVE.set(0)

    @property
    def live(self) -> bool:
        """True while windows of meters outside the set skip their claim."""
        return self._meters is not None

    def may_have(self, meter_id: int) -> bool:
        """False only when meter `meter_id` certainly has no pending command."""
        meters = self._meters
        return meters is None or meter_id in meters

    async def run(self) -> None:
        """Listen and load until cancelled (a task's body)."""
        async with asyncio.TaskGroup() as group:
            group.create_task(
                pending_commands.listen(
                    self._dsn, self._notified, self._state, check_every_s=self._check_every_s
                ),
                name="pending-listen",
            )
            group.create_task(self._reload_forever(), name="pending-reload")

    # -- the listener's callbacks (on the event loop) --------------------------------------

    def _state(self, up: bool, why: str | None) -> None:
        if up:
            self._listening = True
            self._epoch += 1  # the load that follows is this session's
            self._wake.set()
            return
        if self._listening and why != STOPPED:
            log.warning("pending_view.listener_lost", error=why)
        self._listening = False
        self._drop()

    def _notified(self, meters: list[int] | None) -> None:
        if meters is None:  # someone else's payload, or a bug: what did it leave out?
            log.warning("pending_view.notification_unreadable")
            self._drop()
            self._wake.set()
            return
        if self._noted is not None:
            self._noted.update(meters)
        if self._meters is not None:
            self._meters.update(meters)
            if len(self._meters) > self._cap:
                self._too_many()
            else:
                metrics.PENDING_VIEW_METERS.set(len(self._meters))

    def _too_many(self) -> None:
        if not self._over_cap:
            log.warning("pending_view.over_cap", cap=self._cap)
        self._over_cap = True
        self._drop()

    def _drop(self) -> None:
        """Every window claims from now on, until a load begun after this completes."""
        self._epoch += 1
        self._meters = None
        metrics.PENDING_VIEW_LIVE.set(0)
        metrics.PENDING_VIEW_METERS.set(0)

    # -- loading -----------------------------------------------------------------------------

    async def _reload_forever(self) -> None:
        while True:
            wait_s = self._retry_s if self._failed else self._reload_every_s
            with contextlib.suppress(TimeoutError):  # woken early, or the period is up
                await asyncio.wait_for(self._wake.wait(), wait_s)
            self._wake.clear()
            if self._listening:
                await self._load()

    async def _load(self) -> None:
        """Load the set; make it the view if nothing was missed meanwhile."""
        epoch = self._epoch
        noted: set[int] = set()
        self._noted = noted
        try:
            async with connection(self._pool, "loading pending commands", timeout_s=5.0) as conn:
                loaded = await pending_commands.meters(conn, self._cap)
        except StorageError as exc:
            self._failed = True
            log.warning("pending_view.load_failed", error=str(exc), live=self.live)
            return
        finally:
            self._noted = None
        self._failed = False
        if epoch != self._epoch:  # lost, or unreadable, meanwhile: the next load decides
            return
        was_live = self.live
        meters = None if loaded is None else noted.union(loaded)
        if meters is None or len(meters) > self._cap:
            self._too_many()
            return
        self._over_cap = False
        self._meters = meters
        metrics.PENDING_VIEW_LIVE.set(1)
        metrics.PENDING_VIEW_METERS.set(len(meters))
        if not was_live:
            log.info("pending_view.loaded", meters=len(meters))
