"""Diehl PRIOS (IZAR radio) payload scrambling: a 32-bit LFSR keyed by the header.

Diehl/Sappel IZAR water meters (manufacturers SAP, DME, HYD; CI A0-A3) scramble the bytes
after the 4-byte PRIOS header with a keystream: the 32-bit seed is the key XOR the
big-endian words of frame bytes 2-5, 6-9 and 10-13 (M, A, CI and the header); each key
byte comes from 8 steps of a Fibonacci LFSR whose feedback is the XOR of seed bits 1, 2,
11 and 31. The first plain byte is 0x4B; a key that does not give it is the wrong key.
Meters leave the factory with one of two published default keys (each given as 8 bytes;
the 32-bit key is the XOR of its two big-endian halves); a meter's own 8-byte key, when
the key table has one, is tried first.

The LFSR runs over all frames of a batch at once: one numpy step per keystream bit.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from decoder.columns import ErrorCode

DEFAULT_KEYS = ("39BC8A10E66D83F8", "51728910E66D83F8")  # published PRIOS defaults
CHECK_BYTE = 0x4B
HEADER = 4  # PRIOS header bytes after the CI, sent in clear (alarms, battery, period)
Frames = npt.NDArray[np.uint8]


def key32(key: bytes) -> int:
    """An 8-byte PRIOS key -> the 32-bit LFSR key (XOR of its big-endian halves)."""
    return int.from_bytes(key[0:4], "big") ^ int.from_bytes(key[4:8], "big")


def _be32(a: Frames, at: int) -> npt.NDArray[np.uint32]:
    """Big-endian uint32 of bytes [at, at+4) per row."""
    return np.ascontiguousarray(a[:, at : at + 4]).view(">u4")[:, 0].astype(np.uint32)


def keystream(seed: npt.NDArray[np.uint32], n: int) -> Frames:
    """`(N, n)` keystream bytes from per-row 32-bit seeds (8 LFSR steps per byte)."""
    k = seed.astype(np.uint32).copy()
    out = np.empty((len(k), n), np.uint8)
    one, two, eleven, top = np.uint32(1), np.uint32(2), np.uint32(11), np.uint32(31)
    for i in range(n):
        for _ in range(8):
            bit = ((k >> one) ^ (k >> two) ^ (k >> eleven) ^ (k >> top)) & one
            k = (k << one) | bit
        out[:, i] = (k & np.uint32(0xFF)).astype(np.uint8)
    return out


def descramble(
    frames: Frames, addresses: npt.NDArray[np.object_], keys: Mapping[str, bytes]
) -> tuple[Frames, npt.NDArray[np.uint16], str]:
    """`(N, L)` PRIOS frames -> payload after the CI (header in clear, rest descrambled).

    Tries the meter's own key (8 bytes, or 16 whose halves are equal), then both default
    keys; a row no key opens (first plain byte not 0x4B) gets DECRYPT_FAILED.
    """
    n = len(frames)
    body = frames[:, 11 + HEADER :]
    base = _be32(frames, 2) ^ _be32(frames, 6) ^ _be32(frames, 10)
    plain = np.zeros_like(body)
    done = np.zeros(n, bool)
    own = np.zeros(n, np.uint32)
    has_own = np.zeros(n, bool)
    for i, mid in enumerate(addresses.tolist()):  # per-frame only where a key table is given
        own_key = keys.get(str(mid)) if keys else None
        if own_key is not None and (
            len(own_key) == 8 or (len(own_key) == 16 and own_key[:8] == own_key[8:])
        ):
            own[i], has_own[i] = key32(own_key[:8]), True
    candidates = [(own, has_own)] if has_own.any() else []
    for hex_key in DEFAULT_KEYS:
        candidates.append((np.full(n, key32(bytes.fromhex(hex_key)), np.uint32), np.ones(n, bool)))
    for key, usable in candidates:
        todo = usable & ~done
        if not todo.any() or body.shape[1] == 0:
            continue
        seeds: npt.NDArray[np.uint32] = (base[todo] ^ key[todo]).astype(np.uint32)
        stream = keystream(seeds, body.shape[1])
        got = body[todo] ^ stream
        fits = got[:, 0] == CHECK_BYTE
        rows = np.flatnonzero(todo)[fits]
        plain[rows] = got[fits]
        done[rows] = True
    payload = np.concatenate([frames[:, 11 : 11 + HEADER], plain], axis=1)
    code = np.where(done, 0, int(ErrorCode.DECRYPT_FAILED)).astype(np.uint16)
    return payload, code, "PRIOS payload: neither the meter's key nor a default key gives 0x4B"
