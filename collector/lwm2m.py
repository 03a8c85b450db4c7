"""LwM2M 1.1 server side on the collector's CoAP endpoint: /rd, /dp, Queue Mode delivery.

Mounted by `collector.coap.build_site` next to /u, behind the same OSCORE verifier:

- Registration interface (LwM2M 1.1 §6.2): `POST /rd?ep=<name>&lt=<s>&lwm2m=1.1&b=U&Q`
  (a 1.0-style `b=UQ` means Queue Mode too) → 2.01 Created, Location-Path `rd/<id>`;
  `POST /rd/<id>` Update → 2.04; `DELETE /rd/<id>` De-register → 2.02. Stored by
  `storage.lwm2m` with lifetime, binding, queue mode and the peer's address; a
  registration past its lifetime is ignored (4.04: register again).
- Identity (as for /u): over OSCORE the endpoint name must be the context's meter
  address (else 4.03), and Update/De-register/Send act only on that meter's
  registration. Plain CoAP (lab tenants only): the endpoint name must be an active meter
  of a tenant that allows plain CoAP (`&t=<slug>` narrows it; 4.04 otherwise); the
  registration id (random, 64 bits) is the client's capability for Update/De-register,
  and a Send is matched to the registration last updated from its source address. A
  lab client is not authenticated: it can register as any meter of a lab tenant, which
  is what a lab tenant allows for /u too.
- Send (§6.4.1): `POST /dp`, SenML CBOR (112) or JSON (110) → the same pipeline as /u
  (ack after commit, dedup, quarantine), as the registered meter (`Device`), so a pack
  naming another meter is quarantined `identity_mismatch`. Bare object paths (`/3424/0/1`)
  get the endpoint name as base name first (`decoder.lwm2m.with_endpoint`). Objects 3/4
  fill `device_health` through the SenML decoder. Answers as /u: 2.04, 4.xx, 5.03.
- Queue Mode delivery (§6.5): mailbox commands wait while the client sleeps. After each
  Register, Update or stored Send, the meter's pending commands are claimed
  (`storage.mailbox.claim`, they become `sent`) and go out as server-initiated CON
  requests (Write = PUT, Execute = POST, Read = GET; `decoder.lwm2m.operations`) from the
  server's own socket to the address the message came from. A 2.xx answer to every
  operation of a command acknowledges it, a 4.xx/5.xx fails it (result: each operation's
  code; a Read's result has the content too, `decoder.lwm2m.read_content`); a
  command the client cannot take (no such object) fails without being sent; no answer
  leaves it `sent`, to go out again in the next window (every operation is idempotent).
  One delivery per meter at a time. Over OSCORE each request is protected with the
  device's context (server sequence numbers reserved in the database first) and its
  answer verified with it.
- Information Reporting (§6.4, RFC 7641): after each Register (the client has dropped
  its observations then), and after an Update when this process has no observation of
  the meter (the last one failed, or the collector restarted), the server observes the
  meter object, `GET /3424` with Observe 0 and Accept SenML CBOR, in the same window.
  The first answer and every notification go through the pipeline as a Send does (same
  identity, same dedup: a notification repeated stores nothing new), as long as the
  registration they belong to is open; a new Register or a De-register ends the
  observation. A notification is ACKed by the
  CoAP layer before it is stored, so it is kept whatever the load: it passes the
  pipeline's bound, and while the database is away it is stored as the meter of the
  registration its observation was set up under, once the database is back. Those that
  arrive while one is being stored wait in order (`collector.notifications`; aiocoap's
  own iterator would keep only the latest), up to 64. Only one arriving while the
  collector shuts down is lost (logged); the meter's cumulative register comes again
  with the next. Plain CoAP clients
  only for now: an OSCORE notification would need the device's replay window per
  notification, which this module does not keep.
"""
# aiocoap is untyped (as in collector.coap)
# mypy: disable-error-code="no-untyped-call,misc,no-any-return"

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Coroutine, Iterator
from typing import Any, Final

import aiocoap
import structlog
from aiocoap import error, oscore, resource

from collector import metrics
from collector.coap import TenantDirectory, UplinkResource, _peer, response
from collector.coap_guard import EventLimiter
from collector.coap_oscore import DeviceContext, storage_answers
from collector.downlink import Downlinks
from collector.notifications import Notifications
from collector.pipeline import Pipeline, PipelineClosed
from collector.settings import CoapSettings
from collector.uplink import Device, Transport, Uplink
from decoder.commands import DeviceResult
from decoder.lwm2m import (
    SENML_CBOR,
    SENML_JSON,
    objects_of,
    operations,
    read_content,
    registration_params,
    with_endpoint,
)
from storage import credentials, lwm2m, mailbox
from storage.errors import StorageError
from storage.pool import Pool, connection

log = structlog.get_logger("collector.lwm2m")

_METHODS: Final = {"PUT": aiocoap.Code.PUT, "POST": aiocoap.Code.POST, "GET": aiocoap.Code.GET}
VALUE_OBJECT: Final = 3424  # OMA water meter: observed after each Register
OP_TIMEOUT_S: Final = 15.0  # a sleeping client's window is 10-20 s: give up, try next window
_SEQNO_BLOCK: Final = 16  # server OSCORE sequence numbers reserved per database round trip


def _context_of(remote: Any) -> Any:
    """The aiocoap Context that received a message from `remote` (the server's socket).

    aiocoap (0.4) has no public way from a received request to its Context; this is the
    chain its own UDP transport keeps (interface → message manager → token manager)."""
    return remote.interface._ctx.token_manager.context  # see the docstring


def _end(request: Any) -> None:
    """End an Observe request: its observation and, while its first answer has not come,
    the request itself. aiocoap keeps a request whose observation alone was cancelled,
    and its shutdown then raises for it ("Error raised in an already cancelled
    ClientObservation"), which ended the collector's shutdown there."""
    if request.observation is not None and not request.observation.cancelled:
        request.observation.cancel()
    if not request.response.done():
        request.response.cancel()  # `_observe` awaiting it ends (cancelled)


@contextlib.contextmanager
def _storage_answers(busy_s: int, missing: str = "") -> Iterator[None]:
    """A registration request's storage errors as its answer: no such registration 4.04
    (`missing` says why), the rest as every CoAP resource answers them
    (`collector.coap_oscore.storage_answers`)."""
    with storage_answers(busy_s):
        try:
            yield
        except lwm2m.NoRegistrationError:
            raise error.NotFound(missing) from None


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _objects(request: aiocoap.Message) -> str:
    """A Register's or Update's payload, the client's objects in CoRE link format (RFC
    6690), as text (bytes that are no UTF-8 replaced, at most 4,000 characters);
    BadRequest for control characters, which no link format holds (and a NUL no
    PostgreSQL text)."""
    text = bytes(request.payload).decode("utf-8", "replace")[:4000]
    if _CONTROL.search(text):
        raise error.BadRequest("the objects are not CoRE link format (control characters)")
    return text


async def _no_block1(request: aiocoap.Message) -> bool:
    """/rd takes no Block1 (aiocoap's own spool is unbounded): 4.13 for a block."""
    if request.opt.block1 is not None:
        raise error.RequestEntityTooLarge("registration payloads come in one message")
    return False


class Lwm2m:
    """What the LwM2M resources share: the pool, the busy answer, the deliveries, the
    observations."""

    def __init__(
        self,
        pool: Pool,
        settings: CoapSettings,
        pipeline: Pipeline,
        downlinks: Downlinks | None = None,
    ) -> None:
        self.pool = pool
        self.busy_s = settings.busy_max_age_s
        self._pipeline = pipeline
        self._downlinks = downlinks  # its pending view skips windows with nothing to claim
        self._delivering: set[int] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        # meter -> (its registration, the observation request, the task following it)
        self._observations: dict[int, tuple[str, Any, asyncio.Task[None] | None]] = {}

    def device_of(self, request: aiocoap.Message) -> Device | None:
        """The OSCORE-authenticated device, or None (plain CoAP)."""
        ctx = getattr(request.remote, "security_context", None)
        return ctx.device if isinstance(ctx, DeviceContext) else None

    def kick(self, registration: lwm2m.Registration, remote: Any, *, observe: bool = False) -> None:
        """Deliver the meter's pending commands to `remote` (in the background); with
        `observe` (a Register), then observe its meter object (`_observe`)."""
        if observe:
            self.forget(registration.meter_id)  # a new Register ends the old observation
        if registration.meter_id not in self._delivering:
            self._delivering.add(registration.meter_id)
            self._spawn(self._deliver(registration, remote, observe=observe), "lwm2m-delivery")
        elif observe:  # one delivery per meter at a time: observe beside it
            self._spawn(self._observe(registration, remote), "lwm2m-observe")

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def observing(self, meter_id: int) -> bool:
        """True while this process observes (or is setting up an observation of) the meter."""
        return meter_id in self._observations

    def forget(self, meter_id: int) -> None:
        """End the meter's observation, if any (De-register, a new Register)."""
        gone = self._observations.pop(meter_id, None)
        if gone is None:
            return
        _, request, task = gone
        _end(request)
        if task is not None:
            task.cancel()

    async def _deliver(
        self, registration: lwm2m.Registration, remote: Any, *, observe: bool = False
    ) -> None:
        try:
            await self._commands(registration, remote)
        finally:
            self._delivering.discard(registration.meter_id)
        if observe:
            await self._observe(registration, remote)

    async def _commands(self, registration: lwm2m.Registration, remote: Any) -> None:
        meter_id = registration.meter_id
        if self._downlinks is not None and self._downlinks.nothing_pending(meter_id):
            return
        try:
            async with connection(self.pool, "claiming LwM2M commands", timeout_s=5.0) as conn:
                claimed = await mailbox.claim(conn, meter_ids=[meter_id], lwm2m=True)
            if not claimed:
                return
            metrics.COMMANDS.labels("sent").inc(len(claimed))
            objects = objects_of(registration.objects)
            results: list[DeviceResult] = []
            for item in claimed:
                result = await self._run(item.pending, objects, remote)
                if result is None:
                    break  # no answer: the client sleeps again; the rest next window
                results.append(result)
            if results:
                async with connection(self.pool, "recording LwM2M results") as conn:
                    outcome = await mailbox.record_results(conn, meter_id, results)
                metrics.COMMANDS.labels("answered").inc(
                    sum(v == "recorded" for v in outcome.values())
                )
                log.info("lwm2m.delivered", meter_id=meter_id, outcome=outcome)
        except StorageError as exc:
            log.warning("lwm2m.delivery_failed", meter_id=meter_id, error=str(exc))
        except Exception:  # a task's top level: log it, the command goes out next window
            log.exception("lwm2m.delivery_crashed", meter_id=meter_id)

    async def _observe(self, registration: lwm2m.Registration, remote: Any) -> None:
        """Observe the client's meter object (GET /3424, Observe 0, Accept SenML CBOR):
        its first answer and every notification are stored as a Send is. Plain CoAP
        clients only (see the module docstring); never raises."""
        meter_id = registration.meter_id
        if VALUE_OBJECT not in objects_of(registration.objects):
            return
        if isinstance(getattr(remote, "security_context", None), DeviceContext):
            log.info("lwm2m.observe_skipped", meter_id=meter_id, why="OSCORE client")
            return
        msg = aiocoap.Message(
            code=aiocoap.Code.GET,
            transport_tuning=aiocoap.Reliable,
            uri_path=(str(VALUE_OBJECT),),
            observe=0,
        )
        msg.opt.accept = SENML_CBOR
        msg.remote = remote
        request = _context_of(remote).request(msg, handle_blockwise=False)
        self._observations[meter_id] = (registration.registration_id, request, None)
        try:
            first = await asyncio.wait_for(request.response, OP_TIMEOUT_S)
        except (TimeoutError, error.Error) as exc:
            log.info("lwm2m.observe_unanswered", meter_id=meter_id, error=str(exc))
            self._drop(meter_id, request)
            return
        if not first.code.is_successful():
            log.info("lwm2m.observe_refused", meter_id=meter_id, code=str(first.code))
            self._drop(meter_id, request)
            return
        await self._notified(registration, remote, first)
        if (
            first.opt.observe is None
            or self._observations.get(meter_id, (0, None))[1] is not request
        ):
            self._drop(meter_id, request)  # not observable, or replaced meanwhile
            return
        task = self._spawn(self._follow(registration, remote, request), "lwm2m-observation")
        self._observations[meter_id] = (registration.registration_id, request, task)
        log.info("lwm2m.observing", meter_id=meter_id, path=f"/{VALUE_OBJECT}")

    def _drop(self, meter_id: int, request: Any) -> None:
        """End `request`'s observation; forget it if it is still the meter's."""
        if self._observations.get(meter_id, (0, None))[1] is request:
            del self._observations[meter_id]
        _end(request)

    async def _follow(self, registration: lwm2m.Registration, remote: Any, request: Any) -> None:
        """Store each notification until the observation ends (the client cancels it, a
        new Register or De-register replaces it, the registration is gone)."""
        meter_id = registration.meter_id
        notes = Notifications(request.observation)
        try:
            async for note in notes:  # every one, in order (aiocoap's keeps the latest)
                if not await self._notified(registration, remote, note):
                    break
                if notes.dropped:
                    log.warning(
                        "lwm2m.notifications_flooded", meter_id=meter_id, dropped=notes.dropped
                    )
                    notes.dropped = 0
        except error.Error as exc:  # NotObservable, ObservationCancelled, a transport error
            log.info("lwm2m.observation_ended", meter_id=meter_id, error=repr(exc))
        except Exception:  # a task's top level: log it; the next Register observes again
            log.exception("lwm2m.observation_crashed", meter_id=meter_id)
        finally:
            if self._observations.get(meter_id, (0, None))[1] is request:
                self._drop(meter_id, request)

    async def _notified(
        self, registration: lwm2m.Registration, remote: Any, note: aiocoap.Message
    ) -> bool:
        """Store one notification (or the Observe's first answer) through the pipeline as
        the registered meter; False when the registration is no longer open."""
        meter_id = registration.meter_id
        try:
            reg = await lwm2m.current(self.pool, meter_id=meter_id)
        except StorageError as exc:
            # the database is away: the notification is ACKed already, so it is kept, as
            # the meter of the registration the observation was set up under; the
            # pipeline holds it until the database is back
            log.warning("lwm2m.registration_unchecked", meter_id=meter_id, error=str(exc))
            reg = registration
        if reg is None or reg.registration_id != registration.registration_id:
            log.info("lwm2m.notification_refused", meter_id=meter_id, why="not registered")
            return False
        if not note.code.is_successful():
            return True
        uplink = Uplink(
            with_endpoint(bytes(note.payload), reg.endpoint),
            Transport.COAP,
            _peer(remote),
            device=Device(reg.meter_id, reg.tenant_id, reg.endpoint),
        )
        try:
            # force: past the pipeline's bound too (an ACKed notification has no retry to
            # wait for; one per observation is in flight, CON notifications being paced by
            # their ACKs, RFC 7641 §4.5.1)
            outcome = await self._pipeline.offer(uplink, force=True)
        except PipelineClosed as exc:  # shutting down: the ACK went before the store
            metrics.UPLINKS.labels("coap", "busy").inc()
            log.warning("lwm2m.notification_dropped", meter_id=meter_id, error=repr(exc))
            return True
        except Exception:  # the store failed on it: logged; the next notification follows
            metrics.UPLINKS.labels("coap", "failed").inc()
            log.exception("lwm2m.notification_failed", meter_id=meter_id)
            return True
        metrics.UPLINKS.labels("coap", outcome.status).inc()
        log.info("lwm2m.notified", meter_id=meter_id, outcome=outcome.status, n_new=outcome.n_new)
        return True

    async def _run(
        self, pending: Any, objects: dict[int, list[int]], remote: Any
    ) -> DeviceResult | None:
        """Send one command's operations; its result, or None when the client is gone."""
        try:
            ops = operations(pending, objects, int(time.time()))
        except ValueError as exc:
            return DeviceResult(pending.command_id, False, {"error": str(exc)})
        done: list[dict[str, str]] = []
        for op in ops:
            msg = aiocoap.Message(
                code=_METHODS[op.method],
                transport_tuning=aiocoap.Reliable,  # CON: retransmitted until answered
                uri_path=op.path,
                payload=op.payload,
            )
            if op.content_format is not None:
                msg.opt.content_format = op.content_format
            try:
                answer = await asyncio.wait_for(self._request(msg, remote), OP_TIMEOUT_S)
            except (TimeoutError, error.Error, oscore.ProtectionInvalid) as exc:
                log.info("lwm2m.unanswered", command_id=pending.command_id, error=str(exc))
                return None
            code = int(answer.code)
            done.append({"op": op.name, "code": f"{code >> 5}.{code & 0x1F:02d}"})
            if not answer.code.is_successful():
                return DeviceResult(pending.command_id, False, {"ops": done})
            if op.method == "GET":
                return DeviceResult(pending.command_id, True, {"ops": done, **_content(answer)})
        return DeviceResult(pending.command_id, True, {"ops": done})

    async def _request(self, msg: aiocoap.Message, remote: Any) -> aiocoap.Message:
        """Send `msg` to `remote` from the server's socket; the (unprotected) answer.

        Over OSCORE the request is protected with the device's context, with a server
        sequence number reserved in the database first (as `collector.coap_oscore` does
        for its second answers: a number is never used twice, across restarts)."""
        sc = getattr(remote, "security_context", None)
        if not isinstance(sc, DeviceContext):
            msg.remote = remote
            return await _context_of(remote).request(msg, handle_blockwise=False).response
        if not sc.has_grant():
            async with connection(self.pool, "reserving sequence numbers", timeout_s=5.0) as conn:
                last = await credentials.next_server_seqno(
                    conn, sc.device.meter_id, sc.recipient_id, _SEQNO_BLOCK
                )
            if last is None:  # the context was revoked or rotated meanwhile
                raise error.Error("OSCORE context gone")
            sc.grant(last, _SEQNO_BLOCK)
        protected, request_id = sc.protect(msg)
        protected.transport_tuning = aiocoap.Reliable
        protected.remote = remote.underlying_address
        context = _context_of(remote.underlying_address)
        answer = await context.request(protected, handle_blockwise=False).response
        inner, _ = sc.unprotect(answer, request_id)
        return inner


def _content(answer: aiocoap.Message) -> dict[str, object]:
    """A Read answer's content for the command's result (`decoder.lwm2m.read_content`).
    Deliveries do not reassemble Block2: a content past one block is reported as cut."""
    fmt = answer.opt.content_format
    block2 = answer.opt.block2
    if block2 is not None and block2.more:
        cut = "content larger than one block (Block2): not read"
        return {"content": {"content_format": fmt, "error": cut}}
    return {"content": read_content(fmt, bytes(answer.payload), int(time.time()))}


class RegisterResource(resource.Resource):
    """POST /rd: Register (see the module docstring)."""

    def __init__(self, shared: Lwm2m) -> None:
        super().__init__()
        self._s = shared

    async def needs_blockwise_assembly(self, request: aiocoap.Message) -> bool:
        """No Block1 (see `_no_block1`)."""
        return await _no_block1(request)

    async def render_post(self, request: aiocoap.Message) -> Any:
        """Register the client as its meter; 2.01 with Location-Path rd/<id>."""
        try:
            params = registration_params(request.opt.uri_query, register=True)
        except ValueError as exc:
            raise error.BadRequest(str(exc)) from None
        assert params.endpoint is not None
        assert params.lifetime_s is not None
        device = self._s.device_of(request)
        slug = dict(q.partition("=")[::2] for q in request.opt.uri_query).get("t") or None
        with _storage_answers(self._s.busy_s):
            if device is not None:
                if params.endpoint != device.address:
                    raise error.Forbidden("the endpoint name is not this device's meter")
                meter_id, tenant_id = device.meter_id, device.tenant_id
            else:
                async with connection(self._s.pool, "finding a lab meter") as conn:
                    lab = await lwm2m.lab_meter(conn, params.endpoint, slug)
                if lab is None:
                    raise error.NotFound("no such meter in a lab tenant (plain CoAP)")
                meter_id, tenant_id = lab.meter_id, lab.tenant_id
            async with connection(self._s.pool, "registering an LwM2M client") as conn:
                reg = await lwm2m.register(
                    conn,
                    tenant_id=tenant_id,
                    meter_id=meter_id,
                    endpoint=params.endpoint,
                    lwm2m_version=params.version or "1.1",
                    lifetime_s=params.lifetime_s,
                    binding=params.binding or "U",
                    queue_mode=bool(params.queue_mode),
                    peer=_peer(request.remote),
                    transport=int(Transport.COAP if device is None else Transport.COAP_OSCORE),
                    objects=_objects(request),
                )
        log.info("lwm2m.registered", meter_id=meter_id, registration=reg.registration_id)
        self._s.kick(reg, request.remote, observe=True)
        return aiocoap.Message(code=aiocoap.CREATED, location_path=("rd", reg.registration_id))


class RegistrationResource(resource.Resource, resource.PathCapable):
    """POST /rd/<id> Update, DELETE /rd/<id> De-register (mounted as a sub-site)."""

    def __init__(self, shared: Lwm2m) -> None:
        super().__init__()
        self._s = shared

    async def needs_blockwise_assembly(self, request: aiocoap.Message) -> bool:
        """No Block1 (see `_no_block1`)."""
        return await _no_block1(request)

    def _id(self, request: aiocoap.Message) -> str:
        path = request.opt.uri_path
        if len(path) != 1:
            raise error.NotFound
        return str(path[0])

    async def render_post(self, request: aiocoap.Message) -> Any:
        """Update: refresh the registration; 2.04; then deliver pending commands."""
        reg_id = self._id(request)
        try:
            params = registration_params(request.opt.uri_query, register=False)
        except ValueError as exc:
            raise error.BadRequest(str(exc)) from None
        device = self._s.device_of(request)
        with _storage_answers(self._s.busy_s, "no such registration (expired?): register again"):
            reg = await lwm2m.update(
                self._s.pool,
                reg_id,
                meter_id=None if device is None else device.meter_id,
                peer=_peer(request.remote),
                lifetime_s=params.lifetime_s,
                binding=params.binding,
                queue_mode=params.queue_mode,
                objects=_objects(request) if request.payload else None,
            )
        # no observation here (it failed, or this process restarted since the Register):
        # set one up in this window
        self._s.kick(reg, request.remote, observe=not self._s.observing(reg.meter_id))
        return aiocoap.Message(code=aiocoap.CHANGED)

    async def render_delete(self, request: aiocoap.Message) -> Any:
        """De-register; 2.02."""
        reg_id = self._id(request)
        device = self._s.device_of(request)
        with _storage_answers(self._s.busy_s, "no such registration"):
            reg = await lwm2m.deregister(
                self._s.pool, reg_id, meter_id=None if device is None else device.meter_id
            )
        self._s.forget(reg.meter_id)
        log.info("lwm2m.deregistered", meter_id=reg.meter_id, registration=reg_id)
        return aiocoap.Message(code=aiocoap.DELETED)


class SendResource(UplinkResource):
    """POST /dp: an LwM2M Send, stored through the pipeline as the registered meter."""

    def __init__(
        self,
        settings: CoapSettings,
        pipeline: Pipeline,
        tenants: TenantDirectory,
        events: EventLimiter,
        shared: Lwm2m,
    ) -> None:
        super().__init__(settings, pipeline, tenants, events)
        self._s = shared

    async def needs_blockwise_assembly(self, request: aiocoap.Message) -> bool:
        """Assemble Block1 Sends in this resource's bounded spool (`Block1Budget`),
        refusing (4.13) a transfer that would exceed the payload limit."""
        block1 = request.opt.block1
        limit = self._settings.max_payload_bytes
        if block1 is not None and (block1.block_number + 1) * block1.size > limit:
            raise error.RequestEntityTooLarge(f"at most {limit} B")
        return True

    async def render_post(self, request: aiocoap.Message, *, too_large: bool = False) -> Any:
        """Store the pack; 2.04 once durable (or the quarantine's 4.xx); then deliver."""
        del too_large
        if request.opt.content_format not in (SENML_CBOR, SENML_JSON):
            raise error.UnsupportedContentFormat("Send takes SenML CBOR (112) or JSON (110)")
        device = self._s.device_of(request)
        peer = _peer(request.remote)
        with _storage_answers(self._s.busy_s):
            reg = await lwm2m.current(
                self._s.pool, meter_id=None if device is None else device.meter_id, peer=peer
            )
        if reg is None:
            raise error.NotFound("not registered (or the registration expired): register first")
        payload = with_endpoint(bytes(request.payload), reg.endpoint)
        transport = Transport.COAP if device is None else Transport.COAP_OSCORE
        uplink = Uplink(
            payload,
            transport,
            peer,
            device=Device(reg.meter_id, reg.tenant_id, reg.endpoint),
        )
        ctx = getattr(request.remote, "security_context", None)
        piv = getattr(request, "nbm_piv", None)
        if isinstance(ctx, DeviceContext) and piv is not None:
            meter_id, index, bits = ctx.replay_state()
            uplink.replay_window = (meter_id, index, bits, piv, ctx.recipient_id)
            uplink.new_context = ctx.pending
        kind = metrics.TRANSPORT_NAMES[int(transport)]
        if len(payload) > self._settings.max_payload_bytes:
            raise error.RequestEntityTooLarge(f"at most {self._settings.max_payload_bytes} B")
        outcome = await self._durable(uplink, kind)
        if outcome.status in ("stored", "duplicate"):
            self._s.kick(reg, request.remote)
        return response(outcome)


def mount(
    site: Any,
    settings: CoapSettings,
    pipeline: Pipeline,
    pool: Pool,
    tenants: TenantDirectory,
    events: EventLimiter,
    downlinks: Downlinks | None = None,
) -> Lwm2m:
    """Add /rd, /rd/<id> and /dp to `site`; their shared state (`downlinks`: whose pending
    view lets a window with nothing pending skip its claim)."""
    shared = Lwm2m(pool, settings, pipeline, downlinks)
    site.add_resource(["rd"], RegisterResource(shared))
    site.add_resource(["rd"], RegistrationResource(shared))  # a sub-site: /rd/<id>
    site.add_resource(["dp"], SendResource(settings, pipeline, tenants, events, shared))
    return shared
