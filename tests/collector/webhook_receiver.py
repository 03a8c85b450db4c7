"""Webhook test kit: a real HTTP receiver (a threaded server on a free loopback port) and
an in-process dispatcher with fast retries.

The receiver records every request (event id, headers, body, the status it answered) and
answers by a script: `fail_first` requests get 500, requests while `hang_s` > 0 sleep first.
Signing secrets are sealed under `KEY` (the stack's credentials key, or a fresh one that
`KEY_TEXT` hands to a dispatcher process).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import asyncpg

from collector.settings import WebhookSettings
from collector.webhooks import Dispatcher
from storage.credentials import new_key, parse_key

KEY_TEXT = os.environ.get("NBMETER_CREDENTIALS_KEY") or new_key()
KEY = parse_key(KEY_TEXT)


@dataclass
class Received:
    """One request as the receiver saw it."""

    event_id: str
    headers: dict[str, str]
    body: bytes
    status: int
    at: float


@dataclass
class Receiver:
    """The server and what it saw; `url` is where to POST."""

    server: ThreadingHTTPServer
    fail_first: int = 0
    always_fail: bool = False
    hang_s: float = 0.0
    seen: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}/hook"

    def delivered(self) -> list[str]:
        """Event ids of the requests answered 2xx, in arrival order."""
        with self.lock:
            return [r.event_id for r in self.seen if r.status == 200]

    async def wait_for(self, n: int, timeout_s: float = 15.0) -> list[str]:
        """Wait until `n` requests were answered 2xx (AssertionError after the timeout)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if len(got := self.delivered()) >= n:
                return got
            await asyncio.sleep(0.02)
        msg = f"receiver got {len(self.delivered())} of {n} deliveries: {self.seen}"
        raise AssertionError(msg)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start_receiver(**script: Any) -> Receiver:
    """A running receiver on 127.0.0.1 (a free port) with the given script."""
    holder: list[Receiver] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            me = holder[0]
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if me.hang_s:
                time.sleep(me.hang_s)
            with me.lock:
                failing = me.always_fail or me.fail_first > 0
                if me.fail_first > 0:
                    me.fail_first -= 1
                status = 500 if failing else 200
                me.seen.append(
                    Received(self.headers.get("Nbmeter-Event-Id", ""), dict(self.headers),
                             body, status, time.monotonic())
                )  # fmt: skip
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_args: object) -> None:
            """Quiet: pytest shows what a test asserts, not an access log."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    receiver = Receiver(server, **script)
    holder.append(receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return receiver


FAST = WebhookSettings(
    timeout_s=2.0, lease_s=2.0, poll_s=0.1, backoff_base_s=0.05, backoff_max_s=0.2,
    disable_after_failures=1000, disable_after_s=3600.0,
)  # fmt: skip


@asynccontextmanager
async def dispatching(
    pool: asyncpg.Pool, db_url: str, settings: WebhookSettings = FAST, key: bytes | None = KEY
) -> AsyncIterator[Dispatcher]:
    """A dispatcher delivering in this process (opening secrets with `key`) until the block
    ends."""
    stop = asyncio.Event()
    d = Dispatcher(pool, settings, db_url, credentials_key=key)
    task = asyncio.create_task(d.run(stop))
    try:
        yield d
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
