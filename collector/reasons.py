"""Quarantine reasons and the answer each transport gives: one table, used everywhere.

Every reason an uplink (or part of one) is quarantined for is a `Reason`; `ANSWERS[reason]`
says what the device hears: the CoAP response code, whether MQTT acknowledges the message
(PUBACK: the broker forgets it) and what the reason means. `coap_code(outcome)` and
`mqtt_acks(outcome)` are the answer map the CoAP and MQTT shells apply to an `Outcome`. A
quarantined uplink is durable (its row is committed), so MQTT acknowledges it like a stored
one: a redelivery would only be quarantined again. Only an uplink that is not durable at
all (outcome `failed`, `collector.pipeline.UplinkFailed`) is not acknowledged.

The `readings_rejected` row belongs to a stored uplink (some of its readings were refused):
the uplink itself is answered as stored. The five writer reasons (clock_future ...) are
`storage.ingest.RejectReason` labels, held equal by tests/collector/test_verdict.py.
Pure: no I/O, no aiocoap (codes are RFC 7252 numbers: class << 5 | detail).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final, Protocol


def _coap(klass: int, detail: int) -> int:
    """RFC 7252 §3: a response code is 3 bits of class and 5 of detail (4.04 = 0x84)."""
    return klass << 5 | detail


CHANGED: Final = _coap(2, 4)
BAD_REQUEST: Final = _coap(4, 0)
FORBIDDEN: Final = _coap(4, 3)
NOT_FOUND: Final = _coap(4, 4)
REQUEST_ENTITY_TOO_LARGE: Final = _coap(4, 13)


class Reason(enum.StrEnum):
    """Why an uplink was quarantined (stored in `quarantine.reason`)."""

    TOO_LARGE = "too_large"
    BAD_TOPIC = "bad_topic"
    UNKNOWN_METER = "unknown_meter"
    UNKNOWN_DEVICE = "unknown_device"
    IDENTITY_MISMATCH = "identity_mismatch"
    UNDECODABLE = "undecodable"
    DECODE_FAILED = "decode_failed"
    STORE_FAILED = "store_failed"
    CLOCK_FUTURE = "clock_future"
    CLOCK_PAST = "clock_past"
    BEFORE_INSTALLATION = "before_installation"
    NEGATIVE_REGISTER = "negative_register"
    READINGS_REJECTED = "readings_rejected"


@dataclass(frozen=True)
class Answer:
    """What a reason means for the device: CoAP code, MQTT PUBACK, and for a person."""

    coap: int
    mqtt_ack: bool
    description: str


ANSWERS: Final[dict[Reason, Answer]] = {
    Reason.TOO_LARGE: Answer(
        REQUEST_ENTITY_TOO_LARGE, True, "payload over the collector's max_payload_bytes"
    ),
    Reason.BAD_TOPIC: Answer(BAD_REQUEST, True, "MQTT topic is not an uplink topic"),
    Reason.UNKNOWN_METER: Answer(
        NOT_FOUND, True, "no such meter: an MQTT topic or a plain CoAP frame's address"
    ),
    Reason.UNKNOWN_DEVICE: Answer(
        NOT_FOUND, True, "a platform push names a device identity no meter is provisioned as"
    ),
    Reason.IDENTITY_MISMATCH: Answer(
        FORBIDDEN, True, "the frame reports another meter than the authenticated device"
    ),
    Reason.UNDECODABLE: Answer(BAD_REQUEST, True, "the decoder refused the frame (its code)"),
    Reason.DECODE_FAILED: Answer(BAD_REQUEST, True, "the decoder raised on it (a bug)"),
    Reason.STORE_FAILED: Answer(BAD_REQUEST, True, "the database refused to store it"),
    Reason.CLOCK_FUTURE: Answer(BAD_REQUEST, True, "every reading over a day ahead"),
    Reason.CLOCK_PAST: Answer(BAD_REQUEST, True, "every reading before 2015 (a reset clock)"),
    Reason.BEFORE_INSTALLATION: Answer(
        BAD_REQUEST, True, "every reading before the meter's installation"
    ),
    Reason.NEGATIVE_REGISTER: Answer(BAD_REQUEST, True, "every register negative"),
    Reason.READINGS_REJECTED: Answer(
        CHANGED, True, "a stored uplink's refused readings (which, and why)"
    ),
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
