"""Poison frames: decode_batch never raises, every bad frame gets a code, and no frame's
values change because of the frames around it (issue 10, finding 1)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from poison_corpus import DEEP, HUGE, ISSUE_PAYLOAD, RX, corpus, mutate, seeds

from decoder import cjt188, decode_batch, kernels, limits, registry
from decoder.columns import Decoded, ErrorCode

SEEDS = seeds()
GOOD = [f for frames in SEEDS.values() for f in frames]
Reading = tuple[str, int, int, int]


def frame_of(d: Decoded, i: int) -> tuple[int, str, list[Reading]]:
    """Frame i's code, meter and readings: what must not depend on the rest of the batch."""
    rows = np.flatnonzero(d.frame_index == i).tolist()
    readings = [
        (str(d.address[r]), int(d.read_at_s[r]), int(d.register_ml[r]), int(d.flags[r]))
        for r in rows
    ]
    return int(d.error_code[i]), str(d.address_of_frame[i]), readings


def alone(frame: bytes) -> tuple[int, str, list[Reading]]:
    """The frame decoded in a batch of its own."""
    return frame_of(decode_batch([frame], RX), 0)


def check_batch(frames: list[bytes]) -> Decoded:
    """Decode `frames` (must not raise) and check what holds for any batch, poison or not."""
    d = decode_batch(frames, RX)
    n = len(frames)
    assert d.n_frames == n
    assert len(d.error_message) == len(d.format) == len(d.address_of_frame) == n
    assert {len(c) for c in (d.frame_index, d.address, d.read_at_s, d.flags)} <= {d.n_readings}
    codes = d.error_code.tolist()
    assert set(codes) <= {int(c) for c in ErrorCode}
    assert all(d.error_message[i] for i, c in enumerate(codes) if c), "a code without a reason"
    assert not np.isin(d.frame_index, np.flatnonzero(~d.ok)).any(), "reading of a bad frame"
    return d


@pytest.mark.parametrize("payload", DEEP + HUGE, ids=lambda p: p[:10].hex())
def test_deep_nesting_and_huge_sizes_get_a_code(payload: bytes) -> None:
    """Deep JSON/CBOR nesting, huge declared lengths and refused tags: a code, no exception."""
    d = check_batch([payload, GOOD[0], payload])
    assert d.error_code[0] != ErrorCode.OK
    assert d.error_code[2] != ErrorCode.OK
    assert frame_of(d, 1) == alone(GOOD[0])


def test_issue_payload_does_not_raise() -> None:
    """The 1,005-byte `{"a":[[[...` of issue 10 is refused as a frame, no RecursionError."""
    d = check_batch([ISSUE_PAYLOAD] * 3 + GOOD)
    assert (d.error_code[:3] != ErrorCode.OK).all()
    assert d.ok[3:].all()


@pytest.mark.parametrize(
    ("pack", "words"),
    [
        (b"[" * 40 + b"]" * 40, "nested 40 levels"),
        (b"\x81\xa1\x00" + b"\x81" * 40, "nested over 32 levels"),
        (b"\x81\xa1\x00\xd8\x1c\x81\xd8\x1d\x00", "tag 29"),
        (b"\x81\xa1\x00\xc1\x01", "tag 1"),
        (b"[" + b'{"n":"m","u":"m3","v":1},' * 3000 + b"{}]", "over the 65536-byte limit"),
    ],
)
def test_senml_past_a_limit_is_malformed(pack: bytes, words: str) -> None:
    """A SenML pack past a parsing limit is MALFORMED, and the reason names the limit."""
    d = check_batch([pack])
    assert d.error_code[0] == ErrorCode.MALFORMED
    assert words in d.error_message[0]


def test_json_depth_ignores_brackets_inside_strings() -> None:
    """Brackets inside JSON strings (escaped quotes too) do not count as nesting."""
    inside = b'["' + b"[" * 100 + b'\\"' + b"{" * 100 + b'", 1]'
    assert limits.json_depth(inside) == 1
    assert limits.load_json(inside)[1] == 1
    escaped_slash = b'["\\\\", ' + b"[" * 40 + b"]" * 40 + b"]"  # the quote after \\ closes
    assert limits.json_depth(escaped_slash) == 41
    with pytest.raises(limits.LimitError, match="41 levels"):
        limits.load_json(escaped_slash)


def test_json_depth_reads_letter_escapes_before_a_quote() -> None:
    """An escape such as `\\n` or `\\u0041` just before a string's closing quote does not
    escape that quote (its letter is part of the escape)."""
    for escape in ("\n", "\u0001", "\t"):
        doc = json.dumps(["x" + escape, [[[[1]]]], "[" * 40]).encode()
        assert limits.json_depth(doc) == 5, doc


def _walk_depth(doc: bytes) -> int:
    """The reference: a byte-by-byte JSON walk (strings and escapes), deepest level."""
    level = deepest = 0
    in_string = escaped = False
    for byte in doc:
        if in_string:
            if escaped:
                escaped = False
            elif byte == ord("\\"):
                escaped = True
            elif byte == ord('"'):
                in_string = False
        elif byte == ord('"'):
            in_string = True
        elif byte in b"[{":
            level += 1
            deepest = max(deepest, level)
        elif byte in b"]}":
            level -= 1
    return deepest


JSONISH = st.lists(st.sampled_from([b"[", b"]", b"{", b"}", b'"', b"\\", b"a", b","]), max_size=300)
NESTED = st.recursive(
    st.one_of(st.integers(), st.text(alphabet='[]{}"\\ab', max_size=6)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=60,
)


@settings(max_examples=300, deadline=None)
@given(parts=JSONISH)
def test_json_depth_never_underestimates(parts: list[bytes]) -> None:
    """On any bytes, json_depth is at least what a byte-by-byte JSON walk finds."""
    doc = b"".join(parts)
    assert limits.json_depth(doc) >= min(_walk_depth(doc), limits.MAX_DEPTH + 1)


@settings(max_examples=300, deadline=None)
@given(value=NESTED)
def test_json_depth_is_exact_on_json(value: object) -> None:
    """On real JSON (brackets and escapes inside strings too), json_depth is exact once it
    scans, and refuses exactly the documents nested past MAX_DEPTH."""
    doc = json.dumps(value).encode()
    want, got = _walk_depth(doc), limits.json_depth(doc)
    if want > limits.MAX_DEPTH:
        assert got > limits.MAX_DEPTH  # refused, whatever the exact figure
    elif doc.count(b"[") + doc.count(b"{") > limits.MAX_DEPTH:
        assert got == want  # scanned: exact
    else:
        assert want <= got <= limits.MAX_DEPTH  # the cheap bound: never refuses good JSON


def test_json_must_be_utf8() -> None:
    """JSON bytes are read as UTF-8 only (no UTF-16 guess from NUL bytes)."""
    with pytest.raises(UnicodeDecodeError):
        limits.load_json(b'["\xff"]')


@pytest.mark.parametrize("fmt", sorted(SEEDS))
def test_mutation_corpus_per_format(fmt: str) -> None:
    """3,000 mutated frames of one format, with good frames between: no exception, a code for
    every bad frame, and every frame decodes in the batch exactly as it does alone."""
    poison = list(corpus(3000, seed=hash(fmt) % 1000, fmt=fmt))
    rng = random.Random(3)
    for start in range(0, len(poison), 60):
        frames = poison[start : start + 60]
        good_at = sorted(rng.sample(range(len(frames) + 4), 4))
        for at in good_at:
            frames.insert(at, rng.choice(SEEDS[fmt]))
        d = check_batch(frames)
        for i, frame in enumerate(frames):
            if i in good_at:
                assert d.error_code[i] == ErrorCode.OK
            if d.error_code[i] == ErrorCode.OK or i in good_at:
                assert frame_of(d, i) == alone(frame)


@pytest.mark.parametrize(
    "frame", [SEEDS["cjt188"][0], SEEDS["cjt188"][3], SEEDS["interval"][0], SEEDS["mbus"][0]]
)
def test_one_corrupt_byte_is_never_a_good_wrong_value(frame: bytes) -> None:
    """Formats with a checksum or CRC: any single corrupted byte is refused, or decodes to
    exactly the original readings (a preamble byte), never to another value marked good."""
    want = alone(frame)
    frames, where = [], []
    for pos in range(len(frame)):
        for value in (frame[pos] ^ 0x01, frame[pos] ^ 0x80, (frame[pos] + 0x11) % 256, 0x00):
            if value != frame[pos]:
                frames.append(frame[:pos] + bytes([value]) + frame[pos + 1 :])
                where.append(pos)
    d = check_batch(frames)
    for i in np.flatnonzero(d.ok).tolist():
        assert frame_of(d, i)[1:] == want[1:], f"byte {where[i]} changed a good frame's values"


FRAME = st.one_of(
    st.sampled_from(GOOD),
    st.sampled_from(DEEP + HUGE),
    st.tuples(st.sampled_from(GOOD), st.integers(0, 2**32)).map(
        lambda fs: mutate(fs[0], random.Random(fs[1]))
    ),
    st.binary(max_size=200),
)


@settings(max_examples=200, deadline=None)
@given(frames=st.lists(FRAME, min_size=1, max_size=30))
def test_random_batches_never_raise(frames: list[bytes]) -> None:
    """Random mixes of good, mutated, deep and huge frames: each decodes as it does alone."""
    d = check_batch(frames)
    for i, frame in enumerate(frames):
        if frame in GOOD:
            assert d.error_code[i] == ErrorCode.OK
        assert frame_of(d, i) == alone(frame)


def test_raising_vectorized_decoder_marks_only_the_culprit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A vectorized decoder that raises on one row: that frame is INTERNAL with the reason,
    the other frames of its group are decoded again one by one and keep their values."""
    fmt = registry.lookup("cjt188")
    assert fmt is not None
    assert fmt.decode_array is not None
    real = fmt.decode_array
    poison = bytearray(SEEDS["cjt188"][1])
    poison[-3] ^= 0xFF  # a status byte: the CS now fails, which the fake decoder ignores

    def flaky(a: np.ndarray, *args: object, **kwargs: object) -> Decoded:
        if any(bytes(row).endswith(bytes(poison[-3:])) for row in a):
            raise RecursionError("maximum recursion depth exceeded")
        return real(a, *args, **kwargs)

    patched = registry.Format(**{**fmt.__dict__, "decode_array": flaky})
    monkeypatch.setitem(registry._FORMATS, "cjt188", patched)
    same_length = [f for f in SEEDS["cjt188"] if len(f) == len(poison)]
    frames = [*same_length, bytes(poison), *same_length]
    d = check_batch(frames)
    bad = len(same_length)
    assert d.error_code[bad] == ErrorCode.INTERNAL
    assert "RecursionError" in d.error_message[bad]
    assert d.format[bad] == "cjt188"
    monkeypatch.setitem(registry._FORMATS, "cjt188", fmt)
    for i, frame in enumerate(frames):
        if i != bad:
            assert frame_of(d, i) == alone(frame)


def test_raising_detector_is_retried_frame_by_frame(monkeypatch: pytest.MonkeyPatch) -> None:
    """A detect_array that raises is retried with detect per frame; a frame whose detect
    raises and that no other format claims is INTERNAL, naming the detector."""
    fmt = registry.lookup("cjt188")
    assert fmt is not None

    def broken_array(_a: np.ndarray) -> np.ndarray:
        raise MemoryError

    def picky(frame: bytes) -> bool:
        if frame.startswith(b"\xee"):
            raise RecursionError("detector bug")
        return cjt188.looks_like(frame)

    patched = registry.Format(**{**fmt.__dict__, "detect_array": broken_array, "detect": picky})
    monkeypatch.setitem(registry._FORMATS, "cjt188", patched)
    frames = [SEEDS["cjt188"][0], b"\xee" + b"\x00" * 20, SEEDS["senml"][0]]
    d = check_batch(frames)
    assert d.error_code.tolist() == [ErrorCode.OK, ErrorCode.INTERNAL, ErrorCode.OK]
    assert "cjt188 detector failed" in d.error_message[1]


def test_malformed_decoder_result_is_not_merged(monkeypatch: pytest.MonkeyPatch) -> None:
    """A decoder returning a result of the wrong shape cannot misattribute readings."""
    fmt = registry.lookup("senml")
    assert fmt is not None

    def short(frames: list[bytes], *args: object, **kwargs: object) -> Decoded:
        return (
            fmt.decode(frames[:-1], *args, **kwargs)
            if len(frames) > 1
            else fmt.decode(frames, *args, **kwargs)
        )

    monkeypatch.setitem(registry._FORMATS, "senml", registry.Format("senml", fmt.detect, short))
    frames = [SEEDS["senml"][0], SEEDS["senml"][2]]
    d = check_batch(frames)
    assert d.ok.all()  # the shape check failed, so each frame was decoded on its own
    monkeypatch.setitem(registry._FORMATS, "senml", fmt)
    assert [frame_of(d, i) for i in range(2)] == [alone(f) for f in frames]


def test_bug_outside_the_guards_decodes_frame_by_frame(monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception in decode_batch's own steps makes it decode each frame on its own."""
    real = kernels.lengths_of

    def broken(frames: list[bytes]) -> np.ndarray:
        if len(frames) > 1:
            raise IndexError("dispatch bug")
        return real(frames)

    frames = [SEEDS["cjt188"][0], SEEDS["senml"][0], b"junk", SEEDS["interval"][0]]
    want = [alone(f) for f in frames]
    monkeypatch.setattr(kernels, "lengths_of", broken)
    d = decode_batch(frames, RX)
    monkeypatch.setattr(kernels, "lengths_of", real)
    assert [frame_of(d, i) for i in range(len(frames))] == want


@settings(max_examples=300, deadline=None)
@given(parts=JSONISH, chunk=st.integers(1, 40))
def test_json_scan_does_not_depend_on_its_chunks(parts: list[bytes], chunk: int) -> None:
    """The chunked scan carries backslash runs, strings and the level across chunk ends:
    any chunk size finds the same depth and the same first offset past the limit."""
    doc = b"".join(parts)
    whole = limits._scan(doc, 3)
    saved, limits._CHUNK = limits._CHUNK, chunk
    try:
        assert limits._scan(doc, 3) == whole
    finally:
        limits._CHUNK = saved


@settings(max_examples=300, deadline=None)
@given(value=NESTED)
def test_json_scan_is_exact_on_json(value: object) -> None:
    """The scan (the path of escaped or long documents) finds a JSON text's exact depth,
    and its offset past the limit is the first bracket that opens a level past it."""
    doc = json.dumps(value).encode()
    found = limits._scan(doc, 3)
    assert found.depth == _walk_depth(doc)
    assert (found.past_at is None) == (found.depth <= 3)
    if found.past_at is not None:
        assert doc[found.past_at] in b"[{"
        assert _walk_depth(doc[: found.past_at]) == 3
