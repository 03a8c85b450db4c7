"""`collector.oscore_lean` against aiocoap's own OSCORE path: same inner requests and
replay windows, byte-identical answers the device's context unprotects, the common case
only (the rest declined to aiocoap's path).

In process, no stack (the fleet, contexts and sites of `bench/oscore_path.py`)."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import aiocoap
import pytest
from aiocoap import oscore

from collector import oscore_lean

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
    """Every format: the collector's site (lean) unprotects the request aiocoap does and
    answers the same bytes as aiocoap's path, which the device's context unprotects."""
    assert {m.fmt for m, _ in meters} == {"interval", "senml", "cjt188"}
    assert lean.check_interop(meters) == len(meters)


def test_lean_declines_what_it_does_not_handle(meters: list[tuple[lean.Meter, bytes]]) -> None:
    """A replayed sequence number and another context's request go to aiocoap's path
    (None); a tampered ciphertext fails its tag and leaves the replay window alone."""
    server = lean.Server([lean.open_row(m, lean.sealed_row(m)) for m, _ in meters[:2]])
    (first, second), _ = lean.oscore_datagrams(meters[:2])
    ctx_a = server.contexts.find_oscore({oscore.COSE_KID: meters[0][0].kid})
    ctx_b = server.contexts.find_oscore({oscore.COSE_KID: meters[1][0].kid})
    try:
        assert oscore_lean.unprotect(ctx_a, aiocoap.Message.decode(first)) is not None
        assert oscore_lean.unprotect(ctx_a, aiocoap.Message.decode(first)) is None
        assert oscore_lean.unprotect(ctx_a, aiocoap.Message.decode(second)) is None
        window = ctx_b.replay_state()
        tampered = second[:-1] + bytes([second[-1] ^ 1])
        with pytest.raises(oscore.ProtectionInvalid):
            oscore_lean.unprotect(ctx_b, aiocoap.Message.decode(tampered))
        assert ctx_b.replay_state() == window
        assert oscore_lean.unprotect(ctx_b, aiocoap.Message.decode(second)) is not None
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
    ctx = server.contexts.find_oscore({oscore.COSE_KID: meter.kid})
    try:
        got = oscore_lean.unprotect(ctx, aiocoap.Message.decode(datagram))
        assert got is not None
        _, lean_request = got
        ctx.grant(100, 1)
        answers = []
        for _ in range(2):
            outer = oscore_lean.protect(ctx, aiocoap.Message(code=aiocoap.CHANGED), lean_request)
            outer.mtype, outer.mid, outer.token = aiocoap.ACK, 1, b"\0\0\0\1"
            answers.append(aiocoap.Message.decode(outer.encode()))
        assert answers[0].opt.oscore == b""  # the request's nonce
        assert answers[1].opt.oscore[:2] == b"\x01\x64"  # partial IV 100, ours
        for answer in answers:
            reply, _ = client.unprotect(answer, request_id)
            assert reply.code == aiocoap.CHANGED
    finally:
        server.close()


def test_request_aad_is_aiocoaps(meters: list[tuple[lean.Meter, bytes]]) -> None:
    """`DeviceContext.request_aad` makes the bytes of aiocoap's external AAD in its
    Encrypt0 structure (RFC 8613 §5.4) for every key id and partial IV length, its own
    key id's and longer ones (where it takes aiocoap's way) included."""
    server = lean.Server([lean.open_row(m, lean.sealed_row(m)) for m, _ in meters[:1]])
    ctx = server.contexts.find_oscore({oscore.COSE_KID: meters[0][0].kid})
    try:
        rng = random.Random(7)
        kids = [ctx.recipient_id] + [rng.randbytes(n) for n in range(0, 30)]
        for kid in kids:
            for n in range(0, 6):
                piv = rng.randbytes(n)
                request_id = oscore.RequestIdentifiers(kid, piv, True, aiocoap.POST)
                external = ctx._extract_external_aad(None, request_id, local_is_sender=False)
                want = oscore.SymmetricEncryptionAlgorithm._build_encrypt0_structure({}, external)
                assert ctx.request_aad(kid, piv) == want, (kid.hex(), piv.hex())
    finally:
        server.close()


def test_nonce_is_aiocoaps(meters: list[tuple[lean.Meter, bytes]]) -> None:
    """`DeviceContext._construct_nonce` makes the bytes of aiocoap's own (RFC 8613 §5.2)
    for every partial IV and key id length a context can meet, and refuses the lengths
    aiocoap refuses (by an assertion, which `python -O` drops) with a ValueError."""
    server = lean.Server([lean.open_row(m, lean.sealed_row(m)) for m, _ in meters[:1]])
    ctx = server.contexts.find_oscore({oscore.COSE_KID: meters[0][0].kid})
    try:
        alg = ctx.alg_aead
        rng = random.Random(7)
        for _ in range(3000):
            piv = rng.randbytes(rng.randint(0, 5))
            kid = rng.randbytes(rng.randint(0, alg.iv_bytes - 6))
            ours = ctx._construct_nonce(piv, kid, alg)
            assert ours == oscore.BaseSecurityContext._construct_nonce(ctx, piv, kid, alg)
            assert len(ours) == alg.iv_bytes
        with pytest.raises(ValueError, match="6-byte partial IV"):
            ctx._construct_nonce(bytes(6), b"\x01", alg)
        with pytest.raises(ValueError, match="8-byte key id"):
            ctx._construct_nonce(b"\x01", bytes(alg.iv_bytes - 5), alg)
    finally:
        server.close()
