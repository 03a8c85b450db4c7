"""CRC-16/CCITT-FALSE kernels: the table-driven forms agree with the bit-wise definition."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from decoder import kernels as k


def bitwise(data: bytes) -> int:
    """The reference: poly 0x1021, init 0xFFFF, no reflection, no final XOR, bit by bit."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021 if crc & 0x8000 else crc << 1) & 0xFFFF
    return crc


def test_check_value() -> None:
    """The catalogue check value of CRC-16/CCITT-FALSE: "123456789" -> 0x29B1."""
    assert k.crc16_ccitt_bytes(b"123456789") == 0x29B1
    assert k.crc16_ccitt(np.frombuffer(b"123456789", np.uint8).reshape(1, -1), 9).tolist() == [
        0x29B1
    ]


@given(st.lists(st.binary(min_size=12, max_size=12), min_size=1, max_size=40), st.integers(0, 12))
def test_vectorized_matches_bitwise(rows: list[bytes], stop: int) -> None:
    """Every row's CRC over bytes [0, stop) equals the bit-wise one, as int64."""
    a = np.frombuffer(b"".join(rows), np.uint8).reshape(len(rows), -1)
    got = k.crc16_ccitt(a, stop)
    assert got.dtype == np.int64
    assert got.tolist() == [bitwise(r[:stop]) for r in rows]


@given(st.binary(max_size=80))
def test_scalar_matches_bitwise(data: bytes) -> None:
    """The scalar twin agrees with the bit-wise definition."""
    assert k.crc16_ccitt_bytes(data) == bitwise(data)
