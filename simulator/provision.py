"""`sim provision`: register a simulated fleet with the backend, then save its run directory.

Through the billing API: every meter (register scale, digits, installed at the start of
the simulation with its initial register), every exchange (final register of the old
meter, the new meter and its initial register), and a billing calendar with a cycle every
`cycle_days` days inside the simulated period. Then the devices' transport credentials
(see the ADAPTER note in `simulator.backend`). The run directory gets the ground truth,
`credentials.json` (mode 0600) and the meter ids.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from simulator import truthfile
from simulator.backend import Backend, credentials_json, iso, m3_text, provision_credentials
from simulator.runner import DeviceCredentials
from simulator.schedule import Uplink
from simulator.truth import Truth


@dataclass(frozen=True)
class Target:
    """Where the backend is and how to authenticate to it."""

    api_url: str
    api_key: str
    database_url: str | None = None
    credentials_key: str | None = None
    mqtt_admin_url: str | None = None
    tenant: str = "sim"
    plain_coap: bool = False


def cycle_starts(truth: Truth, cycle_days: int) -> list[date]:
    """Cycle start dates: the simulation's first day and every `cycle_days` after it."""
    spec = truth.fleet.spec
    first = datetime.fromtimestamp(spec.start_s, UTC).date()
    return [first + timedelta(days=d) for d in range(0, spec.days + 1, cycle_days)]


def meter_rows(truth: Truth) -> list[dict[str, Any]]:
    """Import rows of the meters installed at the start (successors come by exchange)."""
    start = truth.fleet.spec.start_s
    return [
        {
            "address": m.address,
            "service_point": m.service_point,
            "kind": str(m.kind),
            "format": str(m.format),
            "register_scale": m.register.scale,
            "register_digits": m.register.digits,
            "timezone": "UTC",
            "installed_at": iso(start + m.installed_h * 3600),
            "initial_register_m3": m3_text(m.initial_ml, m.register.scale),
        }
        for m in truth.meters
        if m.installed_h == 0
    ]


async def register_fleet(truth: Truth, backend: Backend, cycle_days: int) -> dict[str, int]:
    """Meters, exchanges and calendar through the API; returns address -> meter id."""
    rows = meter_rows(truth)
    ids = dict(zip((r["address"] for r in rows), await backend.import_meters(rows), strict=True))
    registers = truth.register_ml()
    start = truth.fleet.spec.start_s
    for f in truth.faults_of("exchange"):
        old, new = truth.meters[f.meter], truth.meters[f.params["new_meter"]]
        out = await backend.exchange(
            ids[old.address],
            {
                "exchanged_at": iso(start + f.start_h * 3600),
                "final_register_m3": m3_text(
                    int(registers[old.index, f.start_h]), old.register.scale
                ),
                "new_meter": {
                    "address": new.address,
                    "format": str(new.format),
                    "register_scale": new.register.scale,
                    "register_digits": new.register.digits,
                    "initial_register_m3": m3_text(new.initial_ml, new.register.scale),
                },
            },
        )
        ids[new.address] = int(out["installed"]["meter_id"])
    await backend.set_cycle_dates(cycle_starts(truth, cycle_days))
    return ids


async def provision(
    truth: Truth, uplinks: list[Uplink], target: Target, run_dir: Path, cycle_days: int = 10
) -> dict[str, DeviceCredentials]:
    """Register everything, make credentials, write the run directory; returns credentials."""
    backend = Backend(target.api_url, target.api_key)
    try:
        ids = await register_fleet(truth, backend, cycle_days)
    finally:
        await backend.close()
    creds: dict[str, DeviceCredentials] = {}
    if target.database_url and target.credentials_key:
        wanted = [
            (m.address, str(m.kind), str(m.format),
             m.transport.is_coap and not target.plain_coap, not m.transport.is_coap)
            for m in truth.meters
        ]  # fmt: skip
        creds = await provision_credentials(
            wanted, database_url=target.database_url, credentials_key=target.credentials_key,
            tenant=target.tenant, mqtt_admin_url=target.mqtt_admin_url,
            aes_keys={m.address: m.oms_key for m in truth.meters if m.oms_key},
        )  # fmt: skip
    save_run(run_dir, truth, uplinks, creds, {
        "tenant": target.tenant, "api_url": target.api_url, "meter_ids": ids,
        "cycle_days": cycle_days, "plain_coap": target.plain_coap,
    })  # fmt: skip
    return creds


def save_run(
    run_dir: Path,
    truth: Truth,
    uplinks: list[Uplink],
    creds: dict[str, DeviceCredentials],
    extra: dict[str, Any],
) -> None:
    """Ground truth plus credentials.json (0600) in `run_dir`."""
    truthfile.save(run_dir, truth, uplinks, extra)
    path = run_dir / "credentials.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(credentials_json(creds), fh)
