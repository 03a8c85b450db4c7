"""The lean OSCORE path of `bench/oscore_path.py` against aiocoap's: same inner requests,
byte-identical answers the device's context unprotects, the common case only.

In process, no stack: the bench's figures mean something only while this holds."""

from __future__ import annotations

import sys
from pathlib import Path

import aiocoap
import pytest
from aiocoap import oscore

BENCH = str(Path(__file__).resolve().parents[2] / "bench")
sys.path.append(BENCH)
try:
    import oscore_path as lean
finally:  # bench/ holds api.py, collector.py ...: never let it shadow the packages
    while BENCH in sys.path:
        sys.path.remove(BENCH)


@pytest.fixture(scope="module")
def meters() -> list[tuple[lean.Meter, bytes]]:
    """Thirty meters of the city-day mix (nbm1, SenML, CJ/T 188)."""
    return lean.fleet(30)


def test_lean_equals_aiocoap(meters: list[tuple[lean.Meter, bytes]]) -> None:
    """Every format: the lean path unprotects the request aiocoap does and answers the
    same bytes, which the device's aiocoap context unprotects to 2.04."""
    assert {m.fmt for m, _ in meters} == {"interval", "senml", "cjt188"}
    assert lean.check_interop(meters) == len(meters)


def test_lean_declines_what_it_does_not_handle(meters: list[tuple[lean.Meter, bytes]]) -> None:
    """A replayed sequence number and an unknown key id go to aiocoap's path (None); a
    tampered ciphertext fails its tag."""
    server = lean.Server([lean.open_row(m, lean.sealed_row(m)) for m, _ in meters[:2]])
    (first, second), _ = lean.oscore_datagrams(meters[:2])
    try:
        assert lean.lean_unprotect(server.contexts, aiocoap.Message.decode(first)) is not None
        assert lean.lean_unprotect(server.contexts, aiocoap.Message.decode(first)) is None
        (stranger,), _ = lean.oscore_datagrams(meters[2:3])
        assert lean.lean_unprotect(server.contexts, aiocoap.Message.decode(stranger)) is None
        tampered = second[:-1] + bytes([second[-1] ^ 1])
        with pytest.raises(oscore.ProtectionInvalid):
            lean.lean_unprotect(server.contexts, aiocoap.Message.decode(tampered))
    finally:
        server.close()


def test_second_answer_gets_a_sequence_number_of_ours(
    meters: list[tuple[lean.Meter, bytes]],
) -> None:
    """The request's nonce serves one answer only: a second one carries a reserved server
    sequence number (RFC 8613 §8.3), and the device still unprotects it."""
    meter = meters[0][0]
    server = lean.Server([lean.open_row(meter, lean.sealed_row(meter))])
    (datagram,), ((client, request_id),) = lean.oscore_datagrams(meters[:1])
    try:
        got = lean.lean_unprotect(server.contexts, aiocoap.Message.decode(datagram))
        assert got is not None
        _, lean_request, _ = got
        lean_request.ctx.grant(100, 1)
        answers = []
        for _ in range(2):
            outer = lean.lean_protect(aiocoap.Message(code=aiocoap.CHANGED), lean_request)
            outer.mtype, outer.mid, outer.token = aiocoap.ACK, 1, b"\0\0\0\1"
            answers.append(aiocoap.Message.decode(outer.encode()))
        assert answers[0].opt.oscore == b""  # the request's nonce
        assert answers[1].opt.oscore[:2] == b"\x01\x64"  # partial IV 100, ours
        for answer in answers:
            reply, _ = client.unprotect(answer, request_id)
            assert reply.code == aiocoap.CHANGED
    finally:
        server.close()
