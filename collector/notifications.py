"""Every notification of an observation, in order: what `collector.lwm2m` stores.

aiocoap's `async for note in request.observation` keeps only the latest notification
("observe is lossy"): right for a value one only displays, wrong for ours. Each
notification is an LwM2M meter's SenML pack of readings, acknowledged by the CoAP layer
on arrival, before it is stored; while one is being stored (slowly, with the database
away) the next ones would overwrite each other and all but the last would be lost.
`Notifications` queues them instead, up to `limit` waiting (a meter notifies every few
minutes at most: more is a flood, and those are dropped and counted); the observation's
end (cancelled, not observable any more, a transport error) ends the iteration after
the notifications before it.
"""
# aiocoap is untyped (as in collector.coap)

from __future__ import annotations

import asyncio
from typing import Any

from aiocoap import error


class Notifications:
    """An async iterator over every notification of `observation` (a ClientObservation)."""

    def __init__(self, observation: Any, limit: int = 64) -> None:
        """Register on `observation`; keep at most `limit` notifications waiting."""
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._limit = limit
        self._ended = False
        self.dropped = 0  # notifications past `limit`: a flood
        # aiocoap's own iterator registers the same way (its callbacks are deprecated for
        # applications only because the iterator exists)
        observation.register_callback(self._push, _suppress_deprecation=True)
        observation.register_errback(self._end, _suppress_deprecation=True)

    def _push(self, note: Any) -> None:
        if self._ended:
            return
        if self._queue.qsize() >= self._limit:
            self.dropped += 1
            return
        self._queue.put_nowait(note)

    def _end(self, exc: BaseException) -> None:
        if not self._ended:
            self._ended = True
            self._queue.put_nowait(exc)

    def __aiter__(self) -> Notifications:
        """Itself."""
        return self

    async def __anext__(self) -> Any:
        """The next notification; StopAsyncIteration once the observation ended cleanly
        (cancelled, or the resource is not observable any more); another error raised."""
        item = await self._queue.get()
        if isinstance(item, error.NotObservable | error.ObservationCancelled):
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item
