"""The DTLS-PSK meters' sessions, run in a child process of the simulator (`simulator.dtls`).

`python -m simulator.dtls_sessions HOST PORT TIMEOUT_S` reads one JSON request a line on
stdin (`{"id", "address", "identity", "psk", "payload"}`, payload in hex), POSTs it to
coaps://HOST:PORT/u over that meter's DTLS session and writes one JSON result a line
(`{"id", "code", "payload", "answered", "max_age"}`) to its stdout; the first line it
writes is `{"ready": true}`, once aiocoap and tinydtls are loaded. At the end of stdin it
closes every session and exits 0.

tinydtls (aiocoap's `tinydtls` transport over the DTLSSocket C extension) can end the
process that holds it. The crash seen (tests/simulator/test_dtls.py provokes it at will):
shutting a session down resets its tinydtls peer, which sends a close_notify through
aiocoap's write callback; when the collector's port was closed (it restarted), the
socket holds an ICMP error that a loaded event loop has not read yet, so asyncio's
`sendto` fails and calls the protocol's `error_received` at once, and aiocoap shuts the
same session down again from inside the first shutdown. The inner reset frees the peer
the outer one is still tearing down, and the outer frees it again (glibc aborts on the
double free, SIGABRT; where it does not notice, the heap is corrupt and a later step
segfaults). Three rules:

- `guard_shutdown` makes that nested shutdown return; the outer one finishes the job;
- no session is torn down while the run goes on. A session that failed (no answer in
  time, an error from aiocoap) is retired: the meter's next uplink opens a new session,
  and the failed one stays referenced, so neither our code nor the garbage collector
  frees its DTLS object mid-run (tinydtls calls back into Python objects that teardown
  leaves half gone). Retired and live sessions are shut down at the end only, one at a
  time, with the event loop running and no request in flight;
- this process is the only one that loads tinydtls, so whatever else tinydtls does wrong
  costs the uplinks in flight (the parent counts them as unanswered: the meter keeps its
  data and resends) and a new child, never the run.

aiocoap's own reaction to an alert from the collector (it resets the peer from inside the
alert callback) is left as it is: tinydtls unlinks that peer before calling back, so the
reset finds nothing to free.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import importlib
import json
import os
import signal
import sys
import traceback
from dataclasses import dataclass
from typing import Any

import aiocoap

from simulator.coap import CoapResult


def guard_shutdown() -> None:
    """Make aiocoap's `DTLSClientConnection.shutdown` return when it is called from inside
    itself (see the module docstring); the outer call finishes the teardown. Idempotent."""
    from aiocoap.transports.tinydtls import DTLSClientConnection

    shutdown = DTLSClientConnection.shutdown
    if hasattr(shutdown, "__wrapped__"):
        return

    @functools.wraps(shutdown)
    def guarded(self: Any) -> None:
        if self.__dict__.get("_nbmeter_shutting_down"):
            return
        self._nbmeter_shutting_down = True
        try:
            shutdown(self)
        finally:
            self._nbmeter_shutting_down = False

    DTLSClientConnection.shutdown = guarded


@dataclass
class _Session:
    """One meter's aiocoap client context, and the DTLS connection of its last answer:
    aiocoap holds that connection weakly, and would reset it whenever the last message
    naming it is dropped."""

    context: Any
    remote: Any = None


class Sessions:
    """One DTLS session per meter address; failed ones retired until `close` (see the
    module docstring)."""

    def __init__(self, host: str, port: int, timeout_s: float) -> None:
        self.uri = f"coaps://{host}:{port}/u"
        # aiocoap matches credentials on the request's URI as it renders it, which drops
        # the default port (5684, as `make demo` uses): register both spellings
        self._patterns = (
            [f"coaps://{host}:{port}/*", f"coaps://{host}/*"]
            if port == 5684
            else [f"coaps://{host}:{port}/*"]
        )
        self.timeout_s = timeout_s
        guard_shutdown()
        self._live: dict[str, _Session] = {}
        self._retired: list[_Session] = []

    async def _session(self, address: str, identity: str, psk: str) -> _Session:
        session = self._live.get(address)
        if session is None:
            ctx = await aiocoap.Context.create_client_context(transports=["tinydtls"])
            dtls = {"dtls": {"psk": {"ascii": psk}, "client-identity": {"ascii": identity}}}
            ctx.client_credentials.load_from_dict({pattern: dtls for pattern in self._patterns})
            session = self._live[address] = _Session(ctx)
        return session

    def _retire(self, address: str, session: _Session) -> None:
        if self._live.get(address) is session:
            del self._live[address]
            self._retired.append(session)

    async def post(self, address: str, identity: str, psk: str, payload: bytes) -> CoapResult:
        """POST `payload` over `address`'s session; the collector's answer, or
        `answered=False` (the session is then retired) when none came in time."""
        session = await self._session(address, identity, psk)
        request = aiocoap.Message(code=aiocoap.POST, uri=self.uri, payload=payload)
        try:
            reply = await asyncio.wait_for(
                session.context.request(request).response, self.timeout_s
            )
        except (aiocoap.error.Error, TimeoutError, OSError):
            # handshake refused, collector restarted, request lost: a new session next time
            self._retire(address, session)
            return CoapResult("", b"", 1, False)
        except Exception:
            self._retire(address, session)  # not used again, whatever aiocoap did wrong
            raise
        session.remote = reply.remote
        code = f"{int(reply.code) >> 5}.{int(reply.code) & 0x1F:02d}"
        return CoapResult(code, bytes(reply.payload), 1, True, reply.opt.max_age)

    async def close(self) -> None:
        """Shut every session down, retired ones first, one at a time; then let the
        garbage collector free the DTLS objects while the event loop still runs."""
        sessions = [*self._retired, *self._live.values()]
        self._retired, self._live = [], {}
        while sessions:
            context = sessions.pop(0).context
            with contextlib.suppress(Exception):
                await context.shutdown()
            del context
            await asyncio.sleep(0)  # what the shutdown scheduled runs before the next one
        gc.collect()
        await asyncio.sleep(0.05)


def _result_line(request_id: int, result: CoapResult) -> bytes:
    out = {
        "id": request_id,
        "code": result.code,
        "payload": result.payload.hex(),
        "answered": result.answered,
        "max_age": result.max_age_s,
    }
    return json.dumps(out).encode() + b"\n"


async def serve(
    sessions: Sessions, requests: asyncio.StreamReader, results: asyncio.StreamWriter
) -> None:
    """Answer every request line of `requests` on `results` until the end of input, then
    cancel what is still in flight (nobody waits for it) and close the sessions."""
    tasks: set[asyncio.Task[None]] = set()

    async def answer(request: dict[str, Any]) -> None:
        try:
            result = await sessions.post(
                request["address"],
                request["identity"],
                request["psk"],
                bytes.fromhex(request["payload"]),
            )
        except Exception:  # a task's top level: aiocoap failed in a way it does not declare
            traceback.print_exc()
            result = CoapResult("", b"", 1, False)
        results.write(_result_line(request["id"], result))
        await results.drain()

    results.write(b'{"ready": true}\n')
    await results.drain()
    while line := await requests.readline():
        task = asyncio.create_task(answer(json.loads(line)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await sessions.close()


async def _main(host: str, port: int, timeout_s: float, results_fd: int) -> None:
    importlib.import_module("DTLSSocket.dtls")  # not ready without it: the parent says why
    loop = asyncio.get_running_loop()
    requests = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(requests), sys.stdin)
    transport, protocol = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin, os.fdopen(results_fd, "wb")
    )
    results = asyncio.StreamWriter(transport, protocol, None, loop)
    try:
        await serve(Sessions(host, port, timeout_s), requests, results)
    finally:
        transport.close()


def main(argv: list[str]) -> None:
    """The child's entry point: `HOST PORT TIMEOUT_S` (see the module docstring)."""
    host, port, timeout_s = argv[0], int(argv[1]), float(argv[2])
    # stdout carries the results only: anything else printed (DTLSSocket prints on its
    # own) goes to stderr
    results_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    # Ctrl-C in a terminal reaches the whole process group: the parent ends this process
    # by closing its input, after its own cleanup
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    asyncio.run(_main(host, port, timeout_s, results_fd))


if __name__ == "__main__":
    main(sys.argv[1:])
