"""The mailbox's state machine as data: which state a command may move to from which.

    queued -> sent | cancelled | expired
    sent   -> sent (delivered again, attempts + 1) | acknowledged | failed | expired
    expired -> acknowledged | failed   (only a command that was sent: the device's late
                                        answer is what happened, so it wins)

acknowledged, failed and cancelled are final. Every state change goes through
`storage.mailbox`, whose SQL takes the allowed source states from `sources()`; tests walk
every edge of TRANSITIONS.

A command that enters PENDING is announced to the collectors, whose pending view skips
the claim for every other meter (migration 0055): today only by INSERT, as no transition
leads back into PENDING; the migration's update trigger covers one that would.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

STATES: Final = ("queued", "sent", "acknowledged", "failed", "expired", "cancelled")
PENDING: Final = frozenset({"queued", "sent"})  # still to be delivered or answered
TRANSITIONS: Final[Mapping[str, frozenset[str]]] = {
    "queued": frozenset({"sent", "cancelled", "expired"}),
    "sent": frozenset({"sent", "acknowledged", "failed", "expired"}),
    "expired": frozenset({"acknowledged", "failed"}),
    "acknowledged": frozenset(),
    "failed": frozenset(),
    "cancelled": frozenset(),
}
SUPERSEDED_PREFIX: Final = "superseded_by="


def sources(new: str) -> list[str]:
    """The states from which a command may enter `new` (sorted); ValueError if none."""
    found = sorted(old for old, nexts in TRANSITIONS.items() if new in nexts)
    if not found:
        msg = f"no command state may move to {new!r}"
        raise ValueError(msg)
    return found


def may_move(old: str, new: str) -> bool:
    """True when a command in `old` may enter `new`."""
    return new in TRANSITIONS.get(old, frozenset())
