"""LwM2M server side, pure parts: registration queries, Send packs named by the endpoint,
mailbox commands as Write/Execute operations."""

from __future__ import annotations

from decimal import Decimal

import cbor2
import pytest

from decoder import senml
from decoder.commands import Pending, check_args, setting_of
from decoder.lwm2m import (
    SENML_CBOR,
    SENML_JSON,
    TEXT_PLAIN,
    TLV,
    objects_of,
    operations,
    read_content,
    registration_params,
    with_endpoint,
)

EP = "urn:imei:861234567890123"


def test_register_query_with_queue_mode_in_both_spellings() -> None:
    """1.1 `Q` and 1.0 `b=UQ` both mean Queue Mode; lt defaults to 86400 s; binding U."""
    q11 = registration_params([f"ep={EP}", "lwm2m=1.1", "Q"], register=True)
    assert (q11.endpoint, q11.lifetime_s, q11.binding, q11.queue_mode) == (EP, 86400, "U", True)
    q10 = registration_params([f"ep={EP}", "lwm2m=1.0", "lt=300", "b=UQ"], register=True)
    assert (q10.lifetime_s, q10.binding, q10.queue_mode) == (300, "UQ", True)
    update = registration_params(["lt=600"], register=False)
    assert (update.endpoint, update.lifetime_s, update.queue_mode) == (None, 600, None)


@pytest.mark.parametrize(
    ("query", "says"),
    [
        (["lwm2m=1.1"], "ep must"),
        ([f"ep={EP}", "lwm2m=2.0"], "lwm2m must"),
        ([f"ep={EP}", "lwm2m=1.1", "lt=5"], "lt must"),
        ([f"ep={EP}", "lwm2m=1.1", "b=X"], "b must"),
    ],
)
def test_register_query_refused(query: list[str], says: str) -> None:
    """A query without a usable endpoint, version, lifetime or binding says which."""
    with pytest.raises(ValueError, match=says):
        registration_params(query, register=True)


def test_objects_of_link_format() -> None:
    """Object instances from the registration payload; an object without instance: []."""
    assert objects_of('</>;rt="oma.lwm2m",</1/0>,</3/0>,</3306/2>,</3424>') == {
        1: [0],
        3: [0],
        3306: [2],
        3424: [],
    }


def test_send_pack_gets_the_endpoint_as_base_name_json_keeps_literals() -> None:
    """Bare object paths get the endpoint in front (JSON text kept: exact numbers), and
    the SenML decoder then attributes the readings and health to that meter."""
    pack = (
        b'[{"bn":"/3424/0/","bt":1700000000,"n":"1","v":123.456},'
        b'{"bn":"/3/0/","n":"7","v":3600},{"n":"9","v":87}]'
    )
    fixed = with_endpoint(pack, EP)
    assert b"123.456" in fixed
    readings, meter, extra = senml.decode_one(fixed, 1700000100)
    assert meter == EP
    assert readings == [(1700000000, 123_456_000, 0)]
    assert (extra["battery_mv"], extra["battery_pct"]) == (3600, 87)


def test_send_pack_cbor_without_base_name_and_named_packs_unchanged() -> None:
    """A CBOR pack without bn gets one; a pack naming a meter is left as it is."""
    pack = cbor2.dumps([{0: "/3424/0/1", 6: 1700000000, 2: Decimal("1.5")}])
    readings, meter, _ = senml.decode_one(with_endpoint(pack, EP), 1700000100)
    assert (meter, readings) == (EP, [(1700000000, 1_500_000, 0)])
    named = b'[{"bn":"urn:imei:1/3424/0/","n":"1","v":1}]'
    assert with_endpoint(named, EP) == named
    assert with_endpoint(b"not senml", EP) == b"not senml"


def _pending(kind: str, **args: object) -> Pending:
    return Pending(7, kind, args, "senml", "water", EP)


def test_commands_as_operations() -> None:
    """valve → Write /3306/i/5850, clock → Write /3/0/13 now, reporting → Write /1/i/1 and
    Execute /1/i/8; SenML CBOR bodies."""
    objects = {1: [0], 3: [0], 3306: [1]}
    (valve,) = operations(_pending("valve", action="open"), objects, 1_700_000_000)
    assert (valve.method, valve.path, valve.content_format) == (
        "PUT",
        ("3306", "1", "5850"),
        SENML_CBOR,
    )
    assert cbor2.loads(valve.payload) == [{-2: "/3306/1/5850", 4: True}]
    (clock,) = operations(_pending("clock"), objects, 1_700_000_000)
    assert cbor2.loads(clock.payload) == [{-2: "/3/0/13", 2: 1_700_000_000}]
    write, execute = operations(_pending("reporting", interval_s=900), objects, 0)
    assert (write.name, execute.name) == ("write /1/0/1", "execute /1/0/8")
    assert cbor2.loads(write.payload) == [{-2: "/1/0/1", 2: 900}]
    assert execute.payload == b""


@pytest.mark.parametrize(
    ("command", "says"),
    [
        (_pending("valve", action="close"), "no object 3306"),
        (_pending("reporting", report_time="02:00"), "report_time"),
        (_pending("read", path="/3424/0"), "no object 3424"),
    ],
)
def test_commands_a_client_cannot_take(command: Pending, says: str) -> None:
    """A valve without object 3306, a report time: refused with the reason."""
    with pytest.raises(ValueError, match=says):
        operations(command, {1: [0], 3: [0]}, 0)


def test_read_as_a_get_and_its_args() -> None:
    """read → GET of the path (of a registered object); the path is checked and written
    plainly; a read supersedes only a read of the same path."""
    (get,) = operations(_pending("read", path="/3/0/9"), {3: [0]}, 0)
    assert (get.method, get.path, get.name, get.payload) == (
        "GET",
        ("3", "0", "9"),
        "read /3/0/9",
        b"",
    )
    assert check_args("read", "senml", {"path": "/3/00/7/0"}) == {"path": "/3/0/7/0"}
    for bad in ("3/0/9", "/3/0/9/1/2", "/65535", "/a", "/", 7):
        with pytest.raises(ValueError, match="LwM2M path"):
            check_args("read", "senml", {"path": bad})
    assert check_args("read", "cjt188", {"path": "/3/0/9"}) == {"path": "/3/0/9"}  # any format
    assert setting_of("read", {"path": "/3/0/9"}) != setting_of("read", {"path": "/3/0/7"})


def test_read_content_in_each_format() -> None:
    """SenML JSON/CBOR → records with exact values (fractions as decimal text), text/plain
    → its text, TLV → entries with hex values, opaque → hex; a bad content says so."""
    pack = b'[{"bn":"/3424/0/","bt":1700000000,"n":"1","v":12.345},{"n":"3","v":2}]'
    got = read_content(SENML_JSON, pack, 1_700_000_100)
    assert got["format"] == "senml+json"
    assert got["records"] == [
        {"n": "/3424/0/1", "t": 1_700_000_000, "v": "12.345"},
        {"n": "/3424/0/3", "t": 1_700_000_000, "v": 2},
    ]
    cbor = cbor2.dumps([{-2: "/3/0/9", 2: 87}])
    assert read_content(SENML_CBOR, cbor, 5)["records"] == [{"n": "/3/0/9", "t": 5, "v": 87}]
    assert read_content(TEXT_PLAIN, b"87", 0)["value"] == "87"
    # TLV: object instance 0 holding resource 9 (1 byte, 87) and resource 0 (text "AB")
    inner = bytes([0xC1, 9, 87, 0xC2, 0, 0x41, 0x42])
    tlv = read_content(TLV, bytes([0x08, 0, len(inner)]) + inner, 0)
    assert tlv["entries"] == [
        {"type": "object_instance", "id": 0, "entries": [
            {"type": "resource", "id": 9, "hex": "57"},
            {"type": "resource", "id": 0, "hex": "4142"},
        ]}
    ]  # fmt: skip
    assert read_content(42, b"\x01\x02", 0) == {
        "content_format": 42,
        "format": "opaque",
        "hex": "0102",
    }
    broken = read_content(TLV, bytes([0xC4, 9, 1]), 0)
    assert "runs past" in str(broken["error"])
    assert broken["hex"] == "c40901"
    assert "not senml+json" in str(read_content(SENML_JSON, b"[{]", 0)["error"])


def test_read_content_keeps_a_huge_whole_number_as_text() -> None:
    """A whole value past int8 (1E+999999) is its decimal text, read at once; smaller whole
    values are numbers."""
    pack = b'[{"bn":"/3/0/","n":"9","v":1E+999999,"t":1700000000},{"n":"7","v":3600}]'
    got = read_content(SENML_JSON, pack, 1_700_000_100)
    assert [(r["n"], r["v"]) for r in got["records"]] == [  # type: ignore[union-attr]
        ("/3/0/9", "1.000000000000000000000000000E+999999"),  # bv + v: 28 digits
        ("/3/0/7", 3600),
    ]
