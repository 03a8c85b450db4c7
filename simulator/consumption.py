"""Consumption profiles: hourly flow of every meter's service point, in millilitres (float).

`hourly_flow_ml(fleet, rng)` returns an (N, hours) float64 array; hour h covers the
interval [start + h*3600, start + (h+1)*3600). Profiles are household patterns:

- water: a diurnal curve (morning and evening peaks, quiet nights), weekends start later
  and use ~10% more, hour-to-hour noise, and idle night hours with exactly zero flow;
- gas: cooking peaks plus space heating that follows the season (peak mid-January) and
  the cold hours of the day.

The simulation treats UTC as local time: only the shape matters to the backend.
Flow becomes register steps only in `truth.quantize`, so a register never moves by less
than its smallest unit.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from simulator.fleet import SECONDS_PER_DAY, Fleet, Kind

Floats = npt.NDArray[np.float64]

# Relative weight of each hour of a weekday (0 = 00:00-01:00), household water.
WATER_WEEKDAY = np.array(
    [0.3, 0.2, 0.1, 0.1, 0.2, 0.6, 2.2, 3.4, 2.6, 1.3, 0.9, 0.9,
     1.2, 1.0, 0.8, 0.8, 0.9, 1.3, 2.0, 2.6, 2.8, 2.2, 1.3, 0.7],
)  # fmt: skip
# Weekend: people sleep in, the morning peak moves two hours later.
WATER_WEEKEND = np.roll(WATER_WEEKDAY, 2) * 1.1
# Gas: cooking (11-12, 17-19) on top of a heating curve that is high at night and morning.
GAS_COOKING = np.array(
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.1, 0.4, 0.6, 0.3, 0.1, 0.2, 1.0,
     1.2, 0.3, 0.1, 0.1, 0.3, 1.3, 1.6, 0.8, 0.2, 0.1, 0.0, 0.0],
)  # fmt: skip
GAS_HEATING = np.array(
    [0.8, 0.7, 0.7, 0.7, 0.8, 1.1, 1.6, 1.7, 1.3, 1.0, 0.9, 0.8,
     0.8, 0.8, 0.8, 0.9, 1.0, 1.3, 1.5, 1.5, 1.4, 1.2, 1.0, 0.9],
)  # fmt: skip

WATER_L_PER_DAY = 300.0  # a typical household
GAS_COOKING_M3_PER_DAY = 0.4
GAS_HEATING_M3_PER_DAY = 2.5  # at the winter peak
NIGHT_IDLE_PROBABILITY = 0.5  # chance that a water night hour (00-05) has no flow at all


def weekday_of(epoch_s: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """ISO weekday index, Monday = 0 ... Sunday = 6 (1970-01-01 was a Thursday)."""
    return (epoch_s // SECONDS_PER_DAY + 3) % 7


def heating_factor(epoch_s: npt.NDArray[np.int64]) -> Floats:
    """Seasonal heating share in [0.05, 1]: 1 in mid-January, near 0 in mid-July."""
    day_of_year = (epoch_s / SECONDS_PER_DAY) % 365.25
    return np.clip(0.525 + 0.475 * np.cos(2 * np.pi * (day_of_year - 15) / 365.25), 0.05, 1.0)


def _noise(rng: np.random.Generator, shape: tuple[int, int]) -> Floats:
    # gamma(k=2)/2 keeps the mean at 1 while allowing quiet and busy hours
    return rng.gamma(2.0, 0.5, size=shape)


def hourly_flow_ml(fleet: Fleet, rng: np.random.Generator) -> Floats:
    """Normal (fault-free) flow of every meter's service point per hour, mL, shape (N, H)."""
    spec = fleet.spec
    n, hours = len(fleet.meters), spec.hours
    hour_start_s = spec.start_s + np.arange(hours, dtype=np.int64) * 3600
    hour_of_day = (hour_start_s // 3600) % 24
    weekend = weekday_of(hour_start_s) >= 5
    sizes = np.array([m.household_size for m in fleet.meters])
    is_gas = np.array([m.kind is Kind.GAS for m in fleet.meters])

    water_shape = np.where(weekend, WATER_WEEKEND[hour_of_day], WATER_WEEKDAY[hour_of_day])
    water = (WATER_L_PER_DAY * 1000.0 / WATER_WEEKDAY.sum()) * water_shape
    idle = (hour_of_day < 5)[None, :] & (rng.random((n, hours)) < NIGHT_IDLE_PROBABILITY)
    water_flow = np.where(idle, 0.0, water[None, :] * _noise(rng, (n, hours)))

    cooking = (GAS_COOKING_M3_PER_DAY * 1e6 / GAS_COOKING.sum()) * GAS_COOKING[hour_of_day]
    heating = (
        (GAS_HEATING_M3_PER_DAY * 1e6 / GAS_HEATING.sum())
        * GAS_HEATING[hour_of_day]
        * heating_factor(hour_start_s)
    )
    gas_flow = (cooking + heating)[None, :] * _noise(rng, (n, hours))

    flow: Floats = np.where(is_gas[:, None], gas_flow, water_flow) * sizes[:, None]
    return flow
