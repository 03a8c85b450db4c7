"""What an unauthenticated sender may cost the CoAP server: bounded Block1 state, bounded logs.

`Block1Budget` replaces aiocoap's Block1 spool (one assembly per transfer, kept 93 s,
unbounded). A transfer's state is kept at most `lifetime_s`; at most `per_source`
transfers per source address and `max_transfers` / `max_bytes` in total; when a new
transfer would exceed a bound, the oldest transfer (of that source, else of all) is
evicted. A block that continues an evicted or expired transfer gets 4.08 Request Entity
Incomplete (RFC 7959 §2.9.2), after which the device starts the transfer again.

`EventLimiter` counts every rejection by kind (metric `nbmeter_collector_coap_rejected_total`)
and logs at most `per_window` events of a kind per `window_s`, then one
`coap.logs_suppressed` line with how many it held back, so an attack cannot grow the
logs faster than a few lines per kind and window. `LogRateFilter` does the same for
library log records (aiocoap logs each unparsable datagram).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import aiocoap
import structlog
from aiocoap.blockwise import ContinueException, IncompleteException, _extract_block_key

from collector import metrics

log = structlog.get_logger("collector.coap")


def source_of(remote: Any) -> str:
    """The sender's address without its port (a flood may use every port)."""
    inner = getattr(remote, "underlying_address", remote)
    sockaddr = getattr(inner, "sockaddr", None)
    return str(sockaddr[0]) if sockaddr is not None else str(getattr(inner, "hostinfo", "?"))


@dataclass(slots=True)
class _Transfer:
    message: aiocoap.Message
    source: str
    expires_at: float
    size: int = 0


@dataclass
class Block1Budget:
    """A bounded Block1 reassembly spool (see the module docstring)."""

    max_transfers: int = 1024
    per_source: int = 4
    max_bytes: int = 2 * 1024 * 1024
    lifetime_s: float = 30.0
    _transfers: OrderedDict[Any, _Transfer] = field(default_factory=OrderedDict)
    _by_source: dict[str, int] = field(default_factory=dict)
    _bytes: int = 0

    def feed_and_take(self, req: aiocoap.Message) -> aiocoap.Message:
        """The whole request once its last block is in; ContinueException before that.

        IncompleteException (4.08) for a block of a transfer we do not hold.
        """
        block1 = req.opt.block1
        if block1 is None:
            return req
        now = time.monotonic()
        self._expire(now)
        key = _extract_block_key(req)
        if block1.block_number == 0:
            self._drop(key)
            source = source_of(req.remote)
            self._make_room(source, len(req.payload))
            self._transfers[key] = _Transfer(req, source, now + self.lifetime_s, len(req.payload))
            self._by_source[source] = self._by_source.get(source, 0) + 1
            self._bytes += len(req.payload)
            metrics.BLOCK1_TRANSFERS.set(len(self._transfers))
        else:
            held = self._transfers.get(key)
            if held is None:
                raise IncompleteException
            try:
                held.message._append_request_block(req)
            except ValueError:  # a gap or an overlap: start again
                self._drop(key)
                raise IncompleteException from None
            piv = getattr(req, "nbm_piv", None)
            if piv is not None:  # the last block's sequence number gets the answer
                held.message.nbm_piv = piv
            self._bytes += len(req.payload)
            held.size += len(req.payload)
            while self._bytes > self.max_bytes and len(self._transfers) > 1:
                self._evict_oldest(None, keep=key)
        if block1.more:
            raise ContinueException(block1)
        done = self._transfers[key].message
        self._drop(key)
        return done

    def _make_room(self, source: str, size: int) -> None:
        if self._by_source.get(source, 0) >= self.per_source:
            self._evict_oldest(source)
        while self._transfers and (
            len(self._transfers) >= self.max_transfers or self._bytes + size > self.max_bytes
        ):
            self._evict_oldest(None)

    def _evict_oldest(self, source: str | None, keep: Any = None) -> None:
        for key, transfer in self._transfers.items():
            if key != keep and (source is None or transfer.source == source):
                self._drop(key)
                metrics.BLOCK1_EVICTED.inc()
                return

    def _expire(self, now: float) -> None:
        while self._transfers:
            key, oldest = next(iter(self._transfers.items()))
            if oldest.expires_at > now:
                break
            self._drop(key)

    def _drop(self, key: Any) -> None:
        transfer = self._transfers.pop(key, None)
        if transfer is None:
            return
        self._bytes -= transfer.size
        left = self._by_source[transfer.source] - 1
        if left:
            self._by_source[transfer.source] = left
        else:
            del self._by_source[transfer.source]
        metrics.BLOCK1_TRANSFERS.set(len(self._transfers))


class EventLimiter:
    """Counted, rate-limited warning events (see the module docstring)."""

    def __init__(self, window_s: float = 10.0, per_window: int = 5) -> None:
        """Log at most `per_window` events of a kind per `window_s`."""
        self._window_s = window_s
        self._per_window = per_window
        self._windows: dict[str, list[float | int]] = {}  # kind -> [start, logged, held]

    def note(self, kind: str, *, exc_info: BaseException | None = None, **fields: Any) -> None:
        """Count one `kind` event; log it unless this window's allowance is spent."""
        metrics.COAP_REJECTED.labels(kind).inc()
        now = time.monotonic()
        window = self._windows.get(kind)
        if window is None or now - window[0] >= self._window_s:
            if window is not None and window[2]:
                log.warning("coap.logs_suppressed", kind=kind, count=int(window[2]))
            window = self._windows[kind] = [now, 0, 0]
        if window[1] >= self._per_window:
            window[2] += 1
            metrics.LOGS_SUPPRESSED.labels(kind).inc()
            return
        window[1] += 1
        if exc_info is not None:
            log.error(kind, exc_info=exc_info, **fields)
        else:
            log.warning(kind, **fields)


class LogRateFilter(logging.Filter):
    """A stdlib log filter: at most `per_window` records per (logger, message) per window."""

    def __init__(self, prefix: str = "", window_s: float = 10.0, per_window: int = 5):
        """Limit records of loggers named `prefix`*; others pass untouched."""
        super().__init__()
        self._prefix = prefix
        self._window_s = window_s
        self._per_window = per_window
        self._windows: dict[tuple[str, str], list[float]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        """True to emit `record`."""
        if not record.name.startswith(self._prefix):
            return True
        key = (record.name, str(record.msg))
        now = time.monotonic()
        window = self._windows.get(key)
        if window is None or now - window[0] >= self._window_s:
            if len(self._windows) > 1000:  # message texts are the library's, but bound anyway
                self._windows.clear()
            window = self._windows[key] = [now, 0]
        window[1] += 1
        if window[1] > self._per_window:
            metrics.LOGS_SUPPRESSED.labels("library").inc()
            return False
        return True
