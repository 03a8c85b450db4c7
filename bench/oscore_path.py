"""CPU per uplink of the CoAP server path, in process: OSCORE as the collector runs it, plain
CoAP, and a lean OSCORE path built from aiocoap's own primitives.

    .venv/bin/python bench/oscore_path.py [--uplinks 3000] [--rounds 5] [--profile 10]
        [--cityday-plain-us 530] [--cityday-oscore-us 818]

No network, no database: every figure is `time.process_time` over `--uplinks` datagrams
(best of `--rounds`), so it holds on a loaded machine. The uplinks are a city day's mix
(`bench/cityday.py`): 60% nbm1 interval batches (24 readings), 30% SenML packs (24
registers), 10% CJ/T 188 frames, each meter with its own OSCORE context as provisioning
makes it (derived keys stored with the secrets; the device's side is the simulator's
aiocoap context). Each path goes from datagram bytes to answer bytes, through the same
`/u` resource (`collector.coap.UplinkResource`, its pipeline answering "stored" at once):

(a) collector: `Message.decode`, then `collector.coap_oscore.OscoreSite` (verify_start,
    context cache, aiocoap's `unprotect`, the inner site, aiocoap's `protect`), the
    answer encoded as a piggybacked ACK;
(b) plain: the same with a plain-CoAP uplink of a lab tenant (`?t=lab`) through the same
    `OscoreSite`, which hands it to the inner site;
(c) lean: `LeanOscoreSite`, the collector's site with unprotect/protect done from
    aiocoap's lowest-level pieces (its option decompression, external AAD, nonce
    construction, replay window and the context's AEAD algorithm object): no message
    copies, no eager debug formatting, the AAD and nonce of the request reused for the
    answer (RFC 8613 §8.3: a first answer reuses the request's nonce). Anything but the
    common case (a replay, a kid context, a group message, a second answer) goes to
    aiocoap's full path.

What aiocoap's transport does around that (deduplication, tokens, the pipe's task) is
the same for all three and not included. Before anything is timed, every uplink goes
through (a) and (c) on separate contexts: the inner requests must be equal, the answers
byte-identical, and the device's aiocoap context must unprotect each answer.

Printed: µs per uplink for (a), (b), (c) and the ratios plain/(a), plain/(c); the cost
of a cold context (a city-day uplink meets one: unseal, parse, build) and of waiting for
the downlink claim an OSCORE uplink's answer makes (two ways); a projection onto
the collector's whole path from `bench/cityday.py`'s CPU per uplink (defaults: 530 µs
plain, 818 µs OSCORE), and a one-line decision. With `--profile N`: the top N
cumulative entries of (a) under cProfile, ours and aiocoap's apart.
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
from aiocoap.numbers.codes import FETCH, POST
from aiocoap.transports.oscore import OSCOREAddress
from aiocoap.transports.udp6 import UDP6EndpointAddress

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # ahead of bench/, whose collector.py is not the package

from collector.coap import TenantDirectory, UplinkResource, _recorded_response  # noqa: E402
from collector.coap_guard import EventLimiter  # noqa: E402
from collector.coap_oscore import (  # noqa: E402
    DeviceContext,
    DeviceContexts,
    OscoreSite,
    ReplayedRequest,
    _InnerPipe,
)
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


# --- the lean path -------------------------------------------------------------------


class LeanRequest:
    """What the lean unprotect keeps for the answer: the context, the request's
    identifiers (aiocoap's, so the nonce is reused once only), its AAD and nonce."""

    __slots__ = ("aad", "ctx", "nonce", "request_id")

    def __init__(self, ctx: DeviceContext, request_id: Any, aad: bytes, nonce: bytes) -> None:
        self.ctx, self.request_id, self.aad, self.nonce = ctx, request_id, aad, nonce


def lean_unprotect(contexts: DeviceContexts, request: aiocoap.Message) -> Any:
    """(inner request, LeanRequest, partial IV) of an OSCORE request in the common case;
    None when aiocoap's full path must decide (no context, replay, kid context, group
    flag, no partial IV). Raises oscore.ProtectionInvalid when decryption fails."""
    option = request.opt.oscore
    if option is None or request.code not in (POST, FETCH):
        return None
    _, _, unprotected, ciphertext = oscore.CanUnprotect._uncompress(option, request.payload)
    kid = unprotected.pop(oscore.COSE_KID, None)
    piv = unprotected.pop(oscore.COSE_PIV, None)
    if kid is None or piv is None or unprotected:  # a kid context or a countersignature
        return None
    try:
        ctx = contexts.find_oscore({oscore.COSE_KID: kid})
    except KeyError:
        return None
    alg = ctx.alg_aead
    seqno = int.from_bytes(piv, "big")
    window = ctx.recipient_replay_window
    if ctx.id_context is not None or not window.is_initialized() or not window.is_valid(seqno):
        return None
    if len(ciphertext) < alg.tag_bytes + 1:
        raise oscore.ProtectionInvalid("Ciphertext too short")
    request_id = oscore.RequestIdentifiers(kid, piv, True, request.code)
    external_aad = ctx._extract_external_aad(request, request_id, local_is_sender=False)
    aad = oscore.SymmetricEncryptionAlgorithm._build_encrypt0_structure({}, external_aad)
    nonce = ctx._construct_nonce(piv, kid, alg)
    plaintext = alg.decrypt(ciphertext, aad, ctx.recipient_key, nonce)
    window.strike_out(seqno)
    inner = aiocoap.Message(code=plaintext[0])
    inner.payload = inner.opt.decode(plaintext[1:])
    inner.direction = Direction.INCOMING
    if request.opt.observe != 0:
        inner.opt.observe = None
    return inner, LeanRequest(ctx, request_id, aad, nonce), seqno


def lean_protect(answer: aiocoap.Message, lean: LeanRequest) -> aiocoap.Message:
    """The protected form of the first answer to `lean`'s request (the request's nonce and
    AAD: RFC 8613 §8.3); a later answer goes to aiocoap's `protect` (a fresh one of ours)."""
    ctx, request_id = lean.ctx, lean.request_id
    if not request_id.can_reuse_nonce:
        return ctx.protect(answer, request_id)[0]
    request_id.get_reusable_kid_and_piv()  # aiocoap's flag: this nonce is now used
    plaintext = bytes([answer.code]) + answer.opt.encode()
    if answer.payload:
        plaintext += b"\xff" + answer.payload
    outer = aiocoap.Message(code=request_id.code_style.response)
    outer.direction = Direction.OUTGOING
    outer.transport_tuning = answer.transport_tuning
    outer.opt.oscore = b""  # no partial IV, no kid: the request's nonce (RFC 8613 §6.1)
    outer.payload = ctx.alg_aead.encrypt(plaintext, lean.aad, ctx.sender_key, lean.nonce)
    return outer


class LeanOscoreSite(OscoreSite):
    """The collector's `OscoreSite` with the lean unprotect/protect in front (bench only:
    not wired into the collector)."""

    async def _render(self, pipe: Any) -> None:
        request = pipe.request
        try:
            got = lean_unprotect(self.contexts, request)
        except (oscore.ProtectionInvalid, ValueError):
            got = None  # aiocoap's path answers it (4.00), with its events and metrics
        if got is None:
            await super()._render(pipe)
            return
        inner_request, lean, seqno = got
        inner_request.remote = OSCOREAddress(lean.ctx, request.remote)
        inner_request.nbm_piv = seqno
        try:
            await self._render_inner(pipe, lean.ctx, inner_request, lean)
        except ReplayedRequest:  # as OscoreSite._render: admitted before by another process
            self.contexts.forget(lean.ctx)
            if request.mtype == aiocoap.CON:
                piv = {oscore.COSE_PIV: lean.request_id.partial_iv}
                await self._answer_replay(pipe, lean.ctx, request, piv)

    async def _render_inner(self, pipe: Any, sc: Any, inner_request: Any, request_id: Any) -> None:
        if not isinstance(request_id, LeanRequest):
            await super()._render_inner(pipe, sc, inner_request, request_id)
            return
        lean = request_id

        def send(message: aiocoap.Message, is_last: bool) -> None:
            if not is_last:
                message.opt.observe = 0
            pipe.add_response(lean_protect(message, lean), is_last=is_last)

        inner = _InnerPipe(inner_request, send)
        try:
            await self._inner.render_to_pipe(inner)
        except ReplayedRequest:
            raise
        except aiocoap.error.RenderableError as exc:
            inner.add_response(exc.to_message(), is_last=True)


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
    full, lean = Server(secrets_), Server(secrets_, LeanOscoreSite)
    datagrams, clients = oscore_datagrams(meters)
    try:
        for datagram, (client, request_id), (meter, body) in zip(
            datagrams, clients, meters, strict=True
        ):
            request = aiocoap.Message.decode(datagram, REMOTE)
            got = lean_unprotect(lean.contexts, request)
            assert got is not None, f"meter {meter.meter_id}: lean path declined a fresh uplink"
            inner_lean, lean_req, _ = got
            sc = full.contexts.find_oscore(oscore.verify_start(request))
            inner_full, _ = sc.unprotect(aiocoap.Message.decode(datagram, REMOTE))
            assert inner_lean.code == inner_full.code, meter
            assert inner_lean.opt.encode() == inner_full.opt.encode(), meter
            assert inner_lean.payload == inner_full.payload == body, meter
            ctx_lean = lean.contexts.find_oscore({oscore.COSE_KID: meter.kid})
            assert ctx_lean.replay_state() == sc.replay_state(), meter
            # whole uplinks, each on a fresh pair of contexts (the checks above used them)
            one = [open_row(meter, sealed_row(meter))]
            a, c = Server(one), Server(one, LeanOscoreSite)
            answer_a, answer_c = uplink(a.site, datagram), uplink(c.site, datagram)
            a.close()
            c.close()
            assert answer_a == answer_c, f"meter {meter.meter_id}: answers differ"
            reply, _ = client.unprotect(aiocoap.Message.decode(answer_c), request_id)
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


def claim_wait_us(n: int, rounds: int) -> tuple[float, float]:
    """(before, after) CPU µs per uplink of waiting for a downlink claim (`collector.downlink`,
    which every OSCORE uplink's 2.04 makes, plain CoAP's none): a task per uplink awaiting
    its future, resolved a hundred at a time as the claim's flush does, through
    `wait_for(shield(future), 5)` (before) or plainly (after: one timeout per flush)."""

    async def run(shielded: bool) -> float:
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[bytes]] = []

        async def wait() -> bytes:
            future: asyncio.Future[bytes] = loop.create_future()
            futures.append(future)
            if shielded:
                return await asyncio.wait_for(asyncio.shield(future), 5.0)
            return await future

        t0 = time.process_time()
        for _ in range(max(n // 100, 1)):
            tasks = [loop.create_task(wait()) for _ in range(100)]
            await asyncio.sleep(0)
            for future in futures:
                future.set_result(b"")
            futures.clear()
            await asyncio.gather(*tasks)
        return (time.process_time() - t0) / (max(n // 100, 1) * 100) * 1e6

    before = min(asyncio.run(run(True)) for _ in range(rounds))
    after = min(asyncio.run(run(False)) for _ in range(rounds))
    return before, after


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
    """Check the lean path's interop, time (a), (b), (c), print the decision."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--uplinks", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--profile", type=int, default=10, help="top entries (0: no profile)")
    ap.add_argument("--cityday-plain-us", type=float, default=530.0)
    ap.add_argument("--cityday-oscore-us", type=float, default=818.0)
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
            "c": (lambda: Server(secrets_, LeanOscoreSite), protected),
        },
        args.rounds,
    )
    a_us, b_us, c_us = (min(runs[k]) for k in "abc")
    a_med, b_med, c_med = (statistics.median(runs[k]) for k in "abc")
    saved_med = statistics.median(a - c for a, c in zip(runs["a"], runs["c"], strict=True))
    open_us, build_us = cold_context_us(meters, args.rounds)
    print(f"uplinks={len(meters)} rounds={args.rounds} (best; median in brackets)")
    print(f"(a) collector OSCORE: {a_us:6.1f} µs/uplink ({a_med:.1f})")
    print(f"(b) plain CoAP:       {b_us:6.1f} µs/uplink ({b_med:.1f})")
    print(f"(c) lean OSCORE:      {c_us:6.1f} µs/uplink ({c_med:.1f})")
    print(
        f"ratio plain/(a)={b_us / a_us:.2f} plain/(c)={b_us / c_us:.2f}"
        f" saved_by_lean_us={a_us - c_us:.1f} (median of the rounds' own {saved_med:.1f})"
    )
    print(
        f"cold context (per city-day uplink): open sealed row {open_us:.1f} µs,"
        f" build DeviceContext {build_us:.1f} µs"
    )
    before, after = claim_wait_us(len(meters), args.rounds)
    print(
        f"downlink claim wait per OSCORE uplink (task included): wait_for+shield {before:.1f}"
        f" µs, plain await {after:.1f} µs (collector.downlink before/after this branch)"
    )
    plain_full, oscore_full = args.cityday_plain_us, args.cityday_oscore_us
    saved_lean, saved_claim = a_us - c_us, before - after
    now = plain_full / oscore_full
    lean = plain_full / (oscore_full - saved_lean)
    both = plain_full / (oscore_full - saved_lean - saved_claim)
    ceiling = plain_full / (oscore_full - (a_us - b_us) - saved_claim)
    print(
        f"collector projection (cityday before this branch: plain {plain_full:.0f} µs, OSCORE"
        f" {oscore_full:.0f} µs): plain/OSCORE CPU now {now:.2f}, with the lean path {lean:.2f},"
        f" with the lean path and the claim fix {both:.2f}; ceiling {ceiling:.2f} (OSCORE's"
        " whole in-process path at plain's cost, and the claim fix)"
    )
    if lean >= 0.8:
        verdict = "the lean path alone reaches 0.8x: wire it after review"
    elif both >= 0.8:
        verdict = "the lean path reaches 0.8x only with the claim fix: wire it after review"
    else:
        verdict = (
            "the lean path does not reach 0.8x: most of the gap is outside protect/unprotect"
            " (context loads, command claims, replay persistence): do not wire it for this"
        )
    print(
        f"decision: {verdict} (lean saves {saved_lean:.0f} µs, the claim fix {saved_claim:.0f},"
        f" of the {oscore_full - plain_full:.0f} µs OSCORE costs over plain)"
    )
    if args.profile:
        profile(secrets_, protected, args.profile)


if __name__ == "__main__":
    main()
