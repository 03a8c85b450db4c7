"""An outage straddling a cycle boundary is measured across it: 40 h + 44 h is an 84 h gap,
flagged in the cycles whose boundary read was interpolated across it; 15 h + 15 h is not."""

from __future__ import annotations

import csv
import io
from datetime import datetime, timedelta

from apihelpers import local

SH = "Asia/Shanghai"
JAN, FEB = "2024-01-01", "2024-02-01"
EDGE = local(SH, 2024, 2, 1)  # Jan's closing and Feb's opening boundary


def hourly_around(edge: datetime, before_h: int, after_h: int) -> list[tuple[datetime, int]]:
    """Hourly readings from 40 days before `edge` to 40 days after, none in the outage
    (edge - before_h, edge + after_h); 10 L an hour."""
    start = edge - timedelta(days=40)
    rows = []
    for h in range(80 * 24):
        at = start + timedelta(hours=h)
        if not edge - timedelta(hours=before_h) < at < edge + timedelta(hours=after_h):
            rows.append((at, 1_000_000 + 10_000 * h))
    return rows


def gaps(body: dict) -> list[tuple[str, str]]:
    """(start, end) of the cycle read's gap issues."""
    return [(i["start"], i["end"]) for i in body["issues"] if i["code"] == "gap"]


def z(at: datetime) -> str:
    """`at` as the API writes it."""
    return at.isoformat().replace("+00:00", "Z")


async def test_84h_outage_across_the_edge_is_flagged(api, make_tenant, add_meter, add_readings):
    """40 h before + 44 h after Feb's opening: each piece is under the 48 h limit, but the
    opening read was interpolated across 84 h: flagged with its whole span in Feb (whose
    opening read it is) and in Jan (whose closing read it is), in the cycle read and export."""
    t = await make_tenant()
    m = await add_meter(t.tenant_id, installed_at=local(SH, 2023, 6, 1))
    await add_readings(m, hourly_around(EDGE, 40, 44))
    span = (z(EDGE - timedelta(hours=40)), z(EDGE + timedelta(hours=44)))

    feb = (await api.get(f"/v1/meters/{m}/cycles/{FEB}", headers=t.reader)).json()
    assert (feb["opening"]["method"], feb["opening"]["gap"]) == ("interpolated", True)
    assert feb["closing"]["gap"] is False
    assert gaps(feb) == [span]
    (issue,) = [i for i in feb["issues"] if i["code"] == "gap"]
    assert "84 h across the cycle boundary" in issue["detail"]
    assert "opening read was interpolated" in issue["detail"]

    jan = (await api.get(f"/v1/meters/{m}/cycles/{JAN}", headers=t.reader)).json()
    assert (jan["closing"]["method"], jan["closing"]["gap"]) == ("interpolated", True)
    assert gaps(jan) == [span]

    # the export computes the same flag set-wise in SQL
    page = (await api.get(f"/v1/cycles/{FEB}/reads", headers=t.reader)).json()
    assert (page["items"][0]["opening"]["gap"], page["items"][0]["closing"]["gap"]) == (True, False)
    text = (await api.get(f"/v1/cycles/{JAN}/reads?format=csv", headers=t.reader)).text
    (row,) = csv.DictReader(io.StringIO(text))
    assert (row["opening_gap"], row["closing_gap"]) == ("f", "t")


async def test_30h_straddle_is_not_flagged(api, make_tenant, add_meter, add_readings):
    """15 h before + 15 h after the edge: interpolated across 30 h, under the limit: no gap."""
    t = await make_tenant()
    m = await add_meter(t.tenant_id, installed_at=local(SH, 2023, 6, 1))
    await add_readings(m, hourly_around(EDGE, 15, 15))
    for cycle, side in ((FEB, "opening"), (JAN, "closing")):
        body = (await api.get(f"/v1/meters/{m}/cycles/{cycle}", headers=t.reader)).json()
        assert (body[side]["method"], body[side]["gap"]) == ("interpolated", False)
        assert gaps(body) == []


async def test_outage_inside_one_cycle_is_one_gap(api, make_tenant, add_meter, add_readings):
    """An outage that starts 30 min before the edge (the opening read is that actual reading)
    and lasts 60 h is the opening cycle's gap only, cut at its edge as before."""
    t = await make_tenant()
    m = await add_meter(t.tenant_id, installed_at=local(SH, 2023, 6, 1))
    rows = hourly_around(EDGE, 1, 60)  # the last one before the outage: EDGE - 1 h
    rows.append((EDGE - timedelta(minutes=30), 10_595_000))
    await add_readings(m, rows)
    feb = (await api.get(f"/v1/meters/{m}/cycles/{FEB}", headers=t.reader)).json()
    assert (feb["opening"]["method"], feb["opening"]["gap"]) == ("actual", False)
    assert gaps(feb) == [(z(EDGE), z(EDGE + timedelta(hours=60)))]
    jan = (await api.get(f"/v1/meters/{m}/cycles/{JAN}", headers=t.reader)).json()
    assert gaps(jan) == []
