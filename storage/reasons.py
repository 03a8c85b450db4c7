"""Quarantine reasons: the one table of why an uplink (or part of one) was set aside.

`Reason` is what `quarantine.reason` holds (a StrEnum: its value is the stored text);
`DESCRIPTIONS[reason]` says what it means, for a person (API docs, CLI help). Every
producer (the collector's verdict and store, the re-decode queue), the API's filters and
the simulator's expected outcomes name reasons through this enum; the answer a device
hears for each (CoAP code, MQTT PUBACK) is the collector's (`collector.answers`).

The five writer reasons (clock_future ...) are `storage.rows.RejectReason.reason`.
Pure: no I/O, no driver import (the collector's pure verdict imports it).
"""

from __future__ import annotations

import enum
from typing import Final


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


DESCRIPTIONS: Final[dict[Reason, str]] = {
    Reason.TOO_LARGE: "payload over the collector's max_payload_bytes",
    Reason.BAD_TOPIC: "MQTT topic is not an uplink topic",
    Reason.UNKNOWN_METER: "no such meter: an MQTT topic or a plain CoAP frame's address",
    Reason.UNKNOWN_DEVICE: "a platform push names a device identity no meter is provisioned as",
    Reason.IDENTITY_MISMATCH: "the frame reports another meter than the authenticated device",
    Reason.UNDECODABLE: "the decoder refused the frame (detail: '<error code>: <message>')",
    Reason.DECODE_FAILED: "the decoder raised on it (a bug)",
    Reason.STORE_FAILED: "the database refused to store it",
    Reason.CLOCK_FUTURE: "every reading over a day ahead",
    Reason.CLOCK_PAST: "every reading before 2015 (a reset clock)",
    Reason.BEFORE_INSTALLATION: "every reading before the meter's installation",
    Reason.NEGATIVE_REGISTER: "every register negative",
    Reason.READINGS_REJECTED: "a stored uplink's refused readings (which, and why)",
}


def listed() -> str:
    """Every reason as `value (description)`, `; `-separated: for API and CLI help texts."""
    return "; ".join(f"{r.value} ({DESCRIPTIONS[r]})" for r in Reason)
