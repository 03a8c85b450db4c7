"""Pure, vectorized decoders and encoders for NB-IoT meter payloads (no I/O).

`decode_batch(frames, received_at_s)` classifies every frame (a hint, else the registered
detectors in order), groups frames by format, runs each format's batch decoder and merges
the results back into input order (`decoder.columns.concat`). A frame no format claims is
UNKNOWN_FORMAT; an empty one is EMPTY; a format decoder that raises (a bug) marks only its
own frames INTERNAL, so one bad plug-in cannot sink the batch.

Formats: `cjt188`, `interval`, `senml`, and `mbus` when `decoder.mbus` is importable.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from decoder import cjt188, interval, senml  # noqa: F401  (importing registers them)
from decoder import kernels as k
from decoder.columns import Decoded, ErrorCode, concat, empty
from decoder.registry import Format, formats, lookup, parse_hint, register

with contextlib.suppress(ImportError):  # the M-Bus/OMS helper's module, when present
    from decoder import mbus as _mbus

    register(Format(key="mbus", detect=_mbus.looks_like, decode=_mbus.decode))

__all__ = ["decode_batch"]


def _classify(
    frames: Sequence[bytes], hints: Sequence[str | None] | None
) -> tuple[list[tuple[str, str | None]], npt.NDArray[np.int64]]:
    """Per frame: (format key, variant) or ("", None) for unclaimed; and the EMPTY rows."""
    n = len(frames)
    chosen: list[tuple[str, str | None]] = [("", None)] * n
    todo = np.ones(n, bool)
    if hints is not None:
        for i, hint in enumerate(hints):
            if hint:
                chosen[i], todo[i] = parse_hint(hint), False
    empties = np.flatnonzero(np.fromiter(map(len, frames), np.int64, n) == 0)
    todo[empties] = False
    pending = np.flatnonzero(todo)
    if not pending.size:
        return chosen, empties
    for idx, a in k.group_by_length([frames[i] for i in pending]):
        rows = pending[idx]
        free = np.ones(len(rows), bool)
        for fmt in formats():
            if not free.any():
                break
            hit = np.zeros(len(rows), bool)
            if fmt.detect_array is not None:
                hit[free] = fmt.detect_array(a[free])
            else:
                for j in np.flatnonzero(free):
                    hit[j] = _safe_detect(fmt, frames[rows[j]])
            for j in np.flatnonzero(hit):
                chosen[rows[j]] = (fmt.key, None)
            free &= ~hit
    return chosen, empties


def _safe_detect(fmt: Format, frame: bytes) -> bool:
    try:
        return bool(fmt.detect(frame))
    except Exception:
        return False


def _run(fmt: Format, variant: str | None, sub: list[bytes], rx: npt.NDArray[np.int64],
         keys: Mapping[str, bytes] | None, cache: object | None) -> Decoded:  # fmt: skip
    """One group through its decoder; an exception marks the group INTERNAL, not the batch."""
    try:
        if variant is not None and not fmt.takes_variant:
            out = empty(len(sub))
            out.error_code[:] = ErrorCode.UNSUPPORTED
            out.error_message[:] = f"format {fmt.key} has no variants (hint {variant!r})"
            return out
        if fmt.takes_variant:
            return fmt.decode(sub, rx, keys, cache, variant=variant)
        return fmt.decode(sub, rx, keys, cache)
    except Exception as exc:
        out = empty(len(sub))
        out.format[:] = fmt.key
        out.error_code[:] = ErrorCode.INTERNAL
        out.error_message[:] = f"{fmt.key} decoder failed: {exc!r} (frame kept for re-decode)"
        return out


def decode_batch(
    frames: Sequence[bytes],
    received_at_s: npt.ArrayLike,
    *,
    keys: Mapping[str, bytes] | None = None,
    compact_cache: object | None = None,
    hints: Sequence[str | None] | None = None,
) -> Decoded:
    """Frames + receive times (scalar or per frame) -> Decoded; bad frames get codes.

    `keys` maps meter id -> AES key (M-Bus/OMS); `compact_cache` is the M-Bus format
    signature cache (updated in place); `hints[i]` ("cjt188", "cjt188:mfunhcu",
    "interval:w1t", "senml", "mbus") skips detection for frame i. Raises ValueError only
    for an unusable batch (hints or receive times of the wrong length).
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
    chosen, empties = _classify(frames, hints)
    groups: dict[tuple[str, str | None], list[int]] = {}
    for i, pick in enumerate(chosen):
        if pick[0]:
            groups.setdefault(pick, []).append(i)
    parts: list[tuple[npt.NDArray[np.int64], Decoded]] = []
    if empties.size:
        out = empty(empties.size)
        out.error_code[:], out.error_message[:] = ErrorCode.EMPTY, "empty frame (no bytes)"
        parts.append((empties, out))
    for (key, variant), rows in groups.items():
        idx = np.asarray(rows, np.int64)
        fmt = lookup(key)
        if fmt is None:
            out = empty(idx.size)
            out.error_code[:] = ErrorCode.UNKNOWN_FORMAT
            out.error_message[:] = f"hint names no registered format: {key!r}"
        else:
            sub = [frames[i] for i in rows] if len(rows) < n else list(frames)
            out = _run(fmt, variant, sub, rx[idx], keys, compact_cache)
        parts.append((idx, out))
    if len(parts) == 1 and len(parts[0][0]) == n:
        return parts[0][1]
    return concat(parts, n)
