"""ESPI QualityOfReading codes (NAESB REQ.21 ReadingQuality) as one table, and how the
quality of a quantity derived from several reads is found.

A boundary read carries the code of how it was obtained (0 an actual read, 9 interpolated,
8 reference day, 12 average daily use, 10 the last read carried on or a questionable
one); a read entered by a person carries 7, an imported one the code it came with. A
consumption (or a sum of them) keeps its reads' code when they agree, else 13 mixed.

SQL twins: `nbm_boundary_read` (migrations 0020/0021/0033) assigns the codes set-wise,
`storage.billing._CONSUMPTION_QUALITY` mixes them; tests/api/test_boundary_twin.py holds
them equal to this module.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

VALID = 0
MANUALLY_EDITED = 7
REFERENCE_DAY = 8
INTERPOLATED = 9
QUESTIONABLE = 10
PROJECTED = 12
MIXED = 13


@dataclass(frozen=True, slots=True)
class Code:
    """One ESPI code: its number, ESPI's name, and whether a register reading may carry it
    (13 mixed and 15 normalized describe derived quantities, never a register)."""

    code: int
    name: str
    of_reading: bool


CODES = (
    Code(VALID, "valid", True),
    Code(MANUALLY_EDITED, "manually edited", True),
    Code(REFERENCE_DAY, "estimated using reference day", True),
    Code(INTERPOLATED, "estimated using linear interpolation", True),
    Code(QUESTIONABLE, "questionable", True),
    Code(11, "derived", True),
    Code(PROJECTED, "projected (forecast)", True),
    Code(MIXED, "mixed", False),
    Code(14, "raw", True),
    Code(15, "normalized for weather", False),
    Code(16, "other", True),
    Code(17, "validated", True),
    Code(18, "verified", True),
    Code(19, "revenue-quality", True),
)
# the codes an entered (manual or imported) register reading may carry, with their names
OF_READING = {c.code: c.name for c in CODES if c.of_reading}


def mixed(codes: Iterable[int | None]) -> int | None:
    """The quality of a quantity derived from reads of these codes: their code when all
    agree, 13 (mixed) when they differ, None when one is unknown (or there are none)."""
    known: set[int] = set()
    for code in codes:
        if code is None:
            return None
        known.add(code)
    if not known:
        return None
    return known.pop() if len(known) == 1 else MIXED
