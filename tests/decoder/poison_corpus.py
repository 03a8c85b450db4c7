"""Poison frames for the decoders: valid seeds per format and a deterministic mutation corpus.

Shared by tests/decoder/test_poison_frames.py, tests/collector/test_poison.py and
bench/attack_poison.py. Everything is generated from the project's own encoders, so the
corpus needs no files outside the repository, and a seed makes it the same on every run.

Kinds of poison: bit flips and byte substitutions, truncations, inserted runs, JSON and
CBOR nested far past any parser's recursion limit (the `{"a":[[[...` of issue 10 among
them), CBOR heads and M-Bus/CJ/T 188 length fields that declare huge sizes, documents
over the size limit, and CBOR tags that build cycles or regular expressions.

For whole uplinks (`poison_uplink`) also: a NUL or an unpaired surrogate in the address a
SenML pack reports, bytes the database refuses to archive (`REFUSALS_SQL` installs test
triggers standing for any such refusal), and frames on which a decoder or a detector
raises (`register_crashing_formats` adds two test formats standing for decoder bugs).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

from decoder import cjt188, interval, mbus_encode, registry
from decoder.columns import Decoded
from decoder.encode_cjt188 import encode_cjt188
from decoder.encode_senml import encode_senml, water_pack

RX = 1_700_000_000
WHEN = datetime.fromtimestamp(RX - 600, UTC)

# the payload of issue 10, finding 1 (1,005 bytes): RecursionError in CJ/T 188's JSON unwrap
ISSUE_PAYLOAD = b'{"a":' + b"[" * 1000

DEEP: tuple[bytes, ...] = (
    ISSUE_PAYLOAD,
    b"[" * 5000,
    b"[" + b'{"n":"x","v":[' * 800,
    b'[{"bn":"urn:m:1","v":' + b"[" * 3000 + b"1" + b"]" * 3000 + b"}]",
    b'{"services":[{"data":' * 600 + b"0" + b"}]" * 600,
    b"\x81" * 3000,  # CBOR: array of array of ...
    b"\x9f" * 3000,  # CBOR: indefinite arrays
    b"\x81\xa1\x00" + b"\x81" * 2000,  # a pack whose first record holds deep nesting
    b"\x81" + b"\xa1\x00" * 2000,  # maps in maps
)
HUGE: tuple[bytes, ...] = (
    b"\x81\xa1\x00\x5b" + b"\x7f" + b"\xff" * 7,  # byte string of 2**63 - 1 bytes
    b"\x81\xa1\x00\x7b" + b"\x00\x00\x00\x10\x00\x00\x00\x00",  # text string of 64 GiB
    b"\x9b" + b"\xff" * 8 + b"\xa1\x00\x01",  # array of 2**64 - 1 items
    b"\x81\xbb" + b"\x7f" + b"\xff" * 7,  # map of 2**63 - 1 pairs
    b"\x81\xa1\x00\xd8\x1c\x81\xd8\x1d\x00",  # shared reference: an array containing itself
    b"\x81\xa1\x00\xd8\x23\x63a**",  # tag 35: a regular expression
    b"[" + b'{"n":"urn:m:1","u":"m3","v":1},' * 3000 + b"{}]",  # 90 KB JSON pack
    b"\x68\x10" + b"\x11" * 7 + b"\x81\xff" + b"\x00" * 40 + b"\x16",  # CJ/T 188 L = 255
    b"\x68\xff\xff\x68\x08\x00\x72" + b"\x00" * 60 + b"\x16",  # wired M-Bus L = 255
    b"\xff\x44" + b"\x00" * 30,  # wireless M-Bus L = 255, 32 bytes
    b"NI\x01\xff" + b"\x00" * 40,  # nbm1 with K = 255
)


def seeds() -> dict[str, list[bytes]]:
    """Valid frames per format key (each decodes OK on its own)."""
    rng = random.Random(7)
    addresses = [f"{rng.randrange(10**14):014d}" for _ in range(6)]
    out: dict[str, list[bytes]] = {
        "cjt188": [
            encode_cjt188(
                address=a,
                total_ml=rng.randrange(10**6) * 10_000,
                settlement_ml=rng.randrange(10**6) * 10_000,
                clock=WHEN,
                status=rng.randrange(8),
                preamble=rng.randrange(3),
                di_order=("be", "le")[i % 2],
            )
            for i, a in enumerate(addresses)
        ]
        + [bytes.fromhex(h) for h, want in cjt188.EXAMPLES if want["error_code"] == 0],
        "interval": [
            interval.encode_interval(a, RX - RX % 3600 - 86_400, 1000 * i, [1000 * i] * 23)
            for i, a in enumerate(addresses, 1)
        ],
        "senml": [
            encode_senml(
                water_pack(f"urn:imei:{a}", [(RX - 3600, 1000 * i), (RX, 2000 * i)]),
                cbor=bool(i % 2),
            )
            for i, a in enumerate(addresses, 1)
        ],
        "mbus": [
            mbus_encode.encode_wired(a[-8:], "ACW", 0x14, 0x07, 3, 54_321_000 + i, WHEN)
            for i, a in enumerate(addresses[:3])
        ]
        + [
            mbus_encode.encode_oms_plain(a[-8:], "DME", 1, 7, i, 5_000 * i, WHEN)
            for i, a in enumerate(addresses[3:], 1)
        ],
    }
    return out


def mutate(frame: bytes, rng: random.Random) -> bytes:
    """One to four random edits of `frame` (deterministic for a seeded `rng`)."""
    b = bytearray(frame)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(9)
        if op == 0 and b:  # flip a bit
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif op == 1 and b:  # substitute a byte
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 2 and b:  # truncate
            del b[rng.randrange(len(b)) :]
        elif op == 3:  # insert a run of one byte
            at = rng.randrange(len(b) + 1)
            b[at:at] = bytes([rng.randrange(256)]) * rng.randint(1, 300)
        elif op == 4 and b:  # repeat a slice
            at = rng.randrange(len(b))
            b[at:at] = b[at : at + rng.randint(1, 40)] * rng.randint(2, 100)
        elif op == 5:  # splice in deep nesting
            at = rng.randrange(len(b) + 1)
            opener = rng.choice([b"[", b'{"a":', b"\x81", b"\x9f", b"\xa1\x00"])
            b[at:at] = opener * rng.randint(40, 1500)
        elif op == 6 and b:  # a length/size field that declares far too much
            at = rng.randrange(len(b))
            b[at : at + 9] = rng.choice([b"\xff", b"\x5b\x7f" + b"\xff" * 7, b"\x9b" + b"\xff" * 8])
        elif op == 7:  # junk at the end
            b += bytes(rng.randrange(256) for _ in range(rng.randint(1, 30)))
        elif op == 8 and b:  # swap two bytes
            i, j = rng.randrange(len(b)), rng.randrange(len(b))
            b[i], b[j] = b[j], b[i]
    return bytes(b)


def corpus(count: int, seed: int = 1, fmt: str | None = None) -> Iterator[bytes]:
    """`count` poison frames: mutated seeds (of `fmt`, or of every format), plus now and then
    one of DEEP or HUGE, the same sequence for the same `seed`."""
    rng = random.Random(seed)
    pool = seeds()
    frames = pool[fmt] if fmt is not None else [f for fs in pool.values() for f in fs]
    fixed = DEEP + HUGE
    for n in range(count):
        if n % 25 == 0:
            yield fixed[(n // 25) % len(fixed)]
        else:
            yield mutate(rng.choice(frames), rng)


# --- whole uplinks ------------------------------------------------------------------------

CRASH, DETECT = b"\xfeCRASH-", b"\xfeDETECT-"  # claimed by the crashing test formats
REFUSED = b"\xfePOISON-"  # refused by the database in raw_uplinks (REFUSALS_SQL)
REFUSED_TWICE = b"\xfePOISON-TWICE-"  # ... and in quarantine while it carries a payload

REFUSALS_SQL = r"""
CREATE TABLE IF NOT EXISTS test_refused_tenants (tenant_id bigint PRIMARY KEY);
CREATE OR REPLACE FUNCTION test_refuse_archive() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF position('\xfe504f49534f4e2d'::bytea IN NEW.payload) = 1 THEN
        RAISE EXCEPTION 'test trigger: this payload is refused' USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE OR REPLACE FUNCTION test_refuse_quarantine() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF position('\xfe504f49534f4e2d54574943452d'::bytea IN NEW.payload) = 1
       OR NEW.tenant_id IN (SELECT tenant_id FROM test_refused_tenants) THEN
        RAISE EXCEPTION 'test trigger: quarantine refused' USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER test_refuse_archive BEFORE INSERT ON raw_uplinks
    FOR EACH ROW EXECUTE FUNCTION test_refuse_archive();
CREATE TRIGGER test_refuse_quarantine BEFORE INSERT ON quarantine
    FOR EACH ROW EXECUTE FUNCTION test_refuse_quarantine();
"""
UNDO_REFUSALS_SQL = (
    "DROP TRIGGER test_refuse_archive ON raw_uplinks;"
    " DROP TRIGGER test_refuse_quarantine ON quarantine"
)


def _crash_detect(frame: bytes) -> bool:
    return frame.startswith(CRASH)


def _crash_decode(*_: object, **__: object) -> Decoded:
    raise RecursionError("maximum recursion depth exceeded (test format)")


def _detect_raises(frame: bytes) -> bool:
    if frame.startswith(DETECT):
        raise RecursionError("detector bug (test format)")
    return False


def register_crashing_formats() -> Callable[[], None]:
    """Register two formats whose decoder / detector raise on their frames (stand-ins for
    decoder bugs); return the function that removes them again."""
    registry.register(registry.Format("test-crash", _crash_detect, _crash_decode))
    registry.register(registry.Format("test-detect", _detect_raises, _crash_decode))

    def undo() -> None:
        for key in ("test-crash", "test-detect"):
            registry._FORMATS.pop(key, None)

    return undo


def senml_pack(address: str, value: str = "1.5") -> bytes:
    """A SenML JSON pack of one water volume record reported by `address` (any text)."""
    record: dict[str, object] = {"bn": f"{address}/3424/0/", "n": "1", "u": "m3"}
    text = json.dumps([record])  # escapes NUL and surrogates as \u0000 / \ud800
    return text.replace('"u": "m3"', f'"u": "m3", "v": {value}').encode()


def poison_uplink(i: int, max_bytes: int = 60_000) -> bytes:
    """The i-th poison payload: a rotation over every kind, each one unique; cut to
    `max_bytes` (a CoAP datagram without Block1 stays under 1 KB; all kinds stay poison).

    Bytes the database refuses are 1 in 10 (each costs its batch a split)."""
    tag = f"{i:06d}".encode()
    kinds = (
        lambda: DEEP[i % len(DEEP)] + b" #" + tag,
        lambda: senml_pack(f"urn:dev:\x00{i}"),
        lambda: senml_pack(f"urn:dev:\ud800{i}"),
        lambda: CRASH + tag,
        lambda: DETECT + tag,
        lambda: list(corpus(2, seed=i))[1],  # a mutated frame of any format
    )
    if i % 20 in (3, 13):
        payload = (REFUSED if i % 20 == 3 else REFUSED_TWICE) + tag
    else:
        payload = kinds[i % len(kinds)]()
    return payload if len(payload) <= max_bytes else payload[: max_bytes - 8] + b" #" + tag
