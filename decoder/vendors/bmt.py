"""BMT RFM-TX1 water meter radio module (BMT, version 05, type 07, TPL mode 16).

The module hides the register with a fixed XOR table rather than a key: the four
register bytes (frame bytes 17-20, BCD litres, lowest digits first) are each XORed with
the access number and with one byte of a 16-row table, the row being the access
number's low nibble. Undoing it is deterministic; the driver file then requires all
eight digits to be decimal, so a frame of another layout is refused, not misread.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

Frames = npt.NDArray[np.uint8]

# row (access number & 0x0F) -> the 4 bytes XORed into register bytes 0-3
TABLE = np.array(
    [
        (122, 16, 26, 10), (112, 19, 34, 19), (185, 11, 142, 153), (121, 7, 74, 22),
        (7, 154, 203, 105), (50, 161, 57, 14), (156, 126, 96, 153), (180, 196, 128, 163),
        (10, 206, 25, 3), (240, 5, 165, 134), (22, 152, 17, 94), (12, 201, 125, 162),
        (74, 72, 228, 31), (119, 46, 138, 232), (189, 120, 87, 140), (57, 111, 40, 5),
    ],
    np.uint8,
)  # fmt: skip
REGISTER_AT = 6  # payload offset (after the CI) of the 4 hidden register bytes


def unmask(
    frames: Frames, addresses: npt.NDArray[np.object_], keys: Mapping[str, bytes]
) -> tuple[Frames, npt.NDArray[np.uint16], str]:
    """`(N, L)` RFM-TX1 frames -> payload after the CI with the register bytes in clear."""
    del addresses, keys  # a fixed table, no per-meter key
    payload = frames[:, 11:].copy()
    acc = payload[:, 0]
    span = slice(REGISTER_AT, REGISTER_AT + 4)
    payload[:, span] ^= TABLE[acc & 0x0F] ^ acc[:, None]
    return payload, np.zeros(len(frames), np.uint16), ""
