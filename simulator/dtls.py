"""Simulated DTLS-PSK meters: each keeps one DTLS session open to the collector's coaps://.

An NB-IoT module with DTLS handshakes once and keeps the session across its reports (a
new handshake costs airtime and battery). `DtlsDevices.post(address, (identity, psk),
payload)` sends one CON POST to /u over that device's session (aiocoap's tinydtls client
transport, the `dtls` extra), opening the session on first use, and returns the same
`CoapResult` the plain CoAP endpoint does. A failed handshake or an unanswered request is
`answered=False` (a timeout to the meter).

The sessions live in a child process (`simulator.dtls_sessions`), started on the first
DTLS uplink: tinydtls has crashed the process that holds it while sessions were torn
down under load (a double free, SIGSEGV), and a crash must not end the run. When the
child dies, every uplink it had in flight is `answered=False`, which is what a meter sees
when its report times out: it keeps the report and resends it on its next wake-up
(`simulator.backlog`). A warning names the signal, `crashes` keeps the exit status, and
the next DTLS uplink starts a new child (each meter handshakes again). An uplink counts as
answered only with the collector's answer in hand, so the ground truth stays right.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import sys
import time
from pathlib import Path

from simulator.coap import CoapResult

START_TIMEOUT_S = 60.0  # the child imports aiocoap and tinydtls; slow on a loaded machine
CLOSE_TIMEOUT_S = 30.0  # closing every session, one at a time
# how long past its own timeout the child may take to answer before the parent stops
# waiting; a child that said nothing at all for that long is taken for wedged and killed
CHILD_GRACE_S = 15.0
_ROOT = str(Path(__file__).resolve().parent.parent)  # where the child imports simulator from
_UNANSWERED = CoapResult("", b"", 1, False)


class DtlsUnavailableError(RuntimeError):
    """The DTLS child process could not start (e.g. the `dtls` extra is not installed)."""


def describe_exit(returncode: int) -> str:
    """`-11` -> "signal 11 (SIGSEGV)", `1` -> "exit status 1"."""
    if returncode >= 0:
        return f"exit status {returncode}"
    try:
        return f"signal {-returncode} ({signal.Signals(-returncode).name})"
    except ValueError:
        return f"signal {-returncode}"


class _Child:
    """One child process, the requests it has not answered, and the task reading answers."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.pending: dict[int, asyncio.Future[CoapResult]] = {}
        self.heard_at = time.monotonic()
        self.reader: asyncio.Task[None] | None = None
        self.gone = False  # its output ended: it exited or was killed
        self.closing = False  # asked to close its sessions and exit


class DtlsDevices:
    """The simulated DTLS meters' sessions, held by a child process (see module doc)."""

    def __init__(self, host: str, port: int, timeout_s: float = 30.0) -> None:
        self.host, self.port, self.timeout_s = host, port, timeout_s
        self.crashes: list[int] = []  # exit status of each child that ended unasked
        self._child: _Child | None = None
        self._starting = asyncio.Lock()
        self._ids = itertools.count()

    @property
    def pid(self) -> int | None:
        """The running child's process id (None before the first uplink)."""
        child = self._child
        return None if child is None or child.gone else child.proc.pid

    async def _running(self) -> _Child:
        async with self._starting:
            if self._child is None or self._child.gone:
                self._child = await self._spawn()
            return self._child

    async def _spawn(self) -> _Child:
        path = [_ROOT, *filter(None, [os.environ.get("PYTHONPATH")])]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "simulator.dtls_sessions",
            self.host, str(self.port), str(self.timeout_s),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(path)}, limit=1 << 20,
        )  # fmt: skip
        assert proc.stdout is not None
        with contextlib.suppress(TimeoutError):
            line = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT_S)
            with contextlib.suppress(ValueError):
                if json.loads(line) == {"ready": True}:
                    child = _Child(proc)
                    child.reader = asyncio.create_task(self._read(child), name="dtls-sessions")
                    return child
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        why = describe_exit(await proc.wait())
        msg = f"the DTLS client process did not start ({why}; its error is above)"
        raise DtlsUnavailableError(f"{msg}: is the dtls extra installed? pip install '.[dtls]'")

    async def _read(self, child: _Child) -> None:
        """Hand each answer to its request; at the end of the child's output, answer what
        it left pending as unanswered and say why the child ended."""
        assert child.proc.stdout is not None
        try:
            while line := await child.proc.stdout.readline():
                child.heard_at = time.monotonic()
                answer = json.loads(line)
                future = child.pending.pop(answer["id"], None)
                if future is not None and not future.done():
                    future.set_result(
                        CoapResult(
                            answer["code"],
                            bytes.fromhex(answer["payload"]),
                            1,
                            answer["answered"] is True,
                            answer["max_age"],
                        )
                    )
        except Exception as exc:  # a task's top level: an output we cannot read is a dead child
            print(f"nbmeter sim: unreadable DTLS client output ({exc!r})", file=sys.stderr)
            with contextlib.suppress(ProcessLookupError):
                child.proc.kill()
        returncode = await child.proc.wait()
        child.gone = True
        lost = [future for future in child.pending.values() if not future.done()]
        child.pending.clear()
        for future in lost:
            future.set_result(_UNANSWERED)
        if child.closing and returncode == 0:
            return
        self.crashes.append(returncode)
        when = (
            "while closing its sessions (every uplink already had its result)"
            if child.closing
            else f"with {len(lost)} uplinks in flight: they count as unanswered and their"
            " meters resend them; the next DTLS uplink starts a new one"
        )
        print(
            f"nbmeter sim: WARNING: the DTLS client process ended ({describe_exit(returncode)}) "
            + when,
            file=sys.stderr,
        )

    async def post(self, address: str, cred: tuple[str, str], payload: bytes) -> CoapResult:
        """POST `payload` over `address`'s session; the collector's answer."""
        child = await self._running()
        request_id = next(self._ids)
        future: asyncio.Future[CoapResult] = asyncio.get_running_loop().create_future()
        child.pending[request_id] = future
        request = {
            "id": request_id,
            "address": address,
            "identity": cred[0],
            "psk": cred[1],
            "payload": payload.hex(),
        }
        assert child.proc.stdin is not None
        try:
            child.proc.stdin.write(json.dumps(request).encode() + b"\n")
            await child.proc.stdin.drain()
            return await asyncio.wait_for(future, self.timeout_s + CHILD_GRACE_S)
        except (ConnectionError, TimeoutError):
            # a child that died is noticed by its reader; one that only went quiet is
            # killed here if it has said nothing for the whole wait
            if time.monotonic() - child.heard_at > self.timeout_s + CHILD_GRACE_S:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.kill()
            return _UNANSWERED
        finally:
            child.pending.pop(request_id, None)

    async def close(self) -> None:
        """End every session: the child closes them at the end of its input and exits."""
        child, self._child = self._child, None
        if child is None:
            return
        child.closing = True
        assert child.proc.stdin is not None
        child.proc.stdin.close()
        try:
            await asyncio.wait_for(asyncio.shield(child.proc.wait()), CLOSE_TIMEOUT_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                child.proc.kill()
        if child.reader is not None:
            await child.reader
