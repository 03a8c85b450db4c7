"""collector.health: the column-wise figures equal the per-frame rule for every frame."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import numpy as np
import pytest

from collector.health import HEALTH_NAMES, HealthColumns, health_of
from decoder import decode_batch
from decoder.columns import Column, Decoded, empty
from decoder.encode_cjt188 import encode_cjt188
from decoder.interval import ModemHealth, encode_interval
from decoder.mbus_encode import encode_oms_mode5

KEY = bytes(range(16))
WHEN = datetime(2023, 11, 14, 22, 0, tzinfo=UTC)
SENML = (
    b'[{"bn":"m1/3424/0/","bt":1700000000,"n":"1","u":"m3","v":1.5},'
    b'{"bn":"m1/","n":"3/0/7","v":3581},{"n":"4/0/2","v":-104.55},{"n":"4/0/13","v":5}]'
)


def _per_frame(dec: Decoded, j: int) -> dict | None:
    got = health_of(dec.extra_of(j, HEALTH_NAMES))
    return got if any(v is not None for v in got.values()) else None


def test_mixed_batch_matches_the_per_frame_rule() -> None:
    """CJ/T 188, OMS, nbm1 v1/v2, SenML (sparse) and a bad frame: the same figures."""
    frames = [
        encode_cjt188(address="00000000000001", total_ml=1_230_000, clock=WHEN, status=0x04),
        encode_oms_mode5("12345678", "NBM", 1, 7, 1, 5_000_000, KEY, WHEN, status=0x08),
        encode_interval("00000000000002", 1_700_002_800, 0, [1_000] * 3),
        encode_interval(
            "00000000000003",
            1_700_002_800,
            0,
            [1_000] * 3,
            0,
            ModemHealth(3300, -12000, None, 2, 77),
        ),
        SENML,
        b"garbage",
    ]
    dec = decode_batch(frames, 1_700_010_000, keys={"12345678": KEY})
    cols = HealthColumns(dec)
    for j in range(len(frames)):
        assert cols.figures(j) == _per_frame(dec, j), j
    assert cols.figures(5) is None
    assert cols.figures(4)["ecl"] is None  # 5 is no coverage class: refused, not clamped


@pytest.mark.parametrize(
    ("values", "scale", "name"),
    [
        ([3605, -1, 0], 3, "battery_v"),  # 3.605 V -> 3605 mV
        ([-10455, -9999, 12], 2, "rsrp_dbm"),  # truncation toward zero, as int(Decimal)
        ([250, 7, -3], 1, "sinr_db"),
    ],
)
def test_decimal_columns_scale_exactly(values: list[int], scale: int, name: str) -> None:
    """A decimal column (value x 10**-scale) is brought to the table's unit as the
    per-frame rule does, absent frames stay absent."""
    dec = empty(3)
    dec.format[:] = "x"
    present = np.array([True, True, False])
    dec.fields[name] = Column(np.array(values, np.int64), present, "decimal", scale)
    cols = HealthColumns(dec)
    for j in range(3):
        assert cols.figures(j) == _per_frame(dec, j), j


def test_absurd_magnitudes_are_no_figures() -> None:
    """A health figure of absurd magnitude (1E+999999, past every column's range) is None,
    without the seconds of CPU an int() of it would take; the others still count."""
    huge = Decimal("1E+999999")
    figures = health_of({"rsrp_dbm": huge, "sinr_db": -huge, "battery_mv": Decimal(3600)})
    assert (figures["rsrp_cdbm"], figures["sinr_cdb"]) == (None, None)
    assert figures["battery_mv"] == 3600
