"""What a simulated meter's modem reports about itself: battery, radio and serving cell.

Deterministic per meter (its `seed`) and hour, so a run is repeatable: a coverage class
(NB-IoT CE level 0..2, 3GPP TS 36.331; most meters in good coverage, a few deep indoors),
an RSRP/SINR drawn inside that class's band, a serving cell among a handful per fleet,
and a lithium battery that sags slowly with age and drops below 3.1 V while the truth
has the meter's low-battery flag set.
"""

from __future__ import annotations

from decoder.columns import Flag
from decoder.interval import ModemHealth
from simulator.fleet import Meter

# CE level -> (share of the fleet in percent, RSRP band in centi-dBm, SINR band in centi-dB)
COVERAGE = (
    (70, (-10500, -8000), (300, 1500)),
    (22, (-11500, -10500), (-300, 300)),
    (8, (-13000, -11500), (-1000, -300)),
)
CELLS = 12  # serving cells in the simulated area
CELL_BASE = 0x2A0_0000  # a 28-bit E-UTRAN cell identity: eNB 0x2A00, cell ids above
FRESH_MV = 3650
SAG_MV_PER_YEAR = 40
LOW_MV = 3050


def _mix(seed: int, salt: int) -> int:
    """A small integer hash (splitmix64 finaliser): stable across runs and platforms."""
    z = (seed * 0x9E3779B97F4A7C15 + salt) & (2**64 - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return z ^ (z >> 31)


def ecl_of(m: Meter) -> int:
    """The meter's coverage class (fixed: it does not move)."""
    pick, total = _mix(m.seed, 1) % 100, 0
    for ecl, (share, _, _) in enumerate(COVERAGE):
        total += share
        if pick < total:
            return ecl
    return len(COVERAGE) - 1


def health(m: Meter, hour: int, flags: int) -> ModemHealth:
    """The modem figures of `m` at truth hour `hour`; `flags` are the meter's status bits."""
    ecl = ecl_of(m)
    _, (r_lo, r_hi), (s_lo, s_hi) = COVERAGE[ecl]
    rsrp = r_lo + _mix(m.seed, 2 + hour) % (r_hi - r_lo)
    sinr = s_lo + _mix(m.seed, 3 + hour) % (s_hi - s_lo)
    battery = FRESH_MV - SAG_MV_PER_YEAR * hour // (24 * 365) - _mix(m.seed, 4) % 60
    if flags & Flag.LOW_BATTERY:
        battery = min(battery, LOW_MV - _mix(m.seed, 5) % 100)
    return ModemHealth(battery, rsrp, sinr, ecl, CELL_BASE + _mix(m.seed, 6) % CELLS)
