"""DTLS-PSK meters (`simulator.dtls`) against a real collector's coaps:// on the real
database: a session the collector dropped (it restarted) is unanswered, then replaced by
a fresh one that gets answers; a crash of the child process that holds tinydtls costs
only the uplinks it had in flight (unanswered: the meter resends), never the simulator;
closing every session at the end ends both processes cleanly; and the tinydtls double
free that a shutdown with an ICMP error pending caused, provoked with and without
`simulator.dtls_sessions.guard_shutdown`.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import socket
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest
from brokerkit import free_port
from dbkit import new_tenant

from collector.main import run
from collector.settings import CoapSettings, CollectorSettings, DtlsSettings
from decoder.encode_cjt188 import encode_cjt188
from devices.provision import provision_device
from simulator.backend import provision_credentials
from simulator.dtls import DtlsDevices
from simulator.fleet import FleetSpec, Format, Transport
from simulator.runner import RunConfig, send_all
from simulator.schedule import Event, build_schedule
from simulator.truth import build_truth
from storage.credentials import new_key

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("DTLSSocket") is None,
    reason="DTLSSocket (tinydtls) not installed: pip install '.[dtls]' (nbmeter stack tools)",
)

ROOT = Path(__file__).resolve().parents[2]
_ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
}
_READINGS = "SELECT count(*) FROM readings r JOIN meters m USING (meter_id) WHERE m.address = $1"
Meter = tuple[str, tuple[str, str]]  # address, (PSK identity, PSK)


class Coaps:
    """An in-process collector whose coaps:// port stays the same across restarts."""

    def __init__(self, db_url: str, key: str) -> None:
        self.port = free_port(socket.SOCK_DGRAM)
        self._settings = CollectorSettings(
            database_url=db_url,
            mqtt_url=None,
            credentials_key=key,  # type: ignore[arg-type]
            metrics_port=0,
            coap=CoapSettings(host="127.0.0.1", port=free_port(socket.SOCK_DGRAM)),
            dtls=DtlsSettings(host="127.0.0.1", port=self.port, reload_s=0.2),
        )
        self._stop: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Serve (the credentials are read whole at start)."""
        stop, started = asyncio.Event(), asyncio.Event()
        self._task = asyncio.create_task(run(self._settings, stop=stop, started=started))
        await asyncio.wait_for(started.wait(), 30)
        self._stop = stop

    async def stop(self) -> None:
        """Shut down: every DTLS session the collector held is gone."""
        if self._stop is not None and self._task is not None:
            self._stop.set()
            await asyncio.wait_for(self._task, 40)
        self._stop = self._task = None


@pytest.fixture
def key() -> str:
    """The key that seals the PSKs (the stack's, or a fresh one)."""
    return os.environ.get("NBMETER_CREDENTIALS_KEY") or new_key()


@pytest.fixture
async def tenant(pool: asyncpg.Pool) -> str:
    """A tenant of its own for one test."""
    return await new_tenant(pool, "dtls")


@pytest.fixture
async def meters(db_url: str, key: str, tenant: str) -> list[Meter]:
    """Four CJ/T 188 meters with a DTLS-PSK credential each."""
    out = []
    for _ in range(4):
        address = f"{uuid.uuid4().int % 10**14:014d}"
        device = await provision_device(
            db_url, tenant, address, credentials_key=key, oscore=False, dtls_psk=True
        )
        out.append((address, (device.dtls["psk_identity"], device.dtls["psk"])))
    return out


@pytest.fixture
async def coaps(db_url: str, key: str, meters: list[Meter]) -> AsyncIterator[Coaps]:
    """The collector, started once the meters are provisioned; stopped at the end."""
    server = Coaps(db_url, key)
    await server.start()
    yield server
    await server.stop()


def _frame(address: str, n: int) -> bytes:
    """Meter `address`'s n-th hourly reading (register n m³)."""
    read_at = datetime(2025, 3, 1, tzinfo=UTC).timestamp() + 3600 * n
    return encode_cjt188(
        address=address, total_ml=1_000_000 * n, clock=datetime.fromtimestamp(read_at, UTC)
    )


async def test_session_the_collector_dropped_is_unanswered_then_replaced(
    coaps: Coaps, meters: list[Meter], pool: asyncpg.Pool
) -> None:
    """Sessions open and answered; the collector restarts (its sessions are gone): the
    uplink sent while it is down is unanswered, never acknowledged; once it is back each
    meter's next uplink goes over a fresh session and gets 2.04; closing every session at
    the end ends the child process with status 0."""
    devices = DtlsDevices("127.0.0.1", coaps.port, timeout_s=4)
    try:
        first = await asyncio.gather(*(devices.post(a, c, _frame(a, 1)) for a, c in meters))
        assert [r.code for r in first] == ["2.04"] * len(meters)
        await coaps.stop()
        down = await asyncio.gather(*(devices.post(a, c, _frame(a, 2)) for a, c in meters))
        assert [(r.answered, r.code) for r in down] == [(False, "")] * len(meters)
        await coaps.start()
        again = await asyncio.gather(*(devices.post(a, c, _frame(a, 3)) for a, c in meters))
        assert [r.code for r in again] == ["2.04"] * len(meters)
    finally:
        await devices.close()
    assert devices.crashes == []
    for address, _ in meters:
        assert await pool.fetchval(_READINGS, address) == 2


async def test_crash_of_the_dtls_process_costs_only_its_uplinks_in_flight(
    coaps: Coaps, meters: list[Meter], pool: asyncpg.Pool, capfd: pytest.CaptureFixture[str]
) -> None:
    """The process holding tinydtls dies of SIGSEGV while uplinks wait for the collector
    (it is down): they come back unanswered at once, not after their timeout, a warning
    names the signal, and the next uplinks start a new process whose sessions get 2.04."""
    devices = DtlsDevices("127.0.0.1", coaps.port, timeout_s=30)
    try:
        address, cred = meters[0]
        assert (await devices.post(address, cred, _frame(address, 1))).code == "2.04"
        crashed = devices.pid
        assert crashed is not None
        await coaps.stop()
        in_flight = [asyncio.create_task(devices.post(a, c, _frame(a, 2))) for a, c in meters]
        await asyncio.sleep(1.0)
        sent_at = time.monotonic()
        os.kill(crashed, signal.SIGSEGV)
        lost = await asyncio.wait_for(asyncio.gather(*in_flight), 10)
        assert time.monotonic() - sent_at < 10
        assert [(r.answered, r.code) for r in lost] == [(False, "")] * len(meters)
        await coaps.start()
        again = await asyncio.gather(*(devices.post(a, c, _frame(a, 3)) for a, c in meters))
        assert [r.code for r in again] == ["2.04"] * len(meters)
        assert devices.pid not in (None, crashed)
    finally:
        await devices.close()
    assert devices.crashes == [-signal.SIGSEGV]
    assert "DTLS client process ended (signal 11 (SIGSEGV))" in capfd.readouterr().err
    assert await pool.fetchval(_READINGS, meters[0][0]) == 2
    for address, _ in meters[1:]:
        assert await pool.fetchval(_READINGS, address) == 1


_SIMULATOR = textwrap.dedent(
    """
    import asyncio, json, sys
    from simulator.dtls import DtlsDevices

    async def main(port, dead_port, meters):
        live = DtlsDevices("127.0.0.1", port, timeout_s=5)
        dead = DtlsDevices("127.0.0.1", dead_port, timeout_s=1)  # nobody there: all fail
        codes = []
        for n in range(1, 4):
            codes += [r.code for r in await asyncio.gather(
                *(live.post(a, tuple(c), bytes.fromhex(f[n - 1])) for a, c, f in meters),
                *(dead.post(a, tuple(c), b"x") for a, c, _ in meters),
            )]
        await live.close()
        await dead.close()
        print(json.dumps({"codes": codes, "crashes": live.crashes + dead.crashes}))

    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])))
    """
)


async def test_closing_every_session_at_the_end_exits_cleanly(
    coaps: Coaps, meters: list[Meter], tmp_path: Path
) -> None:
    """A simulator process with answered sessions and with sessions whose handshakes
    failed (retired, kept until the end) closes them all and exits 0 (a crash would show
    as -11 or -6), and so does its DTLS child."""
    frames = [[_frame(a, n).hex() for n in range(1, 4)] for a, _ in meters]
    arg = json.dumps([[a, list(c), f] for (a, c), f in zip(meters, frames, strict=True)])
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _SIMULATOR, str(coaps.port), str(free_port(socket.SOCK_DGRAM)),
        arg, cwd=tmp_path, env=_ENV, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, out
    report = json.loads(out)
    assert report["crashes"] == []
    live = [code for i, code in enumerate(report["codes"]) if i % (2 * len(meters)) < len(meters)]
    assert live == ["2.04"] * 3 * len(meters)
    assert set(report["codes"]) - set(live) == {""}


async def test_run_counts_an_uplink_of_a_broken_session_as_timeout_and_resends_it(
    db_url: str, key: str, tenant: str, pool: asyncpg.Pool
) -> None:
    """`send_all` with a DTLS meter whose first report finds the collector down: that
    report is a timeout (kept, never acknowledged), the collector comes back before the
    second, and the meter's next wake-up resends the first over a fresh session: both
    acknowledged, nothing left unacknowledged, both readings stored."""
    truth = build_truth(FleetSpec(meters=20, days=3, seed=5, dtls_share=1.0))
    meter = next(
        m for m in truth.meters if m.transport is Transport.COAP_DTLS and m.format is Format.CJT188
    )
    first, second = [u for u in build_schedule(truth) if u.meter == meter.index][:2]
    creds = await provision_credentials(
        [(meter.address, str(meter.kind), str(meter.format), False, False)],
        database_url=db_url, credentials_key=key, tenant=tenant, mqtt_admin_url=None,
        dtls={meter.address},
    )  # fmt: skip
    server = Coaps(db_url, key)
    config = RunConfig(
        coap_port=free_port(socket.SOCK_DGRAM), coaps_port=server.port, tenant=tenant,
        concurrency=2, time_scale=0.01, sockets=1, dtls_timeout_s=3,
    )  # fmt: skip
    back = Event(second.send_s, server.start, frozenset({meter.index}))
    try:
        summary = await send_all(
            truth, [first, second], creds, config, progress=False, events=[back]
        )
    finally:
        await server.stop()
    assert summary.results[first.seq] == "timeout"
    assert [u.resend_of for u in summary.resends] == [first.seq]
    assert summary.results[summary.resends[0].seq] == "acked"
    assert summary.results[second.seq] == "acked"
    assert summary.timeouts == 1
    assert summary.unacked == {}
    assert summary.dtls_crashes == []
    assert await pool.fetchval(_READINGS, meter.address) == 2


_NESTED = textwrap.dedent(
    """
    import asyncio, resource, sys
    import aiocoap
    from simulator.dtls_sessions import guard_shutdown

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # the crash leaves no core file

    async def main(port, identity, psk, frame, guarded):
        if guarded:
            guard_shutdown()
        ctx = await aiocoap.Context.create_client_context(transports=["tinydtls"])
        dtls = {"dtls": {"psk": {"ascii": psk}, "client-identity": {"ascii": identity}}}
        ctx.client_credentials.load_from_dict({f"coaps://127.0.0.1:{port}/*": dtls})
        uri = f"coaps://127.0.0.1:{port}/u"
        request = aiocoap.Message(code=aiocoap.POST, uri=uri, payload=bytes.fromhex(frame))
        reply = await ctx.request(request).response
        print(reply.code, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        # the collector is gone: a datagram to its port draws an ICMP port unreachable
        # that the socket holds until someone reads it; the shutdown comes before that
        connection = reply.remote
        connection._transport.sendto(b"\\x17\\xfe\\xfd")
        connection.shutdown()
        print("survived", flush=True)
        await ctx.shutdown()

    asyncio.run(main(int(sys.argv[1]), *sys.argv[2:5], sys.argv[5] == "guarded"))
    """
)


@pytest.mark.parametrize("guarded", [True, False], ids=["guarded", "aiocoap-as-is"])
async def test_shutdown_with_an_icmp_error_pending_is_not_nested(
    coaps: Coaps, meters: list[Meter], guarded: bool, tmp_path: Path
) -> None:
    """The crash, provoked: a session is shut down while its socket holds an ICMP error
    (the collector's port closed); the close_notify's sendto fails, asyncio calls
    error_received at once and aiocoap shuts the session down inside its own shutdown.
    With `guard_shutdown` the process survives and exits 0; aiocoap as it is frees the
    tinydtls peer twice (SIGABRT, or SIGSEGV): when that stops, the guard may go."""
    address, (identity, psk) = meters[0]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _NESTED, str(coaps.port), identity, psk, _frame(address, 1).hex(),
        "guarded" if guarded else "as-is", cwd=tmp_path, env=_ENV,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdin is not None
    assert proc.stdout is not None
    answer = await asyncio.wait_for(proc.stdout.readline(), 60)
    assert answer.startswith(b"2.04"), answer
    await coaps.stop()
    proc.stdin.write(b"go\n")
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    if guarded:
        assert (proc.returncode, out) == (0, b"survived\n")
    elif proc.returncode == 0:  # a double free is not always caught where it happens
        pytest.skip("aiocoap as it is survived the nested shutdown this time (heap timing)")
    else:
        assert proc.returncode in (-signal.SIGABRT, -signal.SIGSEGV), (proc.returncode, out)
