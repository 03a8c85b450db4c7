"""Vendor code that a driver file cannot say as data: payload transforms, compact formats.

A driver file (`decoder.drivers`) names a transform in `[transform] name = "..."`; the
transform turns the frames of a batch into the plain payload the driver's fields index.
Transforms are vectorized over the batch where the algorithm allows (the Diehl PRIOS
LFSR runs over all frames at once); AES modes are per frame (one cipher call each).

Every transform takes `(frames (N, L) uint8, addresses (N,) str, keys)` and returns
`(payload (N, P) uint8, code (N,) uint16, message)`: rows with a nonzero code are
refused with that code and message, never decoded from a guess.

Written from the public descriptions of these meters' radio telegrams (vendor manuals,
OMS and EN 13757 documents, and the behaviour of open-source readers); no code copied.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import numpy.typing as npt

from decoder.vendors import apator_na1, bmt, prios

Transform = Callable[
    [npt.NDArray[np.uint8], npt.NDArray[np.object_], Mapping[str, bytes]],
    tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint16], str],
]

TRANSFORMS: dict[str, Transform] = {
    "diehl_prios": prios.descramble,
    "apator_na1_aes": apator_na1.decrypt,
    "bmt_rfmtx1": bmt.unmask,
}
