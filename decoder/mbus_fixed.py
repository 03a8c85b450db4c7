"""Wired M-Bus fixed data structure (CI 73/77, EN 1434-3): two counters, one fixed layout.

Body (16 bytes): ID(4, BCD) ACC STS medium/unit(2) counter 1(4) counter 2(4). STS bit 7
says whether the counters are BCD (0) or binary (1); the unit codes sit in bits 0-5 of
the two medium/unit bytes, the medium in their top two bits. Decoded for all rows at once.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from decoder.mbus_kernels import bcd, int_le

# EN 1434-3 fixed-structure unit codes that are volumes -> exponent of 10 in mL
VOLUME_UNIT_ML_EXP = {
    0x26: 0, 0x27: 1, 0x28: 2, 0x29: 3, 0x2A: 4, 0x2B: 5, 0x2C: 6, 0x2D: 7, 0x2E: 8,
}  # fmt: skip
HISTORIC_OF_COUNTER_1 = 0x3E  # "same unit as counter 1, but historic"


def counters(body: npt.NDArray[np.uint8]) -> dict[str, npt.NDArray[np.int64]]:
    """Counter columns in mL for (N, 16) fixed bodies.

    Returns `total_ml`, `total_ok` (counter 1 is a volume with valid digits), `historic_ml`,
    `historic_ok` (counter 2 is counter 1's historic value) and `unit1` (the unit code).
    """
    binary = (body[:, 5] & 0x80) != 0
    unit1 = (body[:, 6] & 0x3F).astype(np.int64)
    unit2 = (body[:, 7] & 0x3F).astype(np.int64)
    exp = np.full(len(body), -1, np.int64)
    for code, e in VOLUME_UNIT_ML_EXP.items():
        exp[unit1 == code] = e
    out: dict[str, npt.NDArray[np.int64]] = {"unit1": unit1}
    for name, at in (("total", 8), ("historic", 12)):
        b_val, b_ok = bcd(body, at, 4)
        value = np.where(binary, int_le(body, at, 4) & 0xFFFFFFFF, b_val)
        ok = (binary | b_ok) & (exp >= 0)
        out[f"{name}_ml"] = value * np.int64(10) ** np.maximum(exp, 0)
        out[f"{name}_ok"] = ok.astype(np.int64)
    out["historic_ok"] &= (unit2 == HISTORIC_OF_COUNTER_1).astype(np.int64)
    return out
