"""Pure, vectorized decoders and encoders for NB-IoT meter payloads (no I/O).

`decode_batch(frames, received_at_s)` classifies every frame (a hint, else the registered
detectors in order), groups frames by format, runs each format's batch decoder and merges
the results back into input order (`decoder.columns.concat`). A frame no format claims is
UNKNOWN_FORMAT; an empty one is EMPTY. Untrusted bytes never sink a batch: a detector
that raises is retried frame by frame, a format's batch decode that raises is re-run frame
by frame so that only the culprit is INTERNAL (with the exception), and JSON/CBOR are read
within `decoder.limits` (MALFORMED past them).

The hot path has no per-frame Python except `len()`: frames are grouped by length and
stacked once (`kernels.group_by_length`), array detectors classify whole groups, and a
format with `decode_array` (CJ/T 188) decodes the very array detection looked at.

Formats: `cjt188`, `interval`, `senml`, `driver` (vendor payloads described by driver
files, `decoder.drivers`), `mbus` (M-Bus/OMS; wM-Bus models with a driver file go through it).
Every result then gets the health columns its formats' status bits carry
(`decoder.health.annotate`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import numpy.typing as npt

# isort: off
from decoder import drivers  # noqa: F401  (first: its `driver` format, by magic, is tried first)
from decoder import cjt188, interval, mbus, senml  # noqa: F401  (importing registers them)

# isort: on
from decoder import health
from decoder import kernels as k
from decoder.columns import Decoded, ErrorCode, concat, empty
from decoder.registry import Format, formats, lookup, parse_hint, register

register(Format(key="mbus", detect=mbus.looks_like, decode=mbus.decode, takes_utc_offset=True))

__all__ = ["Decoded", "decode_batch"]

Offset = int | npt.NDArray[np.int64]


_MAX_REASON = 300  # characters of an exception's repr kept in an error message


def _internal(n: int, key: str, message: str) -> Decoded:
    """n frames marked INTERNAL (a decoder or detector raised) with `message`."""
    out = empty(n)
    out.format[:] = key
    out.error_code[:] = ErrorCode.INTERNAL
    out.error_message[:] = message
    return out


def _why(exc: BaseException) -> str:
    text = repr(exc)
    return text if len(text) <= _MAX_REASON else text[:_MAX_REASON] + "..."


def _check_shape(got: object, n: int) -> Decoded:
    """`got` if it is a well-formed Decoded of n frames; ValueError (a decoder bug) else.

    O(1) length checks and one min/max: a result that would misattribute readings to
    frames is never merged.
    """
    if not isinstance(got, Decoded) or got.n_frames != n:
        msg = f"decoder returned {type(got).__name__} for {n} frames"
        raise ValueError(msg)
    m = got.n_readings
    columns = (got.frame_index, got.address, got.read_at_s, got.flags)
    per_frame = (got.format, got.address_of_frame, got.error_message, got.frame_flags_or_zero)
    if any(len(c) != m for c in columns) or any(len(c) != n for c in per_frame):
        msg = "decoder returned columns of different lengths"
        raise ValueError(msg)
    if m and (got.frame_index.min() < 0 or got.frame_index.max() >= n):
        msg = "decoder returned readings of frames it was not given"
        raise ValueError(msg)
    return got


def _detect(
    fmt: Format,
    a: npt.NDArray[np.uint8],
    free: npt.NDArray[np.bool_],
    rows: npt.NDArray[np.int64],
    frames: Sequence[bytes],
    suspects: dict[int, str],
) -> npt.NDArray[np.bool_]:
    """Which rows of the group (among `free`) `fmt` claims; detection never raises.

    A `detect_array` that raises (or answers in the wrong shape) is retried frame by
    frame with `detect`; a frame whose `detect` raises is not claimed by this format and
    is noted in `suspects` (input index -> why), so it is INTERNAL rather than
    UNKNOWN_FORMAT if no other format claims it.
    """
    hit = np.zeros(len(rows), bool)
    if fmt.detect_array is not None:
        try:
            got = np.asarray(fmt.detect_array(a if free.all() else a[free]), bool)
        except Exception:
            got = None
        if got is not None and got.shape == (int(free.sum()),):
            hit[free] = got
            return hit
    for j in np.flatnonzero(free).tolist():
        try:
            hit[j] = bool(fmt.detect(frames[rows[j]]))
        except Exception as exc:
            suspects.setdefault(int(rows[j]), f"{fmt.key} detector failed: {_why(exc)}")
    return hit


def _attempt(
    decode: Callable[..., Decoded],
    sub: object,
    rx: npt.NDArray[np.int64],
    ctx: tuple[Mapping[str, bytes] | None, object | None],
    kwargs: dict[str, object],
    n: int,
) -> Decoded | Exception:
    """One decoder call, checked; its exception returned instead of raised."""
    try:
        return _check_shape(decode(sub, rx, *ctx, **kwargs), n)
    except Exception as exc:
        return exc


def _run(
    fmt: Format,
    decode: Callable[..., Decoded],
    sub: Sequence[bytes] | npt.NDArray[np.uint8],
    n: int,
    rx: npt.NDArray[np.int64],
    ctx: tuple[Mapping[str, bytes] | None, object | None],
    variant: str | None = None,
    utc: Offset | None = None,
) -> Decoded:
    """One group through its decoder; never raises.

    If the vectorized call raises (or returns a malformed result), each frame is decoded
    again on its own: the frames that decode alone keep their results, the culprit gets
    INTERNAL with the exception, and the rest of the group never notices.
    """
    if variant is not None and not fmt.takes_variant:
        out = empty(n)
        out.error_code[:] = ErrorCode.UNSUPPORTED
        out.error_message[:] = f"format {fmt.key} has no variants (hint {variant!r})"
        return out
    kwargs: dict[str, object] = {}
    if fmt.takes_variant:
        kwargs["variant"] = variant
    if fmt.takes_utc_offset and utc is not None:
        kwargs["utc_offset_s"] = utc
    got = _attempt(decode, sub, rx, ctx, kwargs, n)
    if isinstance(got, Decoded):
        return got
    failed = f"{fmt.key} decoder failed on this frame: {{}} (frame kept for re-decode)"
    if n == 1:
        return _internal(1, fmt.key, failed.format(_why(got)))
    parts: list[tuple[npt.NDArray[np.int64], Decoded]] = []
    for i in range(n):  # find the culprit(s): the slow path, only after a decoder bug
        one = dict(kwargs)
        if isinstance(utc, np.ndarray) and "utc_offset_s" in one:  # one offset per row
            one["utc_offset_s"] = utc[i : i + 1]
        alone = _attempt(decode, sub[i : i + 1], rx[i : i + 1], ctx, one, 1)
        if not isinstance(alone, Decoded):
            alone = _internal(1, fmt.key, failed.format(_why(alone)))
        parts.append((np.array([i], np.int64), alone))
    return concat(parts, n)


def _offsets(meter_utc_offset_s: npt.ArrayLike | None, n: int) -> Offset | None:
    """None, one int for the batch, or an int64 column of n; ValueError for a wrong length."""
    if meter_utc_offset_s is None:
        return None
    off = np.asarray(meter_utc_offset_s, np.int64)
    if off.ndim == 0:
        return int(off)
    if off.shape != (n,):
        msg = f"{off.size} meter UTC offsets for {n} frames"
        raise ValueError(msg)
    return off


def decode_batch(
    frames: Sequence[bytes],
    received_at_s: npt.ArrayLike,
    *,
    keys: Mapping[str, bytes] | None = None,
    compact_cache: object | None = None,
    hints: Sequence[str | None] | None = None,
    meter_utc_offset_s: npt.ArrayLike | None = None,
) -> Decoded:
    """Frames + receive times (scalar or per frame) -> Decoded; bad frames get codes.

    `keys` maps meter id -> AES key (M-Bus/OMS; `keys["*"]` is the key for any meter with
    no key of its own); `compact_cache` is the M-Bus format signature cache (updated in
    place); `hints[i]` ("cjt188", "cjt188:mfunhcu", "interval:w1t", "senml", "mbus") skips
    detection for frame i. `meter_utc_offset_s` (seconds east of UTC, one int or one per
    frame: the tenant's or meter's time zone) says how to read meter clocks that keep local
    time; None keeps each format's default: CJ/T 188 +8 h (China Standard Time, or the
    model's), M-Bus 0 (meter clock read as UTC). Formats whose times are UTC by definition
    (SenML, nbm1 interval batches) ignore it. Raises ValueError only for an unusable batch
    (hints, receive times or offsets of the wrong length); never for a bad frame: an
    exception of any detector or decoder becomes that frame's INTERNAL code (see `_run`),
    and one raised outside them (a bug here) makes the batch be decoded frame by frame.
    """
    n = len(frames)
    if hints is not None and len(hints) != n:
        msg = f"{len(hints)} hints for {n} frames"
        raise ValueError(msg)
    rx = np.asarray(received_at_s, np.int64)
    if rx.ndim and len(rx) != n:
        msg = f"{len(rx)} receive times for {n} frames"
        raise ValueError(msg)
    rx = k.as_received(rx, n)
    utc = _offsets(meter_utc_offset_s, n)
    ctx = (keys, compact_cache)
    try:
        return health.annotate(_dispatch(frames, rx, ctx, hints, utc))
    except Exception:
        parts: list[tuple[npt.NDArray[np.int64], Decoded]] = []
        for i in range(n):
            one = [hints[i]] if hints is not None else None
            off = utc[i : i + 1] if isinstance(utc, np.ndarray) else utc
            try:
                got = _check_shape(_dispatch(frames[i : i + 1], rx[i : i + 1], ctx, one, off), 1)
            except Exception as exc:
                got = _internal(1, "", f"decoding failed on this frame: {_why(exc)}")
            parts.append((np.array([i], np.int64), got))
        return health.annotate(concat(parts, n))


def _dispatch(
    frames: Sequence[bytes],
    rx: npt.NDArray[np.int64],
    ctx: tuple[Mapping[str, bytes] | None, object | None],
    hints: Sequence[str | None] | None,
    utc: Offset | None,
) -> Decoded:
    """`decode_batch` once its arguments are checked: detect, group, decode, merge."""
    n = len(frames)

    def offset_of(rows: npt.NDArray[np.int64]) -> Offset | None:
        return utc[rows] if isinstance(utc, np.ndarray) else utc

    lengths = k.lengths_of(frames)
    is_hinted = np.zeros(n, bool)
    hinted: dict[tuple[str, str | None], list[int]] = {}
    if hints is not None:
        for i, hint in enumerate(hints):
            if hint:
                hinted.setdefault(parse_hint(hint), []).append(i)
                is_hinted[i] = True
    todo = (lengths > 0) & ~is_hinted
    parts: list[tuple[npt.NDArray[np.int64], Decoded]] = []
    if (empties := np.flatnonzero((lengths == 0) & ~is_hinted)).size:
        out = empty(empties.size)
        out.error_code[:], out.error_message[:] = ErrorCode.EMPTY, "empty frame (no bytes)"
        parts.append((empties, out))
    pending = np.flatnonzero(todo)
    listed: dict[str, tuple[Format, list[npt.NDArray[np.int64]]]] = {}
    suspects: dict[int, str] = {}  # input index -> which detector raised on it
    if pending.size == n:
        groups = k.group_by_length(frames, lengths)
    elif pending.size:
        groups = k.group_by_length([frames[i] for i in pending.tolist()], lengths[pending])
    else:
        groups = []
    for idx, a in groups:
        rows = pending[idx] if pending.size != n else idx
        free = np.ones(len(rows), bool)
        for fmt in formats():
            if not free.any():
                break
            hit = _detect(fmt, a, free, rows, frames, suspects)
            if not hit.any():
                continue
            free &= ~hit
            if fmt.decode_array is not None:
                if hit.all() and len(rows) == n:  # the whole batch: no copies
                    got = _run(fmt, fmt.decode_array, a, n, rx, ctx, utc=utc)
                    parts.append((rows, got))
                    continue
                mine = rows if hit.all() else rows[hit]
                sub = a if hit.all() else a[hit]
                got = _run(fmt, fmt.decode_array, sub, len(mine), rx[mine], ctx,
                           utc=offset_of(mine))  # fmt: skip
                parts.append((mine, got))
            else:
                listed.setdefault(fmt.key, (fmt, []))[1].append(rows[hit])
        if suspects and (lost := [int(r) for r in rows[free] if int(r) in suspects]):
            out = _internal(len(lost), "", "")
            out.error_message[:] = [suspects[r] for r in lost]
            parts.append((np.asarray(lost, np.int64), out))
    for fmt, chunks in listed.values():  # per-frame decoders get one call, in input order
        rows = np.sort(np.concatenate(chunks))
        per_frame = list(frames) if rows.size == n else [frames[i] for i in rows.tolist()]
        got = _run(fmt, fmt.decode, per_frame, rows.size, rx[rows], ctx, utc=offset_of(rows))
        parts.append((rows, got))
    for (key, variant), hint_rows in hinted.items():
        rows = np.asarray(hint_rows, np.int64)
        named = lookup(key)
        if named is None:
            out = empty(rows.size)
            out.error_code[:] = ErrorCode.UNKNOWN_FORMAT
            out.error_message[:] = f"hint names no registered format: {key!r}"
        else:
            hinted_frames = [frames[i] for i in hint_rows]
            out = _run(named, named.decode, hinted_frames, rows.size, rx[rows], ctx, variant,
                       offset_of(rows))  # fmt: skip
        parts.append((rows, out))
    if len(parts) == 1 and len(parts[0][0]) == n and (parts[0][0] == np.arange(n)).all():
        return parts[0][1]
    return concat(parts, n)
