"""The answer each transport gives for an outcome: the CoAP code and the MQTT PUBACK.

`ANSWERS[reason]` (keyed by `storage.reasons.Reason`, the one reason table) says what the
device hears for a quarantined uplink: the CoAP response code and whether MQTT
acknowledges the message (PUBACK: the broker forgets it). `coap_code(outcome)` and
`mqtt_acks(outcome)` are the answer map the CoAP and MQTT shells apply to an `Outcome`. A
quarantined uplink is durable (its row is committed), so MQTT acknowledges it like a stored
one: a redelivery would only be quarantined again. Only an uplink that is not durable at
all (outcome `failed`, `collector.pipeline.UplinkFailed`) is not acknowledged.

The `readings_rejected` row belongs to a stored uplink (some of its readings were refused):
the uplink itself is answered as stored. Pure: no I/O, no aiocoap (codes are RFC 7252
numbers: class << 5 | detail).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Protocol

from storage.reasons import Reason


def _coap(klass: int, detail: int) -> int:
    """RFC 7252 §3: a response code is 3 bits of class and 5 of detail (4.04 = 0x84)."""
    return klass << 5 | detail


CHANGED: Final = _coap(2, 4)
BAD_REQUEST: Final = _coap(4, 0)
FORBIDDEN: Final = _coap(4, 3)
NOT_FOUND: Final = _coap(4, 4)
REQUEST_ENTITY_TOO_LARGE: Final = _coap(4, 13)


@dataclass(frozen=True)
class Answer:
    """What a reason means for the device: its CoAP code and whether MQTT acknowledges it."""

    coap: int
    mqtt_ack: bool


ANSWERS: Final[dict[Reason, Answer]] = {
    Reason.TOO_LARGE: Answer(REQUEST_ENTITY_TOO_LARGE, mqtt_ack=True),
    Reason.BAD_TOPIC: Answer(BAD_REQUEST, mqtt_ack=True),
    Reason.UNKNOWN_METER: Answer(NOT_FOUND, mqtt_ack=True),
    Reason.UNKNOWN_DEVICE: Answer(NOT_FOUND, mqtt_ack=True),
    Reason.IDENTITY_MISMATCH: Answer(FORBIDDEN, mqtt_ack=True),
    Reason.UNDECODABLE: Answer(BAD_REQUEST, mqtt_ack=True),
    Reason.DECODE_FAILED: Answer(BAD_REQUEST, mqtt_ack=True),
    Reason.STORE_FAILED: Answer(BAD_REQUEST, mqtt_ack=True),
    Reason.CLOCK_FUTURE: Answer(BAD_REQUEST, mqtt_ack=True),
    Reason.CLOCK_PAST: Answer(BAD_REQUEST, mqtt_ack=True),
    Reason.BEFORE_INSTALLATION: Answer(BAD_REQUEST, mqtt_ack=True),
    Reason.NEGATIVE_REGISTER: Answer(BAD_REQUEST, mqtt_ack=True),
    Reason.READINGS_REJECTED: Answer(CHANGED, mqtt_ack=True),  # the uplink itself was stored
}


class Answered(Protocol):
    """What the answer map reads of an `Outcome`."""

    @property
    def status(self) -> str: ...
    @property
    def reason(self) -> str: ...


def coap_code(outcome: Answered) -> int:
    """The CoAP response code of an outcome: 2.04 unless quarantined, else its reason's."""
    if outcome.status != "quarantined":
        return CHANGED
    answer = ANSWERS.get(Reason(outcome.reason)) if outcome.reason in _VALUES else None
    return answer.coap if answer is not None else BAD_REQUEST


def mqtt_acks(outcome: Answered) -> bool:
    """Whether MQTT acknowledges an outcome (every durable one; `failed` never gets here)."""
    if outcome.status != "quarantined":
        return True
    return outcome.reason not in _VALUES or ANSWERS[Reason(outcome.reason)].mqtt_ack


_VALUES: Final = frozenset(r.value for r in Reason)
