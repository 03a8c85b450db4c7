"""Downlink command encoders and answer parsing: CJ/T 188 write frames byte-exact against
the published valve frames in cjt188.jsonl, clock writes, the JSON envelope, and replies
that are refused when they are not this meter's answer to this command."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from decoder.commands import (
    Pending,
    check_args,
    cjt188_write,
    downlink,
    parse_cjt188_reply,
    parse_results,
)

VECTORS = Path(__file__).parents[2] / ".." / "shared" / "vectors"
ADDRESS = "78330011223344"


def _valve_vectors() -> list[object]:
    if not VECTORS.is_dir():
        reason = f"{VECTORS} absent: shared vector tests skipped"
        return [pytest.param(None, marks=pytest.mark.skip(reason=reason))]
    out = []
    for n, line in enumerate((VECTORS / "cjt188.jsonl").read_text().splitlines()):
        vec = json.loads(line)
        if vec.get("kind") == "command_request" and vec["derived"].get("di") == "A017":
            out.append(pytest.param(vec, id=f"cjt188.jsonl:{n}"))
    return out


@pytest.mark.parametrize("vec", _valve_vectors())
def test_valve_write_matches_published_frames(vec: dict) -> None:
    """cjt188_write rebuilds each published A017 valve frame byte for byte."""
    want = bytes.fromhex(vec["hex"])
    value = bytes.fromhex(vec["expected"]["value"])
    got = cjt188_write(
        vec["expected"]["address_A6_A0"],
        "water",
        bytes.fromhex("A017"),
        int(vec["expected"]["SER"], 16),
        value,
        preamble=vec["derived"]["preamble_fe_count"],
    )
    assert got == want


def _reply(
    address: str, di: bytes, ser: int, control: int = 0x84, st: bytes = b"\x00\x00"
) -> bytes:
    data = di + bytes([ser]) + st
    body = bytes([0x68, 0x10]) + bytes.fromhex(address)[::-1] + bytes([control, len(data)]) + data
    return body + bytes([sum(body) & 0xFF, 0x16])


def test_envelope_for_a_cjt188_meter_carries_its_own_frames() -> None:
    """Valve close → A017 value 99, clock set → A015 with the collector's clock (Beijing
    time, ss mm hh DD MM YY CC); SER = id mod 256; commands in the order given."""
    now_s = int(datetime(2026, 12, 6, 16, 30, 5, tzinfo=UTC).timestamp())
    cmds = [
        Pending(300, "valve", {"action": "close"}, "cjt188", "water", ADDRESS),
        Pending(301, "clock", {}, "cjt188", "gas", ADDRESS),
    ]
    body = json.loads(downlink(cmds, now_s))
    assert body["v"] == 1
    valve, clock = body["cmds"]
    head = bytes.fromhex("6810443322110033780404a0172c99")  # 300 mod 256 = 0x2c
    assert valve == {
        "id": 300,
        "kind": "valve",
        "args": {"action": "close"},
        "frame": (head + bytes([sum(head) & 0xFF, 0x16])).hex(),
    }
    clk = bytes.fromhex(clock["frame"])
    assert clk[1] == 0x30
    assert clk[9:11] == bytes([0x04, 0x0A])
    assert clk[11:14] == b"\xa0\x15\x2d"
    assert clk[14:21] == bytes.fromhex("05300007122620")  # 00:30:05 on 2026-12-07 in Beijing
    assert clock["args"] == {"utc_s": now_s}
    assert downlink([], now_s) == b""


def test_envelope_for_senml_devices_is_the_documented_json() -> None:
    """No frame for the project's own devices: kind and args only."""
    cmd = Pending(7, "reporting", {"interval_s": 900}, "senml", "water", "abc")
    assert json.loads(downlink([cmd], 0)) == {
        "v": 1,
        "cmds": [{"id": 7, "kind": "reporting", "args": {"interval_s": 900}}],
    }


@given(st.integers(1, 2**40), st.booleans())
def test_reply_round_trip(command_id: int, abnormal: bool) -> None:
    """A reply to the command's SER from the meter itself parses; C4 means failed."""
    raw = _reply(ADDRESS, b"\xa0\x17", command_id & 0xFF, 0xC4 if abnormal else 0x84)
    got = parse_cjt188_reply(b"\xfe\xfe" + raw, ADDRESS, command_id)
    assert got.command_id == command_id
    assert got.ok is not abnormal


@pytest.mark.parametrize(
    ("frame", "why"),
    [
        (_reply("00000000000001", b"\xa0\x17", 5), "another meter"),
        (_reply(ADDRESS, b"\xa0\x17", 6), "SER"),
        (_reply(ADDRESS, b"\x90\x1f", 5, control=0x81), "not a write-data reply"),
        (_reply(ADDRESS, b"\xa0\x17", 5)[:-2] + b"\x00\x16", "checksum"),
        (b"\x68\x10", "not a CJ/T 188 frame"),
    ],
)
def test_reply_refused(frame: bytes, why: str) -> None:
    """A reply that is not this meter's answer to command 5 is refused, never counted."""
    with pytest.raises(ValueError, match=why):
        parse_cjt188_reply(frame, ADDRESS, 5)


def test_parse_results_json_and_frames() -> None:
    """A list mixing a JSON answer and a CJ/T 188 reply; bad bodies say what is wrong."""
    reply = _reply(ADDRESS, b"\xa0\x15", 9).hex()
    got = parse_results(
        json.dumps(
            [{"id": 3, "ok": False, "result": {"error": "jammed"}}, {"id": 9, "frame": reply}]
        ).encode(),
        ADDRESS,
    )
    assert [(r.command_id, r.ok) for r in got] == [(3, False), (9, True)]
    assert got[0].result == {"error": "jammed"}
    for body, why in [
        (b"nope", "not JSON"),
        (b"[]", "1 to"),
        (b'{"id": "x", "ok": true}', "integer id"),
        (b'{"id": 1, "ok": "yes"}', "ok"),
        (b'{"id": 1, "frame": "zz"}', "hex"),
        (b"[" * 2000 + b"]" * 2000, "nested 2000 levels"),  # past the parser's recursion
    ]:
        with pytest.raises(ValueError, match=why):
            parse_results(body, ADDRESS)


def test_check_args_normalizes_and_refuses() -> None:
    """Args are checked per kind and format; the clock takes none (it is set at sending)."""
    assert check_args("reporting", "interval", {"interval_s": 900, "report_time": "02:30"}) == {
        "interval_s": 900,
        "report_time": "02:30",
    }
    assert check_args("clock", "cjt188", {}) == {}
    for kind, fmt, args, why in [
        ("reporting", "senml", {"interval_s": 10}, "60 to"),
        ("reporting", "senml", {"report_time": "25:00"}, "HH:MM"),
        ("reporting", "senml", {}, "give interval_s"),
        ("valve", "senml", {"action": "open", "x": 1}, "unknown argument"),
        ("reboot", "senml", {}, "unknown command kind"),
        ("clock", "oms", {}, "cannot take"),
    ]:
        with pytest.raises(ValueError, match=why):
            check_args(kind, fmt, args)


def test_rotate_key_takes_no_key_from_the_caller() -> None:
    """The key of a rollover is the collector's to stage: a caller cannot pass one, only
    name which key (an OMS meter's AES key by default, any other meter's OSCORE context)."""
    from decoder.commands import check_args, rotate_target

    assert check_args("rotate_key", "oms", {}) == {}
    with pytest.raises(ValueError, match="unknown argument"):
        check_args("rotate_key", "oms", {"aes_key": "00" * 16})
    with pytest.raises(ValueError, match="unknown argument"):
        check_args("rotate_key", "senml", {"oscore": {"master_secret": "00"}})
    assert check_args("rotate_key", "cjt188", {}) == {}
    assert rotate_target("cjt188", {}) == "oscore"
    assert rotate_target("oms", {}) == "aes"
    assert check_args("rotate_key", "oms", {"key": "oscore"}) == {"key": "oscore"}
    assert rotate_target("oms", {"key": "oscore"}) == "oscore"
    with pytest.raises(ValueError, match="no OMS AES key"):
        check_args("rotate_key", "interval", {"key": "aes"})
    with pytest.raises(ValueError, match="key must be"):
        check_args("rotate_key", "senml", {"key": "psk"})


def test_rotate_key_of_a_cjt188_meter_has_no_meter_frame() -> None:
    """A CJ/T 188 meter's rotate_key is for its modem's OSCORE stack: args, no write frame."""
    from decoder.commands import Pending, downlink

    cmd = Pending(9, "rotate_key", {"oscore": {"sender_id": "01"}}, "cjt188", "water", "1" * 14)
    body = json.loads(downlink([cmd], 0))
    assert body["cmds"] == [
        {"id": 9, "kind": "rotate_key", "args": {"oscore": {"sender_id": "01"}}}
    ]


def test_read_of_a_cjt188_meter_has_no_meter_frame() -> None:
    """A read is an LwM2M Read: in an envelope (a CJ/T 188 LwM2M client's meter that also
    takes one) it goes with its args and no write frame, never sinking the envelope."""
    from decoder.commands import Pending, downlink

    read = Pending(10, "read", {"path": "/3/0/9"}, "cjt188", "water", "1" * 14)
    valve = Pending(11, "valve", {"action": "close"}, "cjt188", "water", "1" * 14)
    body = json.loads(downlink([read, valve], 0))
    assert body["cmds"][0] == {"id": 10, "kind": "read", "args": {"path": "/3/0/9"}}
    assert "frame" in body["cmds"][1]
