"""CPU per uplink of the CoAP server path, in process: OSCORE as the collector runs it,
plain CoAP, and OSCORE through aiocoap's own unprotect/protect.

    .venv/bin/python bench/oscore_path.py [--uplinks 3000] [--rounds 5] [--profile 10]

No network, no database: every figure is `time.process_time` over `--uplinks` datagrams
(best of `--rounds`), so it holds on a loaded machine. The uplinks are a city day's mix
(`bench/cityday.py`): 60% nbm1 interval batches (24 readings), 30% SenML packs (24
registers), 10% CJ/T 188 frames, each meter with its own OSCORE context as provisioning
makes it (derived keys stored with the secrets; the device's side is the simulator's
aiocoap context). Each path goes from datagram bytes to answer bytes, through the same
`/u` resource (`collector.coap.UplinkResource`, its pipeline answering "stored" at once):

(a) collector: `Message.decode`, then `collector.coap_oscore.OscoreSite` (verify_start,
    context cache, the common case's unprotect and first answer from aiocoap's pieces,
    `collector.oscore_lean`, the inner site), the answer encoded as a piggybacked ACK;
(b) plain: the same with a plain-CoAP uplink of a lab tenant (`?t=lab`) through the same
    `OscoreSite`, which hands it to the inner site;
(c) full: `FullOscoreSite`, the collector's site with every request through aiocoap's
    `unprotect` and `protect` (the collector before `collector.oscore_lean`).

What aiocoap's transport does around that (deduplication, tokens, the pipe's task) is
the same for all three and not included. Before anything is timed, every uplink goes
through (a) and (c) on separate contexts: the inner requests must be equal, the replay
windows too, the answers byte-identical, and the device's aiocoap context must
unprotect each answer.

Printed: µs per uplink for (a), (b), (c), the ratios plain/(a), plain/(c) and what the
lean step saves; the cost of a cold context (a city-day uplink meets one: unseal, parse,
build). With `--profile N`: the top N cumulative entries of (a) under cProfile, ours and
aiocoap's apart.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import random
import statistics
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import aiocoap
from aiocoap import oscore
from aiocoap.message import Direction
from aiocoap.transports.udp6 import UDP6EndpointAddress

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # ahead of bench/, whose collector.py is not the package

from collector import oscore_lean  # noqa: E402
from collector.coap import TenantDirectory, UplinkResource, _recorded_response  # noqa: E402
from collector.coap_guard import EventLimiter  # noqa: E402
from collector.coap_oscore import DeviceContext, DeviceContexts, OscoreSite  # noqa: E402
from collector.coap_patches import Site, patch_message_decode, patch_udp6_addresses  # noqa: E402
from collector.settings import CoapSettings  # noqa: E402
from collector.uplink import Outcome  # noqa: E402
from devices.provision import derive  # noqa: E402
from simulator.coap import DeviceContext as ClientContext  # noqa: E402
from simulator.coap import OscoreCredentials  # noqa: E402
from storage import credentials  # noqa: E402

sys.path.insert(1, str(ROOT / "bench"))  # the city day's fleet (collector imported above)

from benchkit import coap_post  # noqa: E402
from cityday import MIX, SERVER_SENDER_ID, Meter, payload  # noqa: E402

DAY_S = 1_764_979_200  # 2025-12-06 00:00 UTC
CREDENTIALS_KEY = bytes(range(32))
LAB_TENANT = 2


class _Socket:
    """Stands for the transport's socket, which an aiocoap address refers to (weakly)."""


_SOCKET = _Socket()
REMOTE = UDP6EndpointAddress(("::ffff:10.1.2.3", 40123, 0, 0), _SOCKET)
patch_udp6_addresses()  # as the collector's server does before it binds
patch_message_decode()


# --- aiocoap's full path ----------------------------------------------------------------


class FullOscoreSite(OscoreSite):
    """The collector's site with every request through aiocoap's own unprotect/protect
    (the collector before `collector.oscore_lean`)."""

    @staticmethod
    def lean_unprotect(ctx: Any, request: aiocoap.Message) -> None:
        """Never the common case: aiocoap decides every request."""
        return None


# --- the fleet, the server, one uplink -------------------------------------------------


def fleet(n: int, seed: int = 7) -> list[tuple[Meter, bytes]]:
    """`n` meters of the city-day mix, each with its day's payload."""
    rng = random.Random(seed)
    fmts = [f for f, share in MIX for _ in range(round(share * 10))]
    out = []
    for i in range(1, n + 1):
        meter = Meter(
            i,
            f"{i:014d}",
            "gas" if i % 3 == 0 else "water",
            fmts[i % len(fmts)],
            b"\x01" + i.to_bytes(5, "big"),
            rng.randbytes(16),
            rng.randbytes(8),
        )
        out.append((meter, payload(meter, DAY_S, rng)[0]))
    return out


def sealed_row(meter: Meter) -> bytes:
    """The meter's OSCORE secrets as `device_credentials.oscore_sealed` holds them."""
    blob = credentials.oscore_blob(
        meter.secret, meter.salt, derive(meter.kid, SERVER_SENDER_ID, meter.secret, meter.salt)
    )
    return credentials.seal(CREDENTIALS_KEY, blob, meter.meter_id)


def open_row(meter: Meter, sealed: bytes) -> credentials.OscoreSecret:
    """What `storage.credentials.load_oscore_many` makes of the row (no replay state yet)."""
    secret, salt, derived = credentials.open_oscore_blob(CREDENTIALS_KEY, sealed, meter.meter_id)
    return credentials.OscoreSecret(
        meter_id=meter.meter_id,
        tenant_id=1,
        address=meter.address,
        kid=meter.kid,
        sender_id=SERVER_SENDER_ID,
        master_secret=secret,
        master_salt=salt,
        replay_index=None,
        replay_bits=None,
        derived=derived,
    )


class _Stored:
    """The pipeline's side, in memory: every uplink is durable at once ("stored")."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._done: asyncio.Future[Outcome] = loop.create_future()
        self._done.set_result(Outcome("stored", n_readings=24, n_new=24))
        self.offered = 0

    def offer(self, uplink: Any, *, answer_within_s: float | None = None) -> Any:
        self.offered += 1
        return self._done


class Server:
    """One `/u` site (the collector's resource and context cache) behind `site_cls`."""

    def __init__(self, secrets_: list[credentials.OscoreSecret], site_cls: type = OscoreSite):
        settings = CoapSettings()
        self.loop = asyncio.new_event_loop()  # futures only: never run
        events = EventLimiter(settings.log_window_s, settings.log_per_window)
        tenants = TenantDirectory(None)  # type: ignore[arg-type]  # no database: held below
        tenants._tenants = {"lab": LAB_TENANT}
        tenants._started_at = time.monotonic() + 1e9  # never reloaded during the run
        self.pipeline = _Stored(self.loop)
        site = Site()
        site.add_resource(["u"], UplinkResource(settings, self.pipeline, tenants, events))  # type: ignore[arg-type]
        self.contexts = DeviceContexts(None, CREDENTIALS_KEY, settings)  # type: ignore[arg-type]
        self.contexts._store([s.kid for s in secrets_], {s.kid: s for s in secrets_})
        self.site = site_cls(site, self.contexts, settings, events, _recorded_response)

    def close(self) -> None:
        """Release the (never run) event loop."""
        self.loop.close()


class _Pipe:
    """What the site uses of aiocoap's pipe: the request, and the answers it adds."""

    __slots__ = ("answers", "request")

    def __init__(self, request: aiocoap.Message) -> None:
        self.request = request
        self.answers: list[aiocoap.Message] = []

    def add_response(self, response: aiocoap.Message, is_last: bool = False) -> None:
        self.answers.append(response)


def _drive(coro: Coroutine[Any, Any, Any]) -> None:
    """Run `coro` to its end without an event loop (it must never wait on anything)."""
    try:
        coro.send(None)
    except StopIteration:
        return
    coro.close()
    msg = "the path waited for something: not an in-memory run"
    raise RuntimeError(msg)


def uplink(site: Any, datagram: bytes) -> bytes:
    """Datagram bytes in, the piggybacked answer's bytes out (through `site`)."""
    request = aiocoap.Message.decode(datagram, REMOTE)
    pipe = _Pipe(request)
    _drive(site.render_to_pipe(pipe))
    answer = pipe.answers[-1]
    answer.mtype, answer.mid, answer.token = aiocoap.ACK, request.mid, request.token
    return bytes(answer.encode())


def oscore_datagrams(
    meters: list[tuple[Meter, bytes]], first_seqno: int = 5
) -> tuple[list[bytes], list[tuple[ClientContext, Any]]]:
    """Each meter's uplink protected by its own (device-side) context: the datagrams, and
    (context, request identifiers) to unprotect each answer with."""
    datagrams, clients = [], []
    for i, (meter, body) in enumerate(meters):
        creds = OscoreCredentials(meter.kid, SERVER_SENDER_ID, meter.secret, meter.salt)
        client = ClientContext(creds, first_seqno + i % 7)
        msg = aiocoap.Message(code=aiocoap.POST, uri_path=("u",), payload=body)
        msg.direction = Direction.OUTGOING
        outer, request_id = client.protect(msg)
        outer.mtype, outer.mid, outer.token = aiocoap.CON, i & 0xFFFF, i.to_bytes(4, "big")
        datagrams.append(bytes(outer.encode()))
        clients.append((client, request_id))
    return datagrams, clients


def plain_datagrams(meters: list[tuple[Meter, bytes]]) -> list[bytes]:
    """The same payloads as plain-CoAP uplinks of the lab tenant."""
    out = []
    for i, (_, body) in enumerate(meters):
        d = coap_post(body, b"t=lab")
        out.append(d[:2] + (i & 0xFFFF).to_bytes(2, "big") + i.to_bytes(4, "big") + d[8:])
    return out


def check_interop(meters: list[tuple[Meter, bytes]]) -> int:
    """Every uplink through (a) and (c) on separate contexts: same inner request, same
    replay windows, byte-identical answers that the device's context unprotects to 2.04.
    Returns how many were checked; raises AssertionError on the first difference."""
    secrets_ = [open_row(m, sealed_row(m)) for m, _ in meters]
    lean, full = Server(secrets_), Server(secrets_, FullOscoreSite)
    datagrams, clients = oscore_datagrams(meters)
    try:
        for datagram, (client, request_id), (meter, body) in zip(
            datagrams, clients, meters, strict=True
        ):
            request = aiocoap.Message.decode(datagram, REMOTE)
            ctx_lean = lean.contexts.find_oscore({oscore.COSE_KID: meter.kid})
            got = oscore_lean.unprotect(ctx_lean, request)
            assert got is not None, f"meter {meter.meter_id}: lean path declined a fresh uplink"
            inner_lean, lean_req = got
            sc = full.contexts.find_oscore(oscore.verify_start(request))
            inner_full, _ = sc.unprotect(aiocoap.Message.decode(datagram, REMOTE))
            assert inner_lean.code == inner_full.code, meter
            assert inner_lean.opt.encode() == inner_full.opt.encode(), meter
            assert inner_lean.payload == inner_full.payload == body, meter
            assert ctx_lean.replay_state() == sc.replay_state(), meter
            # whole uplinks, each on a fresh pair of contexts (the checks above used them)
            one = [open_row(meter, sealed_row(meter))]
            a, c = Server(one), Server(one, FullOscoreSite)
            answer_a, answer_c = uplink(a.site, datagram), uplink(c.site, datagram)
            a.close()
            c.close()
            assert answer_a == answer_c, f"meter {meter.meter_id}: answers differ"
            reply, _ = client.unprotect(aiocoap.Message.decode(answer_a), request_id)
            assert reply.code == aiocoap.CHANGED, reply
            assert lean_req.request_id.can_reuse_nonce is True  # protect not called here
    finally:
        full.close()
        lean.close()
    return len(meters)


# --- timing ------------------------------------------------------------------------------


def one_run_us(make_server: Callable[[], Server], datagrams: list[bytes]) -> float:
    """CPU µs per uplink of one run over `datagrams`, on fresh contexts."""
    server = make_server()
    site = server.site
    t0 = time.process_time()
    for d in datagrams:
        uplink(site, d)
    took = (time.process_time() - t0) / len(datagrams) * 1e6
    assert server.pipeline.offered == len(datagrams), "an uplink was not answered 2.04"
    server.close()
    return took


def per_uplink_us(
    paths: dict[str, tuple[Callable[[], Server], list[bytes]]], rounds: int
) -> dict[str, list[float]]:
    """Each path's CPU µs per uplink in each of `rounds` rounds; the paths take turns
    within a round, so a neighbour's load falls on all of them alike."""
    runs: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, (make_server, datagrams) in paths.items():
            runs[name].append(one_run_us(make_server, datagrams))
    return runs


def cold_context_us(meters: list[tuple[Meter, bytes]], rounds: int) -> tuple[float, float]:
    """(open a sealed row, build the DeviceContext) µs per context: the collector's CPU for
    a cold cache, which a city-day uplink meets (the query itself not included)."""
    rows = [(m, sealed_row(m)) for m, _ in meters]
    best_open = best_build = float("inf")
    for _ in range(rounds):
        t0 = time.process_time()
        opened = [open_row(m, s) for m, s in rows]
        t1 = time.process_time()
        for s in opened:
            DeviceContext(s)
        t2 = time.process_time()
        best_open = min(best_open, (t1 - t0) / len(rows) * 1e6)
        best_build = min(best_build, (t2 - t1) / len(rows) * 1e6)
    return best_open, best_build


def profile(secrets_: list[credentials.OscoreSecret], datagrams: list[bytes], top: int) -> None:
    """cProfile of (a): the top `top` cumulative entries of ours and of aiocoap's."""
    server = Server(secrets_)
    prof = cProfile.Profile()
    prof.enable()
    for d in datagrams:
        uplink(server.site, d)
    prof.disable()
    server.close()
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    n = len(datagrams)
    root = str(Path(__file__).resolve().parents[1])
    groups: dict[str, list[tuple[float, str, float]]] = {"ours": [], "aiocoap": []}
    own = {"ours": 0.0, "aiocoap": 0.0, "other": 0.0}  # self time: where the CPU goes
    for (path, line, func), (_, calls, own_s, cum, _) in stats.items():
        if "/aiocoap/" in path:
            group, where = "aiocoap", path.split("/aiocoap/", 1)[1]
        elif path.startswith(root) and "/.venv/" not in path:
            group, where = "ours", path[len(root) + 1 :]
        else:  # the standard library, cryptography, cbor2, prometheus_client
            own["other"] += own_s
            continue
        own[group] += own_s
        groups[group].append((cum / n * 1e6, f"{where}:{line}({func})", calls / n))
    total = sum(own.values())
    print(
        "profile (a), self time: "
        + " ".join(f"{k}={v / total:.0%}" for k, v in own.items())
        + " (other: stdlib, cryptography, cbor2, prometheus_client)"
    )
    for group, rows in groups.items():
        print(f"profile (a), cumulative, {group}: top {top} (µs per uplink under cProfile)")
        for cum_us, name, calls in sorted(rows, reverse=True)[:top]:
            print(f"  {cum_us:8.1f} µs  {calls:5.1f} calls/uplink  {name}")


def main() -> None:
    """Check the lean step's interop, time (a), (b), (c), print the figures."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--uplinks", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--profile", type=int, default=10, help="top entries (0: no profile)")
    args = ap.parse_args()

    meters = fleet(args.uplinks)
    checked = check_interop(meters[: min(300, len(meters))])
    print(
        f"interop: {checked} uplinks, lean == aiocoap (inner request, replay window,"
        " answer bytes), answers unprotected by the device's context: ok"
    )
    secrets_ = [open_row(m, sealed_row(m)) for m, _ in meters]
    protected, _ = oscore_datagrams(meters)
    plain = plain_datagrams(meters)
    runs = per_uplink_us(
        {
            "a": (lambda: Server(secrets_), protected),
            "b": (lambda: Server(secrets_), plain),
            "c": (lambda: Server(secrets_, FullOscoreSite), protected),
        },
        args.rounds,
    )
    a_us, b_us, c_us = (min(runs[k]) for k in "abc")
    a_med, b_med, c_med = (statistics.median(runs[k]) for k in "abc")
    saved_med = statistics.median(c - a for a, c in zip(runs["a"], runs["c"], strict=True))
    open_us, build_us = cold_context_us(meters, args.rounds)
    print(f"uplinks={len(meters)} rounds={args.rounds} (best; median in brackets)")
    print(f"(a) collector OSCORE:  {a_us:6.1f} µs/uplink ({a_med:.1f})")
    print(f"(b) plain CoAP:        {b_us:6.1f} µs/uplink ({b_med:.1f})")
    print(f"(c) aiocoap's OSCORE:  {c_us:6.1f} µs/uplink ({c_med:.1f})")
    print(
        f"ratio plain/(a)={b_us / a_us:.2f} plain/(c)={b_us / c_us:.2f}"
        f" saved_by_lean_us={c_us - a_us:.1f} (median of the rounds' own {saved_med:.1f})"
    )
    print(
        f"cold context (per city-day uplink): open sealed row {open_us:.1f} µs,"
        f" build DeviceContext {build_us:.1f} µs"
    )
    if args.profile:
        profile(secrets_, protected, args.profile)


if __name__ == "__main__":
    main()
