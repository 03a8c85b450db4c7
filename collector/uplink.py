"""What the transports hand the pipeline and what they get back: plain records, no I/O.

An `Uplink` is one received payload and what its transport knows about the sender (an
authenticated `Device`, a tenant, an MQTT topic, a rejection decided before decoding);
an `Outcome` is what became of it. The transports (`collector.coap`, `collector.mqtt_session`,
`collector.redecode`) build uplinks, `collector.pipeline` queues them and resolves each
uplink's future, and the pure verdict (`collector.verdict`) reads them: this module imports
no asyncio, driver, broker or CoAP library (an import contract holds it).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Protocol

from storage.reasons import Reason


class Transport(enum.IntEnum):
    """How an uplink arrived; stored as a smallint (see migration 0001)."""

    COAP = 1  # plain CoAP, lab tenants only
    COAP_OSCORE = 2
    MQTT = 3
    PLATFORM = 6  # an operator IoT platform's HTTP push (4 import/api, 5 bench/test)
    COAP_DTLS = 7  # CoAP over DTLS 1.2 PSK


@dataclass(slots=True, frozen=True)
class Device:
    """The authenticated sender of an uplink: the one meter it may report for."""

    meter_id: int
    tenant_id: int
    address: str
    # the meter's format as registered (`storage.registry.MeterFormat`), when the lookup
    # that authenticated it had it: the store skips the AES-key lookup of formats that
    # carry no OMS keys (None: unknown, looked up)
    format: str | None = None
    # the meter's installed_at (epoch seconds, floor), when that lookup had it too: the
    # reading writer then needs no query of its own for the meter (None: it asks)
    installed_s: int | None = None


@dataclass(slots=True, frozen=True)
class Outcome:
    """What became of one uplink. `status`: stored, duplicate, quarantined, or failed (not
    durable at all: the pipeline turns it into `UplinkFailed`). `replayed`: an OSCORE
    uplink whose sequence number was admitted before (by another process sharing the
    port): it must be answered as a replay, from the recorded answer."""

    status: str
    reason: str = ""  # quarantine reason (machine-readable)
    detail: str = ""  # quarantine detail (for a person)
    n_readings: int = 0
    n_new: int = 0
    replayed: bool = False


NOT_YET_DURABLE = Outcome("not_yet_durable")  # `answer_within_s` passed; still queued


@dataclass(slots=True)
class Uplink:
    """One received payload and what the transport knows about its sender."""

    payload: bytes
    transport: Transport
    peer: str
    device: Device | None = None  # OSCORE / MQTT: who authenticated
    tenant_id: int | None = None  # plain CoAP: the tenant named in the query
    topic: tuple[str, str] | None = None  # MQTT: (tenant slug, meter address) of the topic
    reject: tuple[Reason, str] | None = None  # decided before decoding: (reason, detail)
    # OSCORE: (meter_id, replay index, replay bits, this request's partial IV, context kid)
    replay_window: tuple[int, int, int, int, bytes] | None = None
    # OSCORE: verified under the context a rotate_key staged (migration 0048): committing
    # it confirms that context (it becomes the current one)
    new_context: bool = False
    received_at: float = field(default_factory=time.time)
    future: Waiter | None = None  # set by Pipeline.offer: an asyncio future


class Waiter(Protocol):
    """The future an uplink's outcome resolves (`asyncio.Future[Outcome]` in the pipeline)."""

    def done(self) -> bool: ...
    def set_result(self, result: Outcome, /) -> None: ...
    def set_exception(self, exception: BaseException, /) -> None: ...
