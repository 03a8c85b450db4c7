"""OSCORE (RFC 8613) on the collector's side: device contexts, their cache, the site wrapper.

`DeviceContexts` maps a request's kid to its device's context. Contexts come from the
database and are cached; key ids nobody has are cached too (negative cache, bounded,
`unknown_kid_ttl_s`). Lookups are batched: one loader task takes every key id waiting
and loads them in one query, so a flood of unknown key ids costs a query per batch,
not per datagram, and holds at most one pooled connection. Cached entries are dropped
at once when the database announces a change (`invalidate`, from LISTEN
nbmeter_credentials); while that listener is down every entry lives only
`fallback_ttl_s` (see `collector.coap` for the bound this gives).

`OscoreSite` verifies before anything else runs (RFC 8613 §8.2): an OSCORE option that
does not decode → 4.02 Bad Option; no context for the kid → 4.01; a failed decryption
→ 4.00 (§8.2 step 6); a reused sequence number → the answer recorded for that uplink
(`storage.credentials.oscore_answer`), protected with a fresh server sequence number,
or 5.03 + Max-Age if none was recorded yet (the device sends it again as a new
request). A cached window can be behind another process's (processes sharing a port
each cache a context up to `context_ttl_s`): a sequence number it admits is checked
again when its uplink commits, against the answers recorded by every process, and one
recorded already is answered the same way (`ReplayedRequest`), its context reloaded.
NON requests get no error answers. None of these logs a traceback: each is a
counted, rate-limited event (`collector.coap_guard.EventLimiter`).
"""
# aiocoap is untyped (mypy sees its names as Any): the two classes that must subclass
# its bases say so.

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import aiocoap
import structlog
from aiocoap import error, oscore
from aiocoap.message import Direction
from aiocoap.numbers.codes import FETCH, POST
from aiocoap.transports.oscore import OSCOREAddress

from collector import metrics, oscore_lean
from collector.coap_guard import EventLimiter, source_of
from collector.settings import CoapSettings
from collector.uplink import Device
from storage import credentials
from storage.errors import RowRefusedError, StorageError
from storage.notify import CredentialChange
from storage.pool import Pool, connection

log = structlog.get_logger("collector.coap")

_SEQNO_BLOCK = 16  # server sequence numbers taken per database round trip
# the answer to a request of a known context that does not decrypt (its kind of event is
# "oscore_decrypt.failed"), here and in the uplink lane
DECRYPTION_FAILED = "decryption failed"
# CBOR of an Encrypt0 structure before its external AAD: an array of 3, the text
# "Encrypt0", the empty protected header (RFC 8152 §5.3)
_ENCRYPT0_HEAD = b"\x83\x68Encrypt0\x40"


class ContextsUnavailable(Exception):
    """The credentials store cannot be asked right now (or too many lookups wait)."""


_ContextBases = (oscore.CanProtect, oscore.CanUnprotect, oscore.SecurityContextUtils)


class DeviceContext(*_ContextBases):  # type: ignore[misc]  # aiocoap is untyped: Any bases
    """Server side of one device's OSCORE context, rebuilt from its stored secrets.

    The replay window starts from the one persisted with the last committed uplink.
    First answers reuse the request's nonce (RFC 8613 §8.3); a second answer to the same
    request (a retransmission after a crash) needs a sequence number of our own, which
    comes from the database (`grant`), never from memory, so no nonce is used twice.
    """

    def __init__(self, secret: credentials.OscoreSecret) -> None:
        self.alg_aead = oscore.algorithms[oscore.DEFAULT_ALGORITHM]
        self.hashfun = oscore.hashfunctions[oscore.DEFAULT_HASHFUNCTION]
        self.sender_id = secret.sender_id
        self.recipient_id = secret.kid
        self.id_context = None
        if secret.derived is None:
            self.derive_keys(secret.master_salt, secret.master_secret)
        else:  # derived by `derive` when it was provisioned
            self.sender_key, self.recipient_key, self.common_iv = secret.derived
        self.sender_sequence_number = 0
        self._echo_recovery: bytes | None = None  # made when aiocoap's path first asks
        self.recipient_replay_window = oscore.ReplayWindow(oscore.DEFAULT_WINDOWSIZE, _noop)
        if secret.replay_index is None:
            self.recipient_replay_window.initialize_empty()
        else:
            self.recipient_replay_window.initialize_from_persisted(
                {"index": secret.replay_index, "bitfield": secret.replay_bits or 0}
            )
        self.device = Device(
            secret.meter_id,
            secret.tenant_id,
            secret.address,
            secret.meter_format,
            secret.installed_s,
        )
        # staged by a rotate_key beside the current context (migration 0048): a request
        # verified under it confirms it when its uplink commits (`collector.store`)
        self.pending = secret.pending
        self._granted: list[int] = []  # server sequence numbers reserved in the database

    @property
    def echo_recovery(self) -> bytes:
        """aiocoap's Echo value for recovering a replay window (RFC 8613 Appendix B.1.2),
        random per context as aiocoap makes it; made only when its path asks (the lane
        never does), which spares a cold context a getrandom call."""
        if self._echo_recovery is None:
            self._echo_recovery = secrets.token_bytes(8)
        return self._echo_recovery

    @echo_recovery.setter
    def echo_recovery(self, value: bytes) -> None:
        self._echo_recovery = value

    def _construct_nonce(self, partial_iv_short: bytes, piv_generator_id: bytes, alg: Any) -> bytes:
        """The AEAD nonce of RFC 8613 §5.2, the bytes aiocoap's `_construct_nonce` makes
        (tests hold them equal): its layout (the key id's length in the first byte, the
        key id ending 5 bytes before the end, the partial IV in those 5) as integers XORed
        with the common IV, without its byte-by-byte loop and debug formatting.
        ValueError for a partial IV over 5 bytes or a key id over the nonce's room, which
        aiocoap refuses by an assertion only (gone under `python -O`); both of its paths
        (and the lane) answer a ValueError as a message that does not decrypt."""
        n: int = alg.iv_bytes
        if len(partial_iv_short) > 5 or len(piv_generator_id) > n - 6:
            msg = (
                f"no nonce for a {len(partial_iv_short)}-byte partial IV"
                f" and {len(piv_generator_id)}-byte key id"
            )
            raise ValueError(msg)
        nonce = (
            int.from_bytes(self.common_iv[:n], "big")
            ^ len(piv_generator_id) << 8 * (n - 1)
            ^ int.from_bytes(piv_generator_id, "big") << 40
            ^ int.from_bytes(partial_iv_short, "big")
        )
        return nonce.to_bytes(n, "big")

    def request_aad(self, kid: bytes, piv: bytes) -> bytes:
        """The AAD of a request with key id `kid` and partial IV `piv` and no Class I
        options (RFC 8613 §5.4: the Enc_structure ["Encrypt0", h'', external_aad] with
        external_aad = [1, [alg], kid, piv, h'']), the bytes aiocoap's
        `_extract_external_aad` and `_build_encrypt0_structure` make (tests hold them
        equal), as CBOR heads and the two byte strings, not through its CBOR encoder."""
        alg = self.alg_aead.value
        if not 0 <= alg < 24 or len(kid) > 23 or len(piv) > 23:
            external = self._extract_external_aad(
                None, oscore.RequestIdentifiers(kid, piv, True, POST), local_is_sender=False
            )
            built: bytes = oscore.SymmetricEncryptionAlgorithm._build_encrypt0_structure(
                {}, external
            )
            return built
        inner = b"".join(
            (
                b"\x85\x01\x81",
                bytes((alg, 0x40 | len(kid))),
                kid,
                bytes((0x40 | len(piv),)),
                piv,
                b"\x40",
            )
        )
        # (at most 7 + 23 + 23 bytes: a one-byte length after 0x58 past 23)
        head = bytes((0x40 | len(inner),)) if len(inner) < 24 else bytes((0x58, len(inner)))
        return _ENCRYPT0_HEAD + head + inner

    def grant(self, last: int, count: int) -> None:
        """Sequence numbers last-count+1 .. last were reserved for us in the database."""
        self._granted = list(range(last - count + 1, last + 1))

    def has_grant(self) -> bool:
        """True when a reserved sequence number is left."""
        return bool(self._granted)

    def new_sequence_number(self) -> int:
        """A reserved sequence number; refuse when none is left (never invent one)."""
        if not self._granted:
            raise oscore.ContextUnavailable("no server sequence number reserved")
        return self._granted.pop(0)

    def post_seqnoincrease(self) -> None:
        """Nothing to persist: numbers are reserved in the database before use."""

    def replay_state(self) -> tuple[int, int, int]:
        """(meter_id, index, bits) of the replay window, to persist with the uplink."""
        state = self.recipient_replay_window.persist()
        return self.device.meter_id, int(state["index"]), int(state["bitfield"])


def _noop() -> None:
    return None


# who waits for a key id's context: an awaiting request's future (`wanted`), or the
# uplink lane's callback (`when_loaded`), called when the loading ends, however it ended
_ContextWaiter = asyncio.Future[None] | Callable[[], None]


def _wake(waiters: Iterable[_ContextWaiter], exc: Exception | None = None) -> None:
    for waiter in waiters:
        if not isinstance(waiter, asyncio.Future):
            try:
                waiter()
            except Exception:  # a bug in one caller: the others still get theirs
                log.exception("oscore_context.waiter_failed")
        elif waiter.done():
            continue
        elif exc is None:
            waiter.set_result(None)
        else:
            waiter.set_exception(exc)
            waiter.exception()  # retrieved: nobody may be awaiting it any more


class DeviceContexts:
    """OSCORE contexts by kid: cached, negatively cached, loaded in batches, invalidated."""

    def __init__(self, pool: Pool, key: bytes | None, settings: CoapSettings) -> None:
        self._pool = pool
        self._key = key
        self._s = settings
        self._cache: OrderedDict[bytes, tuple[DeviceContext, float]] = OrderedDict()
        self._unknown: OrderedDict[bytes, float] = OrderedDict()
        # per key id being loaded, who waits: a future per awaiting request (awaited
        # directly: a cancelled request cancels its own, no shield per uplink keeps the
        # others' alive) or the lane's callback per uplink
        self._waiting: dict[bytes, list[_ContextWaiter]] = {}
        self._wakeup = asyncio.Event()
        self._loader: asyncio.Task[None] | None = None
        self._generation = 0  # bumped by every invalidation
        self._flooded = False  # the last lookup found a quarter of its key ids unknown
        self.listening = False
        self._answers: OrderedDict[tuple[bytes, int], tuple[str, str, str]] = OrderedDict()

    @property
    def ttl_s(self) -> float:
        """How long a loaded context is used: long while changes arrive by LISTEN."""
        return self._s.context_ttl_s if self.listening else self._s.context_fallback_ttl_s

    async def load(self, kid: bytes | None) -> None:
        """Make sure `kid` is cached (or known unknown); ContextsUnavailable if we can't ask."""
        if kid is None:
            return
        future = self.wanted(kid)
        if future is not None:
            await future

    def peek(self, kid: bytes) -> DeviceContext | None:
        """`kid`'s cached context while it is fresh; None otherwise (not looked up)."""
        hit = self._cache.get(kid)
        return hit[0] if hit is not None and hit[1] > time.monotonic() else None

    def wanted(self, kid: bytes) -> asyncio.Future[None] | None:
        """None when `kid` is cached (or known unknown); else the future of its loading,
        done when it is (`peek` then tells). ContextsUnavailable if we can't ask."""
        if not self._must_load(kid):
            return None
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._wait(kid, future)
        return future

    def when_loaded(self, kid: bytes, callback: Callable[[], None]) -> bool:
        """`wanted` for a caller that would rather be called than await (the uplink lane:
        no future and no loop turn per uplink). False when `kid` is cached (or known
        unknown); else True, and `callback()` runs in the loader once `kid`'s loading
        ends, however it ended (`peek` then tells). ContextsUnavailable if we can't ask."""
        if not self._must_load(kid):
            return False
        self._wait(kid, callback)
        return True

    def _must_load(self, kid: bytes) -> bool:
        if self._key is None or self.peek(kid) is not None:
            return False
        gone = self._unknown.get(kid)
        return gone is None or gone <= time.monotonic()

    def _wait(self, kid: bytes, waiter: _ContextWaiter) -> None:
        waiting = self._waiting.get(kid)
        if waiting is None:
            if len(self._waiting) >= self._s.lookup_max_pending:
                raise ContextsUnavailable("too many key ids waiting for the database")
            self._waiting[kid] = [waiter]
            self._wakeup.set()
            if self._loader is None or self._loader.done():
                self._loader = asyncio.create_task(self._load_batches(), name="oscore-loader")
        else:
            waiting.append(waiter)

    async def _load_batches(self) -> None:
        try:
            await self._load_forever()
        except Exception as exc:  # a bug: fail the waiting requests (5.03), never hang them
            log.exception("oscore_context.loader_failed")
            waiting, self._waiting = self._waiting, {}
            for waiters in waiting.values():
                _wake(waiters, ContextsUnavailable(str(exc)))

    async def _load_forever(self) -> None:
        key = self._key
        if key is None:  # load() queues no key id without a credentials key
            return
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._waiting:
                if len(self._waiting) < self._s.lookup_batch_max:
                    # one loop turn (what is ready queues its key ids too); while key ids
                    # come back unknown, a pause for more: one query serves a flood's batch
                    await asyncio.sleep(self._s.lookup_gather_s if self._flooded else 0)
                kids = list(self._waiting)[: self._s.lookup_batch_max]
                generation = self._generation
                try:
                    async with connection(
                        self._pool, "loading OSCORE contexts", timeout_s=5.0
                    ) as conn:
                        found, bad = await credentials.load_oscore_many(conn, key, kids)
                except StorageError as exc:
                    log.warning("oscore_context.unavailable", error=str(exc), kids=len(kids))
                    for kid in kids:
                        _wake(self._waiting.pop(kid), ContextsUnavailable(str(exc)))
                    continue
                metrics.OSCORE_LOOKUPS.inc()
                metrics.OSCORE_LOOKUP_KIDS.inc(len(kids))
                for meter_id in bad:
                    log.error("oscore_context.unopenable", meter_id=meter_id)
                # a quarter or more unknown: made-up key ids, not a fleet's (see the pause)
                self._flooded = 4 * (len(kids) - len(found) - len(bad)) >= len(kids)
                if generation != self._generation:
                    continue  # a change was announced meanwhile: what we read may be old
                self._store(kids, found)

    def _store(self, kids: list[bytes], found: dict[bytes, credentials.OscoreSecret]) -> None:
        now = time.monotonic()
        fresh_until = now + self.ttl_s
        for kid in kids:
            secret = found.get(kid)
            if secret is None:
                self._unknown[kid] = now + self._s.unknown_kid_ttl_s
                self._unknown.move_to_end(kid)
                while len(self._unknown) > self._s.unknown_kid_max:
                    self._unknown.popitem(last=False)
            else:
                self._cache[kid] = (DeviceContext(secret), fresh_until)
                self._cache.move_to_end(kid)
                while len(self._cache) > self._s.context_cache_max:
                    self._cache.popitem(last=False)
            _wake(self._waiting.pop(kid, ()))

    def find_oscore(self, unprotected: dict[int, Any]) -> DeviceContext:
        """The cached context for the request's kid; KeyError when there is none."""
        hit = self._cache.get(unprotected.get(oscore.COSE_KID, b""))
        if hit is None:
            raise KeyError
        return hit[0]

    def invalidate(self, change: CredentialChange | None, cause: str = "notify") -> None:
        """Drop what `change` names (None: everything) from both caches."""
        self._generation += 1
        if change is None:
            dropped = len(self._cache) + len(self._unknown)
            self._cache.clear()
            self._unknown.clear()
            self._answers.clear()
        else:
            gone = set(change.kids)
            gone.update(
                k for k, (c, _) in self._cache.items() if c.device.meter_id == change.meter_id
            )
            dropped = 0
            for kid in gone:
                dropped += (self._cache.pop(kid, None) is not None) + (
                    self._unknown.pop(kid, None) is not None
                )
            for key in [k for k in self._answers if k[0] in gone]:
                del self._answers[key]
        metrics.OSCORE_INVALIDATIONS.labels(cause).inc(dropped)

    def forget(self, ctx: DeviceContext) -> None:
        """Drop `ctx` from the cache (its replay window is stale): the next request of its
        kid loads it again, with the window persisted in the database."""
        hit = self._cache.get(ctx.recipient_id)
        if hit is not None and hit[0] is ctx:
            del self._cache[ctx.recipient_id]
            metrics.OSCORE_INVALIDATIONS.labels("replay").inc()

    def set_listening(self, listening: bool, cause: str) -> None:
        """Switch between the long and the short TTL; drop everything either way."""
        self.listening = listening
        metrics.CREDENTIALS_LISTENING.set(int(listening))
        self.invalidate(None, cause)

    async def recorded_answer(self, ctx: DeviceContext, piv: int) -> tuple[str, str, str] | None:
        """The outcome recorded for `ctx`'s uplink with sequence number `piv` (cached)."""
        key = (ctx.recipient_id, piv)
        hit = self._answers.get(key)
        if hit is None:
            async with connection(self._pool, "reading a recorded answer", timeout_s=5.0) as conn:
                hit = await credentials.oscore_answer(conn, ctx.recipient_id, piv)
            if hit is None:
                return None
            self._answers[key] = hit
            while len(self._answers) > 10_000:
                self._answers.popitem(last=False)
        return hit

    async def reserve_seqno(self, ctx: DeviceContext) -> bool:
        """Make sure `ctx` holds a server sequence number; False if its context is gone."""
        if ctx.has_grant():
            return True
        async with connection(self._pool, "reserving sequence numbers", timeout_s=5.0) as conn:
            last = await credentials.next_server_seqno(
                conn, ctx.device.meter_id, ctx.recipient_id, _SEQNO_BLOCK
            )
        if last is None:
            return False
        ctx.grant(last, _SEQNO_BLOCK)
        return True

    def close(self) -> None:
        """Stop the loader task."""
        if self._loader is not None:
            self._loader.cancel()


class ReplayedRequest(Exception):  # a signal to OscoreSite, not a failure
    """Raised by a resource whose uplink's sequence number turned out, at commit, to have
    been admitted before (`storage.credentials.save_replay_windows`): OscoreSite answers
    it as a replay (the recorded answer with a fresh sequence number of ours)."""


class Busy(error.ConstructionRenderableError):  # type: ignore[misc]  # aiocoap untyped: Any base
    """5.03 Service Unavailable with a Max-Age telling the device when to retry."""

    code = aiocoap.SERVICE_UNAVAILABLE

    def __init__(self, max_age_s: int, message: str = "busy, retry after Max-Age") -> None:
        super().__init__(message)
        self.max_age_s = max_age_s

    def to_message(self) -> aiocoap.Message:
        """The 5.03 response with its Max-Age option."""
        msg = super().to_message()
        msg.opt.max_age = self.max_age_s
        return msg


@contextlib.contextmanager
def storage_answers(busy_s: int) -> Iterator[None]:
    """A CoAP request's storage errors as its answer: values the database refuses as sent
    4.00 (sent again, refused again: never "busy"), anything else 5.03 + Max-Age (the
    database away: retry later)."""
    try:
        yield
    except RowRefusedError as exc:
        raise error.BadRequest("the database refuses this request's values") from exc
    except StorageError as exc:
        raise Busy(busy_s, "database unavailable") from exc


class OscoreSite:
    """The outermost resource: OSCORE verified first, then the inner site (see module doc)."""

    # the common case's unprotect; None sends every request through aiocoap's (a bench
    # compares the two: bench/oscore_path.py)
    lean_unprotect = staticmethod(oscore_lean.unprotect)
    uplinks: Any = None  # the /u resource (collector.coap.UplinkResource), for its lane

    def __init__(
        self,
        inner: Any,
        contexts: DeviceContexts,
        settings: CoapSettings,
        events: EventLimiter,
        answer: Any,
    ) -> None:
        self._inner = inner
        self.contexts = contexts
        self._busy_s = settings.busy_max_age_s
        self._events = events
        self._answer = answer  # (status, reason, detail) -> the plain answer message

    def get_resources_as_linkheader(self) -> Any:
        """The inner site's resources (for /.well-known/core)."""
        return self._inner.get_resources_as_linkheader()

    async def render(self, request: aiocoap.Message) -> Any:
        """Unused: aiocoap calls `render_to_pipe`."""
        raise error.MethodNotAllowed

    async def needs_blockwise_assembly(self, request: aiocoap.Message) -> bool:
        """Unused: aiocoap calls `render_to_pipe`."""
        return False

    async def render_to_pipe(self, pipe: Any) -> None:
        """Answer one request; an unexpected error is a 5.00 for it alone, logged rarely."""
        try:
            await self._render(pipe)
        except error.RenderableError:
            raise
        except Exception as exc:  # a bug: this request only; never a traceback per datagram
            self._events.note(
                "coap.render_failed", exc_info=exc, peer=source_of(pipe.request.remote)
            )
            raise error.InternalServerError("internal error") from None

    async def _render(self, pipe: Any) -> None:
        request = pipe.request
        con = request.mtype == aiocoap.CON
        try:
            unprotected = oscore.verify_start(request)
        except oscore.NotAProtectedMessage:
            await self._inner.render_to_pipe(pipe)
            return
        except Exception:  # DecodeError, or an index past a truncated option
            self._events.note("oscore_option.rejected", peer=source_of(request.remote))
            if con:
                raise error.BadOption("the OSCORE option does not decode") from None
            return
        if request.code not in (FETCH, POST):
            raise error.MethodNotAllowed
        try:
            await self.contexts.load(unprotected.get(oscore.COSE_KID))
        except ContextsUnavailable:
            raise Busy(self._busy_s, "credentials store unavailable") from None
        try:
            sc = self.contexts.find_oscore(unprotected)
        except KeyError:
            self._events.note("oscore_kid.refused", peer=source_of(request.remote))
            if con:
                raise error.Unauthorized("security context not found") from None
            return
        try:
            # the common case from aiocoap's pieces (`collector.oscore_lean`); the rest,
            # replays included, through aiocoap's own unprotect
            lean = self.lean_unprotect(sc, request)
            inner_request, request_id = sc.unprotect(request) if lean is None else lean
        except oscore.ReplayError:
            # decrypted first (echo_recovery is set), so this is the device's own message
            if con:
                await self._answer_replay(pipe, sc, request, unprotected)
            return
        except oscore.DecodeError:
            self._events.note("oscore_option.rejected", peer=source_of(request.remote))
            if con:
                raise error.BadOption("the OSCORE message does not decode") from None
            return
        except (oscore.ProtectionInvalid, error.UnparsableMessage, ValueError):
            self._events.note("oscore_decrypt.failed", peer=source_of(request.remote))
            if con:
                raise error.BadRequest(DECRYPTION_FAILED) from None
            return
        inner_request.remote = OSCOREAddress(sc, request.remote)
        inner_request.nbm_piv = int.from_bytes(unprotected[oscore.COSE_PIV], "big")
        try:
            await self._render_inner(pipe, sc, inner_request, request_id)
        except ReplayedRequest:
            # admitted before by another process (counted as uplinks{outcome="replayed"}):
            # this process's cached window is behind the database's, so the context is
            # loaded again for the next request, and this one is answered as the replay
            # it is (RFC 8613 §7.4: never processed as new; §7.5.1: no second first answer)
            self.contexts.forget(sc)
            if request.mtype == aiocoap.CON:
                await self._answer_replay(pipe, sc, request, unprotected)

    async def _render_inner(
        self, pipe: Any, sc: DeviceContext, inner_request: aiocoap.Message, request_id: Any
    ) -> None:
        # the inner site renders in this task: aiocoap's own way (a pipe, a task driving
        # it and an error-to-message pipe per request) cost a task and three pipe events
        # per uplink for the same answers
        def send(message: aiocoap.Message, is_last: bool) -> None:
            if not is_last:
                message.opt.observe = 0
            if isinstance(request_id, oscore_lean.LeanRequest):
                protected = oscore_lean.protect(sc, message, request_id)
            else:
                protected, _ = sc.protect(message, request_id)
            pipe.add_response(protected, is_last=is_last)

        inner = _InnerPipe(inner_request, send)
        try:
            await self._inner.render_to_pipe(inner)
        except ReplayedRequest:
            raise
        except error.RenderableError as exc:
            inner.add_response(exc.to_message(), is_last=True)
        except Exception as exc:  # a bug: this request's 5.00, logged rarely
            self._events.note("coap.render_failed", exc_info=exc)
            inner.add_response(aiocoap.Message(code=aiocoap.INTERNAL_SERVER_ERROR), is_last=True)

    async def _answer_replay(
        self, pipe: Any, sc: DeviceContext, request: aiocoap.Message, unprotected: dict[int, Any]
    ) -> None:
        """A reused sequence number: the recorded answer again, or 5.03 (see module doc)."""
        piv_bytes = unprotected[oscore.COSE_PIV]
        piv = int.from_bytes(piv_bytes, "big")
        try:
            recorded = await self.contexts.recorded_answer(sc, piv)
            if recorded is not None and not await self.contexts.reserve_seqno(sc):
                recorded = None
        except StorageError as exc:
            raise Busy(self._busy_s, "credentials store unavailable") from exc
        if recorded is None:
            metrics.REPLAY_ANSWERS.labels("busy").inc()
            self._events.note("oscore_replay.deferred", peer=source_of(request.remote))
            raise Busy(self._busy_s, "sequence number in use; send it again as a new request")
        metrics.REPLAY_ANSWERS.labels("recorded").inc()
        message = self._answer(*recorded)
        message.direction = Direction.OUTGOING
        # can_reuse_nonce=False: this is a second answer, so a fresh sequence number of ours
        request_id = oscore.RequestIdentifiers(sc.recipient_id, piv_bytes, False, request.code)
        protected, _ = sc.protect(message, request_id)
        pipe.add_response(protected, is_last=True)


class _InnerPipe:
    """What aiocoap's Site and Resource use of a pipe (the request, `add_response`): the
    decrypted request in, each answer out to `send` (protected there), none after the last."""

    def __init__(self, request: aiocoap.Message, send: Any) -> None:
        self.request = request
        self._send = send
        self._done = False

    def add_response(self, response: aiocoap.Message, is_last: bool = False) -> None:
        """Protect and pass on `response` (once the last one went, ignore the rest)."""
        if self._done:
            return
        self._done = is_last
        self._send(response, is_last)
