"""The pure verdict on a decoded batch (collector.verdict) and the reason table, without a
database: decoded columns and writer results are built by hand."""

from __future__ import annotations

import dataclasses

import aiocoap
import numpy as np
import pytest

from collector import verdict
from collector.answers import ANSWERS, coap_code, mqtt_acks
from collector.uplink import Device, Outcome, Transport, Uplink
from decoder.columns import Column, Decoded, ErrorCode, Flag, FrameFlag
from storage.reasons import DESCRIPTIONS, Reason
from storage.rows import IngestResult, Rejection, RejectReason

RX = 1_767_225_600.25  # received 2026-01-01T00:00:00.25Z
DEVICE = Device(meter_id=70, tenant_id=1, address="A")
Reading = tuple[str, int, int, int]  # address, read_at_s, register_ml, flags


def decoded(
    frames: list[list[Reading]],
    codes: list[int] | None = None,
    address_of_frame: list[str] | None = None,
    fields: dict[str, Column] | None = None,
) -> Decoded:
    """A Decoded of `frames` (each a list of readings), all OK unless `codes` says."""
    rows = [(j, *r) for j, readings in enumerate(frames) for r in readings]
    n = len(frames)
    return Decoded(
        frame_index=np.array([r[0] for r in rows], np.int32),
        address=np.array([r[1] for r in rows], object),
        read_at_s=np.array([r[2] for r in rows], np.int64),
        register_ml=np.array([r[3] for r in rows], np.int64),
        flags=np.array([r[4] for r in rows], np.uint32),
        format=np.full(n, "test", object),
        address_of_frame=np.array(address_of_frame or [""] * n, object),
        error_code=np.array(codes or [0] * n, np.uint16),
        error_message=np.array(["bad" if c else "" for c in codes or [0] * n], object),
        fields=fields or {},
    )


def device_uplink(device: Device = DEVICE) -> Uplink:
    return Uplink(b"x", Transport.MQTT, "p", device=device, received_at=RX)


def plain_uplink(tenant: int = 1) -> Uplink:
    return Uplink(b"y", Transport.COAP, "p", tenant_id=tenant, received_at=RX + 1)


def written(n: int, rejected: dict[int, RejectReason] | None = None) -> IngestResult:
    """A writer result: every row new except the `rejected` ones."""
    rejected = rejected or {}
    new = np.ones(n, bool)
    new[list(rejected)] = False
    rows = tuple(Rejection(i, r) for i, r in sorted(rejected.items()))
    return IngestResult(n, n - len(rows), 0, rows, new, "copy", 0.0)


def run(
    batch: list[Uplink], dec: Decoded, todo: list[int] | None = None, ids: list[int] | None = None
) -> verdict.Checked:
    """layout → plain_lookups → place (addresses resolved to `ids` in lookup order) → check."""
    todo = list(range(len(batch))) if todo is None else todo
    lay = verdict.layout(len(batch), todo, dec)
    lookups = verdict.plain_lookups(batch, lay, dec)
    found, pool = [], iter(ids or [])
    for lookup in lookups:
        found.append(np.array([next(pool) for _ in lookup.addresses], np.int64))
    return verdict.check(batch, lay, dec, verdict.place(dec.n_readings, lookups, found))


def test_readings_of_passing_uplinks_are_masked_in_with_their_uplink_columns() -> None:
    """A device uplink and a plain one pass: every reading kept with its meter, transport
    and the uplink's receive time in µs; a foreign reading drops only its own uplink."""
    other = Device(71, 1, "B")
    batch = [device_uplink(), plain_uplink(), device_uplink(other)]
    dec = decoded(
        [
            [("A", 100, 1_000, 0), ("A", 200, 2_000, 0)],
            [("P", 300, 3_000, 0)],
            [("B", 400, 4_000, 0), ("Z", 500, 5_000, 0)],
        ]
    )
    checked = run(batch, dec, ids=[90])
    assert checked.verdicts[:2] == [None, None]
    assert checked.verdicts[2] == (
        Reason.IDENTITY_MISMATCH,
        "frame reports meter Z; the device is authenticated as meter B",
    )
    r = checked.readings
    assert r.meter_id.tolist() == [70, 70, 90]
    assert r.read_at_s.tolist() == [100, 200, 300]
    assert r.register_ml.tolist() == [1_000, 2_000, 3_000]
    assert np.asarray(r.received_at_us).tolist() == [1_767_225_600_250_000] * 2 + [
        1_767_225_601_250_000
    ]
    assert checked.owner.tolist() == [0, 0, 1]
    assert checked.meter_of == [70, 90, 71]


def test_the_frames_own_meter_must_be_the_devices_too() -> None:
    """A frame naming another meter in its header is an identity mismatch even with no
    reading; an empty header address is no claim."""
    batch = [device_uplink(), device_uplink()]
    dec = decoded([[], [("A", 1, 1, 0)]], address_of_frame=["Q", ""])
    checked = run(batch, dec)
    assert checked.verdicts[0] is not None
    assert checked.verdicts[0][0] is Reason.IDENTITY_MISMATCH
    assert "frame reports meter Q" in checked.verdicts[0][1]
    assert checked.verdicts[1] is None


def test_plain_addresses_are_looked_up_once_per_tenant_and_never_with_a_nul() -> None:
    """Plain CoAP: one lookup per tenant, distinct sorted addresses, a NUL address never
    asked for (an unknown meter); an unresolved address quarantines its uplink."""
    batch = [plain_uplink(1), plain_uplink(2), plain_uplink(1), plain_uplink(1)]
    dec = decoded(
        [
            [("M2", 1, 1, 0), ("M1", 2, 2, 0), ("M2", 3, 3, 0)],
            [("M1", 4, 4, 0)],
            [("M1\x00", 5, 5, 0)],
            [("M3", 6, 6, 0)],
        ]
    )
    lay = verdict.layout(len(batch), [0, 1, 2, 3], dec)
    lookups = verdict.plain_lookups(batch, lay, dec)
    assert [(k.tenant_id, k.addresses) for k in lookups] == [(1, ["M1", "M2", "M3"]), (2, ["M1"])]
    assert lookups[0].rows.tolist() == [0, 1, 2, 5]
    found = [np.array([11, 12, -1], np.int64), np.array([21], np.int64)]
    meters = verdict.place(dec.n_readings, lookups, found)
    assert meters.tolist() == [12, 11, 12, 21, -1, -1]
    checked = verdict.check(batch, lay, dec, meters)
    assert checked.verdicts[:2] == [None, None]
    assert checked.verdicts[2] == (Reason.UNKNOWN_METER, "no meter M1\x00 in this tenant")
    assert checked.verdicts[3] == (Reason.UNKNOWN_METER, "no meter M3 in this tenant")
    assert checked.readings.meter_id.tolist() == [12, 11, 12, 21]
    assert checked.meter_of == [12, 21, None, None]


def test_refused_frames_and_early_rejects_keep_their_reason() -> None:
    """A decoder code is `undecodable` (INTERNAL: `decode_failed`) with the code's name; a
    reason decided before decoding (not decoded at all) is kept as it is."""
    early = device_uplink()
    early.reject = (Reason.TOO_LARGE, "payload over 1 B")
    batch = [device_uplink(), early, device_uplink()]
    dec = decoded([[], []], codes=[ErrorCode.NO_KEY, ErrorCode.INTERNAL])
    checked = run(batch, dec, todo=[0, 2])
    assert checked.verdicts == [
        (Reason.UNDECODABLE, "no_key: bad"),
        (Reason.TOO_LARGE, "payload over 1 B"),
        (Reason.DECODE_FAILED, "internal: bad"),
    ]
    assert len(checked.readings) == 0


def test_settle_partial_total_and_duplicate_rejections() -> None:
    """Writer rejections: some of an uplink's readings → stored plus one readings_rejected
    row listing them; all of them → quarantined with the commonest reason; nothing new →
    duplicate. Alarms of rejected readings make no event."""
    batch = [device_uplink(), device_uplink(), device_uplink()]
    leak = int(Flag.LEAK | Flag.TAMPER)
    dec = decoded(
        [
            [("A", 1_767_225_600, 1_000, leak), ("A", 1_999_999_999, 2_000, leak)],
            [("A", 10, 1, 0), ("A", 11, 2, 0), ("A", 12, 3, int(Flag.BURST))],
            [("A", 1_767_000_000, 5, 0)],
        ]
    )
    checked = run(batch, dec)
    rejected = {
        1: RejectReason.CLOCK_FUTURE,
        2: RejectReason.CLOCK_PAST,
        3: RejectReason.CLOCK_PAST,
        4: RejectReason.NEGATIVE_REGISTER,
    }
    result = written(6, rejected)
    result.new_mask[5] = False  # the third uplink's one reading was stored before
    settled = verdict.settle(batch, dec, checked, result)
    stored, refused, duplicate = settled.outcomes
    assert (stored.status, stored.n_readings, stored.n_new) == ("stored", 2, 1)
    assert stored.detail == (
        "1 of 2 readings rejected (clock_future 1): 2033-05-18T03:33:19Z 2000 mL clock_future"
    )
    assert (refused.status, refused.reason) == ("quarantined", Reason.CLOCK_PAST)
    assert refused.detail.startswith("3 of 3 readings rejected (clock_past 2, negative_register 1)")
    assert duplicate == Outcome("duplicate", n_readings=1)
    assert [(q.reason, q.meter_id) for q in settled.quarantine] == [
        (Reason.READINGS_REJECTED, 70),
        (Reason.CLOCK_PAST, 70),
    ]
    assert [r.outcome for r in settled.raw] == ["stored", "quarantined", "duplicate"]
    assert sorted(e.kind for e in settled.events) == ["leak", "tamper"]
    assert {e.received_at.timestamp() for e in settled.events} == {RX}
    assert settled.n_new == 1


def test_frame_flags_go_to_the_raw_uplink_rows() -> None:
    """Each decoded uplink's raw row carries its frame's FrameFlag bits (0 when none); an
    uplink refused before decoding has None (nothing was decoded)."""
    early = device_uplink()
    early.reject = (Reason.TOO_LARGE, "payload over 1 B")
    batch = [device_uplink(), early, device_uplink()]
    dec = dataclasses.replace(
        decoded([[("A", 1, 1, 0)], [("A", 2, 2, 0)]]),
        frame_flags=np.array([FrameFlag.NO_DATA | FrameFlag.TRAILING_JUNK, 0], np.uint32),
    )
    checked = run(batch, dec, todo=[0, 2])
    settled = verdict.settle(batch, dec, checked, written(len(checked.readings)))
    assert [r.decode_flags for r in settled.raw] == [6, None, 0]


def test_health_comes_from_frames_that_carry_it() -> None:
    """Modem health of a passing uplink's frame (battery in V → mV, ECL outside 0..2
    dropped); none for a quarantined uplink or a frame without the fields."""
    batch = [device_uplink(), device_uplink(), device_uplink(Device(71, 1, "B"))]
    battery = Column(np.array([36, 0, 31]), np.array([True, False, True]), "decimal", 1)
    ecl = Column(np.array([7, 0, 1]))
    dec = decoded(
        [[("A", 1, 1, 0)], [("A", 2, 2, 0)], [("Z", 3, 3, 0)]],
        fields={"battery_v": battery, "ecl": ecl},
    )
    checked = run(batch, dec)
    settled = verdict.settle(batch, dec, checked, written(len(checked.readings)))
    assert [(h.meter_id, h.battery_mv, h.ecl) for h in settled.health] == [
        (70, 3600, None),
        (70, None, 0),
    ]
    assert settled.health[0].measured_at.timestamp() == int(RX)


def test_health_alone_is_stored_for_a_device_only() -> None:
    """A NO_REGISTER frame that reports health: a device's uplink is stored with no reading
    and its health (raw row without the error code); one naming another meter is an
    identity mismatch; a plain uplink's, and a device's without health, stay undecodable."""
    no = int(ErrorCode.NO_REGISTER)
    batch = [device_uplink(), device_uplink(), device_uplink(), plain_uplink()]
    battery = Column(np.array([3600, 3600, 0, 3600]), np.array([True, True, False, True]))
    dec = decoded(
        [[], [], [], []],
        codes=[no, no, no, no],
        address_of_frame=["A", "B", "", "A"],
        fields={"battery_mv": battery},
    )
    checked = run(batch, dec)
    assert checked.health_only == {0}
    reasons = [v[0] if v else None for v in checked.verdicts]
    assert reasons == [None, Reason.IDENTITY_MISMATCH, Reason.UNDECODABLE, Reason.UNDECODABLE]
    settled = verdict.settle(batch, dec, checked, written(0))
    assert settled.outcomes[0] == Outcome("stored", "", "", 0, 0)
    assert (settled.raw[0].outcome, settled.raw[0].error_code) == ("stored", None)
    assert [(h.meter_id, h.battery_mv) for h in settled.health] == [(70, 3600)]


def test_every_reason_has_an_answer_and_writer_labels_are_reasons() -> None:
    """The reason table and the answer map are whole, each writer reject names its reason,
    and the CoAP codes are aiocoap's."""
    assert set(ANSWERS) == set(Reason) == set(DESCRIPTIONS)
    assert {r.label for r in RejectReason} == {
        Reason.UNKNOWN_METER,
        Reason.NEGATIVE_REGISTER,
        Reason.CLOCK_PAST,
        Reason.CLOCK_FUTURE,
        Reason.BEFORE_INSTALLATION,
    }
    assert ANSWERS[Reason.IDENTITY_MISMATCH].coap == aiocoap.FORBIDDEN
    assert ANSWERS[Reason.UNKNOWN_METER].coap == aiocoap.NOT_FOUND
    assert ANSWERS[Reason.TOO_LARGE].coap == aiocoap.REQUEST_ENTITY_TOO_LARGE
    assert ANSWERS[Reason.UNDECODABLE].coap == aiocoap.BAD_REQUEST


@pytest.mark.parametrize(
    ("outcome", "code"),
    [
        (Outcome("stored"), aiocoap.CHANGED),
        (Outcome("stored", detail="1 of 2 readings rejected"), aiocoap.CHANGED),
        (Outcome("duplicate"), aiocoap.CHANGED),
        (Outcome("quarantined", Reason.IDENTITY_MISMATCH), aiocoap.FORBIDDEN),
        (Outcome("quarantined", "not_a_reason"), aiocoap.BAD_REQUEST),
    ],
)
def test_answer_map(outcome: Outcome, code: aiocoap.Code) -> None:
    """An outcome's CoAP code; MQTT acknowledges every durable outcome."""
    assert coap_code(outcome) == code
    assert mqtt_acks(outcome)
