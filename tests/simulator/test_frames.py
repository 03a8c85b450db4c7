"""Simulated frames decode back to the ground truth through the decoder package."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from decoder.columns import ErrorCode, Flag
from simulator import frames
from simulator.faults import Outcome, parse_faults
from simulator.fleet import FleetSpec, Format
from simulator.schedule import build_schedule
from simulator.truth import build_truth
from storage.rows import EARLIEST_READ_AT_S, MAX_CLOCK_AHEAD_S

SPEC = FleetSpec(meters=120, days=6, seed=21)
TRUTH = build_truth(SPEC, parse_faults("all,low_battery=0.3,valve_closed=0.3,corrupt=0.05"))
REGISTERS = TRUTH.register_ml()
UPLINKS = build_schedule(TRUTH)
# flags a format's frame can carry (the rest are not representable on that wire)
CARRIED = {
    Format.CJT188: Flag.VALVE_CLOSED | Flag.LOW_BATTERY,
    Format.OMS: Flag.LOW_BATTERY,
    Format.SENML: Flag.LEAK | Flag.REVERSE_FLOW | Flag.TAMPER,
    Format.INTERVAL: Flag.LEAK | Flag.BURST | Flag.LOW_BATTERY,
}


# The format's own module, used when `decoder` itself is shadowed: under pytest's default
# rootdir sys.path, tests/decoder (no __init__.py) makes `decoder` a namespace package.
FORMAT_MODULE = {
    Format.CJT188: "decoder.cjt188",
    Format.OMS: "decoder.mbus",
    Format.SENML: "decoder.senml",
    Format.INTERVAL: "decoder.interval",
}


def _decode(fmt: Format, payloads: list[bytes], received: np.ndarray) -> Any:
    """Decode with `decoder.decode_batch`, or the format's own decoder when shadowed."""
    keys = {m.address: m.oms_key for m in TRUTH.meters if m.oms_key is not None}
    decode_batch: Callable[..., Any] | None = getattr(
        importlib.import_module("decoder"), "decode_batch", None
    )
    if decode_batch is not None:
        return decode_batch(payloads, received, keys=keys)
    return importlib.import_module(FORMAT_MODULE[fmt]).decode(payloads, received, keys)


@pytest.mark.parametrize("fmt", list(Format))
def test_frames_decode_back_to_truth(fmt: Format) -> None:
    """Every clean uplink of a format decodes to the true registers, hours and flags."""
    ups = [
        u
        for u in UPLINKS
        if TRUTH.meters[u.meter].format is fmt and u.outcome is Outcome.STORED and not u.corrupt
        and u.clock_offset_s == 0
    ]  # fmt: skip
    assert ups
    payloads = [frames.encode(TRUTH, u, REGISTERS) for u in ups]
    received = np.array([u.send_s for u in ups], np.int64)
    out = _decode(fmt, payloads, received)
    assert list(out.error_code) == [ErrorCode.OK] * len(ups), set(out.error_message)
    start = SPEC.start_s
    for i, u in enumerate(ups):
        mine = np.flatnonzero(out.frame_index == i)
        got = {
            (int(out.read_at_s[j]) - start) // 3600: (int(out.register_ml[j]), int(out.flags[j]))
            for j in mine
            if not out.flags[j] & Flag.BILLING_DATE
        }
        want_hours = list(u.hours)
        assert sorted(got) == want_hours
        for h in want_hours:
            assert got[h][0] == REGISTERS[u.meter, h]
            if fmt is not Format.INTERVAL:
                assert got[h][1] & CARRIED[fmt] == TRUTH.flags[u.meter, h] & CARRIED[fmt]
        if fmt is Format.INTERVAL:  # nbm1: the alarms latched over the batch, on the newest
            # hour, with the valve's position at that hour (a state, not latched)
            latched = np.bitwise_or.reduce(TRUTH.flags[u.meter, u.first_h : u.last_h + 1])
            valve = int(Flag.VALVE_CLOSED)
            latched = int(latched) & ~valve | int(TRUTH.flags[u.meter, u.last_h]) & valve
            assert got[u.last_h][1] & CARRIED[fmt] == latched & CARRIED[fmt]
        assert {out.address[j] for j in mine} <= {TRUTH.meters[u.claimed].address}


@pytest.mark.parametrize("fmt", list(Format))
def test_corrupt_frames_are_rejected(fmt: Format) -> None:
    """A corrupted uplink never decodes to a reading."""
    ups = [u for u in UPLINKS if TRUTH.meters[u.meter].format is fmt][:20]
    import dataclasses

    bad = [frames.encode(TRUTH, dataclasses.replace(u, corrupt=True), REGISTERS) for u in ups]
    out = _decode(fmt, bad, np.array([u.send_s for u in ups], np.int64))
    assert all(code != ErrorCode.OK for code in out.error_code)
    assert out.n_readings == 0


def test_identity_frame_carries_the_victims_address() -> None:
    """A misused identity shows up as the victim's address inside the frame."""
    odd = [u for u in UPLINKS if u.claimed != u.meter]
    assert odd
    for u in odd:
        fmt = TRUTH.meters[u.meter].format
        payload = frames.encode(TRUTH, u, REGISTERS)
        victim = TRUTH.meters[u.claimed].address
        if fmt is Format.CJT188 or fmt is Format.OMS:
            assert bytes.fromhex(victim)[::-1] in payload


def test_reset_clocks_encode_and_decode_as_past_or_future() -> None:
    """Every clock-reset uplink encodes (an OMS clock restarts in 2000: its years cannot
    show 1970) and decodes to readings storage refuses as clock_past or clock_future."""
    truth = build_truth(FleetSpec(meters=160, days=8, seed=3), {"clock_reset": 1.0})
    registers = truth.register_ml()
    reset = [u for u in build_schedule(truth) if u.fault == "clock_reset"]
    assert {truth.meters[u.meter].format for u in reset} == set(Format)
    payloads = [frames.encode(truth, u, registers) for u in reset]
    keys = {m.address: m.oms_key for m in truth.meters if m.oms_key is not None}
    received = np.array([u.send_s for u in reset], np.int64)
    out = importlib.import_module("decoder").decode_batch(payloads, received, keys=keys)
    assert list(out.error_code) == [ErrorCode.OK] * len(reset)
    assert out.n_readings > 0
    for j in range(out.n_readings):
        read_at, got = int(out.read_at_s[j]), int(received[out.frame_index[j]])
        assert read_at < EARLIEST_READ_AT_S or read_at > got + MAX_CLOCK_AHEAD_S
