"""The I/O half of `sim verify`: fetch cycle reads and alarms from the API, then `check`.

Only cycles that lie wholly inside the simulated period are fetched. Alarms are read from
the per-meter cycle reads of the meters that carry a flag-raising fault. `--plot` draws one
meter's true register, its stored hourly reads and its cycle boundary reads (matplotlib,
imported only then).
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, date, datetime, timedelta
from typing import Any

import numpy as np

from simulator import alarm_table, command_run
from simulator.backend import Backend, BackendError, ml_of
from simulator.faults import Outcome
from simulator.provision import cycle_starts
from simulator.schedule import Uplink
from simulator.truth import Truth
from simulator.verify import Mismatch, Report, check


def _cycles(truth: Truth, cycle_days: int) -> list[date]:
    spec = truth.fleet.spec
    end = datetime.fromtimestamp(spec.start_s, UTC).date() + timedelta(days=spec.days)
    starts = cycle_starts(truth, cycle_days)
    return [s for s in starts if s + timedelta(days=cycle_days) <= end]


async def fetch_and_check(
    args: argparse.Namespace, truth: Truth, uplinks: list[Uplink], extra: dict[str, Any]
) -> Report:
    """Fetch every complete cycle's reads and the faulty meters' alarms; check them."""
    results_file = args.run_dir / "results.json"
    results = (
        {int(k): v for k, v in json.loads(results_file.read_text()).items()}
        if results_file.exists()
        else {}
    )
    cycle_days = int(extra.get("cycle_days", 10))
    ids: dict[str, int] = {k: int(v) for k, v in (extra.get("meter_ids") or {}).items()}
    backend = Backend(args.api_url, args.api_key)
    try:
        cycles = _cycles(truth, cycle_days)
        rows = [row for c in cycles async for row in backend.cycle_reads(c)]
        alarms: dict[str, set[str]] = {}
        flagged = {truth.meters[f.meter].address for f in truth.faults
                   if f.outcome is Outcome.FLAGGED}  # fmt: skip
        for address in sorted(flagged):
            if address not in ids:
                continue
            kinds: set[str] = set()
            for c in cycles:
                try:
                    read = await backend.meter_cycle(ids[address], c)
                except BackendError:
                    continue
                kinds.update(a["kind"] for a in read.get("alarms", []))
            alarms[address] = kinds
        if args.plot:
            await _plot(args, truth, backend, ids, rows)
        seen = await _alarms_seen(truth, backend, ids)
    finally:
        await backend.close()
    report = check(truth, uplinks, rows, alarms, results)
    causes = alarm_table.incidents(truth) + alarm_table.commanded(command_run.load(args.run_dir))
    table, failures = alarm_table.table(causes, seen)
    report.alarm_table = alarm_table.lines(table)
    report.mismatches += [Mismatch(f.split()[-1], "alarm", "as injected", f) for f in failures]
    return report


async def _alarms_seen(
    truth: Truth, backend: Backend, ids: dict[str, int]
) -> list[alarm_table.Seen]:
    """Run the analytics over the simulated days, then every alarm the tenant has."""
    spec = truth.fleet.spec
    first = datetime.fromtimestamp(spec.start_s, UTC).date()
    await backend.run_analytics(first, first + timedelta(days=spec.days - 1))
    address = {v: k for k, v in ids.items()}
    return [
        alarm_table.Seen(address[a["meter_id"]], a["kind"], _epoch(a["opened_at"]))
        for a in await backend.alarms()
        if a["meter_id"] in address and a.get("opened_at")
    ]


def _epoch(text: str) -> int:
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp())


async def _plot(
    args: argparse.Namespace, truth: Truth, backend: Backend, ids: dict[str, int],
    rows: list[dict[str, Any]],
) -> None:  # fmt: skip
    try:
        import matplotlib as mpl

        mpl.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise BackendError("--plot needs matplotlib (pip install matplotlib==3.11.2)") from exc
    address = args.meter or next(
        (truth.meters[f.meter].address for f in truth.faults if f.kind == "leak"),
        truth.meters[0].address,
    )
    m = next(x for x in truth.meters if x.address == address)
    spec = truth.fleet.spec
    hours = np.arange(m.installed_h, m.removed_h + 1)
    when = [datetime.fromtimestamp(spec.start_s + int(h) * 3600, UTC) for h in hours]
    reg = truth.register_ml()[m.index, hours] / 1e6
    fig, ax = plt.subplots(figsize=(11, 5))
    # matplotlib plots datetimes through its date converter; its stubs list numbers only
    ax.plot(when, reg, label="true register", lw=1)  # type: ignore[arg-type]  # datetimes
    got = await backend.readings(ids[address], spec.start_s + m.installed_h * 3600,
                                 spec.start_s + m.removed_h * 3600)  # fmt: skip
    pts = [(datetime.fromisoformat(i["end"]), ml_of(i.get("end_register_m3")))
           for i in got.get("intervals", []) if i.get("end_method") == "actual"]  # fmt: skip
    if pts:
        ax.plot([p[0] for p in pts], [(p[1] or 0) / 1e6 for p in pts], ".", ms=3,  # type: ignore[arg-type]  # datetimes
                label="stored reads")  # fmt: skip
    bounds = [(r[s]["at"], ml_of(r[s].get("register_m3"))) for r in rows
              if r["address"] == address for s in ("opening", "closing")]  # fmt: skip
    ax.plot([datetime.fromisoformat(b[0]) for b in bounds],  # type: ignore[arg-type]  # datetimes
            [(b[1] or 0) / 1e6 for b in bounds], "rs", label="cycle reads")  # fmt: skip
    ax.set(title=f"meter {address} ({m.kind}, {m.format})", ylabel="register (m3)")
    ax.legend()
    fig.autofmt_xdate()
    fig.savefig(args.plot, dpi=120)
