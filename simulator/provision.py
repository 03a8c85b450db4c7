"""`sim provision`: register a simulated fleet with the backend, then save its run directory.

Through the billing API: every meter (register scale, digits, installed at the start of
the simulation with its initial register), every exchange (final register of the old
meter, the new meter and its initial register; `sim run` registers each at its virtual
time, see `Provisioning`), and a billing calendar with a cycle every
`cycle_days` days inside the simulated period. Then the devices' transport credentials
(see the ADAPTER note in `simulator.backend`). The run directory gets the ground truth,
`credentials.json` (mode 0600) and the meter ids.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from simulator import truthfile
from simulator.backend import (
    Backend,
    create_platform_secret,
    credentials_json,
    iso,
    m3_text,
    provision_credentials,
)
from simulator.faults import Fault
from simulator.fleet import Meter, Transport
from simulator.runner import PLATFORM_SECRET, DeviceCredentials
from simulator.schedule import Event, Uplink
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


async def import_fleet(truth: Truth, backend: Backend) -> dict[str, int]:
    """The meters installed at the start, through the API; returns address -> meter id."""
    rows = meter_rows(truth)
    return dict(zip((r["address"] for r in rows), await backend.import_meters(rows), strict=True))


async def exchange_one(truth: Truth, backend: Backend, ids: dict[str, int], fault: Fault) -> int:
    """Register one exchange through the API; returns the new meter's id (also in `ids`)."""
    registers = truth.register_ml()
    start = truth.fleet.spec.start_s
    old, new = truth.meters[fault.meter], truth.meters[fault.params["new_meter"]]
    out = await backend.exchange(
        ids[old.address],
        {
            "exchanged_at": iso(start + fault.start_h * 3600),
            "final_register_m3": m3_text(
                int(registers[old.index, fault.start_h]), old.register.scale
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
    return ids[new.address]


class Provisioning:
    """One run's registration: meter ids and device credentials, exchanges on cue.

    The backend refuses the uplinks of a removed meter's device (its credentials resolve
    to active meters only), so an exchange must be registered when the run reaches it in
    virtual time, after the old meter's last uplink: `start(exchanges_now=False)` leaves
    them to `events()`, which `runner.send_all` fires in schedule order. A device gets
    its credentials while its meter is installed, as in the field: provisioning the
    address of an already removed meter would create a new meter of that address (no
    install date, no initial register) that every uplink of the old device lands on.
    """

    def __init__(
        self, truth: Truth, uplinks: list[Uplink], target: Target, run_dir: Path,
        cycle_days: int = 10,
    ) -> None:  # fmt: skip
        """Provision `truth`'s fleet into `target`; the run directory is `run_dir`."""
        self.truth, self.uplinks, self.target = truth, uplinks, target
        self.run_dir, self.cycle_days = run_dir, cycle_days
        self.creds: dict[str, DeviceCredentials] = {}
        self.ids: dict[str, int] = {}
        self.pending = list(truth.faults_of("exchange"))

    async def _credentials_of(self, meters: list[Meter]) -> None:
        target = self.target
        if not (target.database_url and target.credentials_key):
            return
        wanted = [
            (m.address, str(m.kind), str(m.format),
             m.transport.is_coap and not target.plain_coap, m.transport.is_mqtt)
            for m in meters
        ]  # fmt: skip
        platform = {m.address for m in meters if m.transport is Transport.PLATFORM_ONENET}
        if platform and PLATFORM_SECRET not in self.creds:
            secret = await create_platform_secret(
                target.database_url, target.tenant, target.credentials_key
            )
            self.creds[PLATFORM_SECRET] = DeviceCredentials(platform_id=secret)
        self.creds.update(await provision_credentials(
            wanted, database_url=target.database_url, credentials_key=target.credentials_key,
            tenant=target.tenant, mqtt_admin_url=target.mqtt_admin_url,
            aes_keys={m.address: m.oms_key for m in meters if m.oms_key},
            dtls={m.address for m in meters if m.transport is Transport.COAP_DTLS},
            platform=platform,
        ))  # fmt: skip

    async def start(self, *, exchanges_now: bool) -> dict[str, DeviceCredentials]:
        """Meters, calendar and credentials (and the exchanges if `exchanges_now`); saves."""
        backend = Backend(self.target.api_url, self.target.api_key)
        try:
            self.ids = await import_fleet(self.truth, backend)
            await backend.set_cycle_dates(cycle_starts(self.truth, self.cycle_days))
            for d in self.truth.districts:
                await backend.create_district(
                    d.name, self.ids[self.truth.meters[d.bulk].address],
                    [self.ids[self.truth.meters[c].address] for c in d.customers],
                )  # fmt: skip
        finally:
            await backend.close()
        await self._credentials_of([m for m in self.truth.meters if m.installed_h == 0])
        if exchanges_now:
            for fault in list(self.pending):
                await self.exchange(fault)
        self.save()
        return self.creds

    async def exchange(self, fault: Fault) -> None:
        """Register `fault`'s exchange and provision the new meter's device."""
        backend = Backend(self.target.api_url, self.target.api_key)
        try:
            await exchange_one(self.truth, backend, self.ids, fault)
        finally:
            await backend.close()
        self.pending.remove(fault)
        await self._credentials_of([self.truth.meters[fault.params["new_meter"]]])

    def events(self) -> list[Event]:
        """The exchanges still to register: (virtual instant, action), in time order."""
        start = self.truth.fleet.spec.start_s
        return sorted(
            (
                Event(
                    start + f.start_h * 3600,
                    functools.partial(self.exchange, f),
                    frozenset({f.meter, f.params["new_meter"]}),
                )
                for f in self.pending
            ),
            key=lambda e: e.at_s,
        )

    def save(self) -> None:
        """Write the run directory (ground truth, meter ids, credentials)."""
        save_run(self.run_dir, self.truth, self.uplinks, self.creds, {
            "tenant": self.target.tenant, "api_url": self.target.api_url, "meter_ids": self.ids,
            "cycle_days": self.cycle_days, "plain_coap": self.target.plain_coap,
        })  # fmt: skip


async def provision(
    truth: Truth, uplinks: list[Uplink], target: Target, run_dir: Path, cycle_days: int = 10
) -> dict[str, DeviceCredentials]:
    """Register everything, exchanges included, make credentials, write the run directory.

    Returns the credentials. The old meters of the exchanges are removed at once, so the
    backend refuses their devices' uplinks from then on: `sim run` (without
    --no-provision) registers each exchange at its virtual time instead (`Provisioning`).
    """
    return await Provisioning(truth, uplinks, target, run_dir, cycle_days).start(exchanges_now=True)


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
