"""The single-meter cycle read (Python, billing.boundary) equals the export's (SQL).

A seeded fleet of meters with adversarial histories (sparse and dense readings, readings
on and near the boundaries, rollovers on small registers, reverse flow, clocks in the
future, readings before installation, meters installed or removed inside the cycle with
and without their registers, questionable flags, silent meters for every estimation
path, a second timezone, outages straddling a boundary on either side of the gap limit,
manual reads with their own quality) goes through both: every row must be identical,
the `gap` flag of each boundary read included. The Python rows are rendered as the API
renders them (api.routes_reads.cycle_row); the SQL rows are the export's JSON text.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import numpy as np
import pytest

from api.routes_reads import cycle_row
from api.schemas import CycleRow
from api.settings import ApiSettings
from billing.localtime import local_midnight
from storage import billing, meter_cycle

CYCLE, END = date(2024, 2, 1), date(2024, 3, 1)
ZONES = ("Asia/Shanghai", "Europe/Berlin")
STEPS_H = (1, 6, 24, 24, 24, 72, 240, 960)
QUESTIONABLE = (64, 256, 512)


def _windows() -> dict[str, tuple[datetime, datetime]]:
    return {
        z: (local_midnight(CYCLE, ZoneInfo(z)), local_midnight(END, ZoneInfo(z))) for z in ZONES
    }


def _meter(rng: np.random.Generator, open_at: datetime, close_at: datetime) -> dict:
    """Random meter fields: register size, kind, installation and removal."""
    scale = int(rng.choice([-6, -3, -3, -2, 0]))
    digits = int(rng.choice([4, 5, 8]))
    fields: dict = {
        "kind": str(rng.choice(["water", "gas"])),
        "register_scale": scale,
        "register_digits": digits,
        "installed_at": datetime(2023, 6, 1, tzinfo=UTC),
    }
    span = (close_at - open_at).total_seconds()
    if rng.random() < 0.25:
        fields["installed_at"] = open_at + timedelta(seconds=int(rng.uniform(-3600, span)))
        if rng.random() < 0.6:
            fields["initial_register_ml"] = int(rng.integers(0, 10 ** (digits + scale + 6)))
    if rng.random() < 0.2:
        fields["removed_at"] = max(fields["installed_at"], open_at) + timedelta(
            seconds=int(rng.uniform(60, span))
        )
        if rng.random() < 0.6:
            fields["final_register_ml"] = int(rng.integers(0, 10 ** (digits + scale + 6)))
    if rng.random() < 0.2:
        fields["timezone"] = ZONES[1]
    return fields


def _history(rng: np.random.Generator, fields: dict, open_at: datetime, close_at: datetime):
    """Random readings (read_at, register_ml, flags, received_at) around the cycle."""
    unit = 10 ** (fields["register_scale"] + 6)
    modulus = 10 ** (fields["register_digits"] + fields["register_scale"] + 6)
    t = open_at - timedelta(hours=int(rng.integers(0, 60 * 24)))
    stop = close_at + timedelta(hours=int(rng.integers(-20 * 24, 40 * 24)))
    step_h = int(rng.choice(STEPS_H))
    register = int(rng.integers(0, modulus))
    if rng.random() < 0.3:  # close to the top: rolls over in the cycle
        register = modulus - int(rng.integers(1, 50)) * unit
    per_hour = int(rng.integers(0, 40_000))
    rows, seen = [], set()
    while t < stop:
        t += timedelta(hours=step_h, minutes=int(rng.integers(-30, 31)))
        for edge in (open_at, close_at):  # now and then a reading at, or just around, a boundary
            if t < edge <= t + timedelta(hours=step_h) and rng.random() < 0.3:
                t = edge + timedelta(minutes=int(rng.integers(-90, 91)) * int(rng.random() < 0.7))
        register += per_hour * step_h
        if rng.random() < 0.03:
            register -= int(rng.integers(1, 10)) * unit  # reverse flow
        if rng.random() < 0.3:
            register = register // unit * unit
        flags = int(rng.choice(QUESTIONABLE)) if rng.random() < 0.05 else 0
        received = t + timedelta(minutes=2)
        if rng.random() < 0.05:
            received = t - timedelta(days=1)  # clock in the future: excluded
        elif rng.random() < 0.05:
            received = t - timedelta(minutes=2)  # a little ahead: within the tolerance
        if t not in seen:
            seen.add(t)
            rows.append((t, register % modulus, flags, received))
    if rows and rng.random() < 0.3:  # an outage straddling a boundary: 20..80 h, cut anywhere
        edge = open_at if rng.random() < 0.5 else close_at
        hours = int(rng.integers(20, 81))
        before = timedelta(minutes=int(rng.integers(61, hours * 60 - 61)))
        lo, hi = edge - before, edge - before + timedelta(hours=hours)
        rows = [r for r in rows if not lo < r[0] < hi]
        if not any(r[0] == lo for r in rows):
            rows.append((lo, rows[-1][1], 0, lo + timedelta(minutes=2)))
    return rows


@pytest.mark.parametrize("seed", [1, 2])
async def test_single_meter_reads_equal_the_export(
    pool, make_tenant, add_meter, add_readings, seed
):
    """150 random meters: each cycle row of the single-meter path equals the export's."""
    rng = np.random.default_rng(seed)
    t = await make_tenant(ZONES[0])
    windows = _windows()
    meters = []
    for _ in range(150):
        fields = _meter(rng, *windows[ZONES[0]])
        zone_window = windows[fields.get("timezone", ZONES[0])]
        meter_id = await add_meter(t.tenant_id, **fields)
        rows = _history(rng, fields, *zone_window)
        if rows:
            await add_readings(meter_id, rows)
        if rng.random() < 0.2:  # entered by hand near the boundaries: quality 7 (manual read)
            await pool.execute(
                "UPDATE readings SET quality = 7 WHERE meter_id = $1"
                " AND (abs(extract(epoch FROM nbm_at(read_s) - $2)) < 7200"
                "   OR abs(extract(epoch FROM nbm_at(read_s) - $3)) < 7200)",
                meter_id,
                *zone_window,
            )
        meters.append(meter_id)
    tuning = ApiSettings(database_url="unused").tuning()
    expected = {}
    async with pool.acquire() as conn:
        for zone in await billing.zones(conn, t.tenant_id):
            q = billing.CycleQuery(t.tenant_id, CYCLE, END, zone, tuning)
            for line in await billing.cycle_lines(conn, q.args()):
                row = CycleRow.model_validate_json(line)
                expected[row.meter_id] = row.model_dump(mode="json")
        now = datetime.now(UTC)
        got = {}
        for meter_id in meters:
            ctx = await meter_cycle.context(conn, t.tenant_id, meter_id)
            found = await meter_cycle.meter_cycle(
                conn, ctx, CYCLE, windows, tuning, now=now, baseline=timedelta(0), publish=False
            )
            for r in found.rows:
                got[r.meter.meter_id] = cycle_row(r).model_dump(mode="json")
    assert len(expected) > 100
    assert set(got) == set(expected)
    methods, gaps, qualities = set(), set(), set()
    for meter_id, row in expected.items():
        assert got[meter_id] == row, f"meter {meter_id}"
        methods |= {row["opening"]["method"], row["closing"]["method"]}
        methods |= {row["opening"]["basis"], row["closing"]["basis"]}
        for side in ("opening", "closing"):
            gaps.add((side, row[side]["method"], row[side]["gap"]))
            qualities.add(row[side]["quality"])
    # straddling outages over and under the limit, at both boundaries; manual reads used
    assert {("opening", "interpolated", True), ("closing", "interpolated", True)} <= gaps
    assert {("opening", "interpolated", False), ("closing", "interpolated", False)} <= gaps
    assert 7 in qualities
    # the fleet reaches every way a boundary read is obtained
    assert methods >= {
        "actual",
        "interpolated",
        "installation",
        "removal",
        "missing",
        "reference_day",
        "average_daily_use",
        "last_read",
    }
