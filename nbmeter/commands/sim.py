"""`nbmeter sim run|device|verify|provision`: the fleet simulator for field engineers and CI.

  sim run --meters N --days D --seed S [--faults all|leak=0.02,...] [--rate R]
          build the fleet and its ground truth, provision it (first time), send every
          uplink to the collector, save truth + results in --run-dir; the period is
          the latest whose every uplink, the last wake-up included, is already due
  sim provision ...      only register the fleet and its credentials (same model options)
  sim device --meter A   send one meter's uplink now; show frame hex, the response and
                         what the backend stored
  sim verify             compare cycle reads with the ground truth; exit 1 on mismatch

Connection settings default to the environment: NBMETER_API_URL, NBMETER_API_KEY,
NBMETER_DATABASE_URL, NBMETER_CREDENTIALS_KEY, NBMETER_MQTT_URL, NBMETER_MQTT_ADMIN_URL,
NBMETER_COAP_HOST/NBMETER_COAP_PORT. Exit codes: 0 ok, 1 failure explained, 2 usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from simulator import command_run, truthfile
from simulator.faults import FaultSpecError, format_faults, parse_faults
from simulator.fleet import SECONDS_PER_DAY, SECONDS_PER_HOUR, FleetSpec
from simulator.network import NetworkModel
from simulator.schedule import build_schedule
from simulator.truth import build_truth

if TYPE_CHECKING:  # the heavy modules load only for the command that needs them
    from simulator.provision import Provisioning
    from simulator.runner import DeviceCredentials, RunConfig, Summary
    from simulator.schedule import Uplink
    from simulator.truth import Truth

DEFAULT_RUN_DIR = "out/sim"
# The virtual schedule runs past the period's end: each meter reports 1-5 h after every
# midnight (FleetSpec.report_window_s) and wakes up once more the day after the period to
# empty its log (simulator.backlog.flush_s); an hour more covers that wake-up's resends,
# 20 s apart. Every uplink is sent at the real now, and the backend judges a meter clock by
# its own: a reading stamped after its receipt (a clock running 20 min fast, sent at
# 00:05 for a report due at 04:00) is clock_future and billing leaves it out.
SCHEDULE_AFTER_END_S = SECONDS_PER_DAY + FleetSpec.report_window_s[1] + SECONDS_PER_HOUR


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name) or default


def _fail(message: str) -> int:
    print(f"nbmeter sim: {message}", file=sys.stderr)
    return 1


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--meters", type=int, default=200, help="fleet size (default 200)")
    p.add_argument("--days", type=int, default=40, help="simulated days (default 40)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--faults", default="", help="all, none, or name=rate,... (see docs)")
    p.add_argument("--gas-share", type=float, default=0.3)
    p.add_argument(
        "--start", help="first simulated day, YYYY-MM-DD (default: the latest period over by now)"
    )
    p.add_argument("--loss", type=float, default=0.0, help="emulated loss per transmission")
    p.add_argument("--latency-ms", type=float, default=0.0)
    p.add_argument("--jitter-ms", type=float, default=0.0)
    p.add_argument("--time-scale", type=float, default=0.5,
                   help="scales CoAP timeouts and latency (1 = RFC 7252 timing)")  # fmt: skip
    p.add_argument("--cycle-days", type=int, default=10, help="billing cycle length")
    p.add_argument(
        "--dtls-share",
        type=float,
        default=0.0,
        help="fraction of meters on DTLS-PSK CoAP (default 0)",
    )
    p.add_argument(
        "--platform-share",
        type=float,
        default=0.0,
        help="fraction of meters behind an operator platform (OneNET push)",
    )
    p.add_argument(
        "--districts",
        type=int,
        default=0,
        help="district metered areas: a bulk meter and 6 customer meters each",
    )
    p.add_argument(
        "--pipe-leaks",
        type=float,
        default=0.5,
        help="share of the districts with a leak between bulk and customers",
    )


def _conn_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", type=Path, default=Path(DEFAULT_RUN_DIR))
    p.add_argument("--tenant", default=_env("NBMETER_SIM_TENANT", "sim"))
    p.add_argument("--api-url", default=_env("NBMETER_API_URL", "http://127.0.0.1:8080"))
    p.add_argument("--api-key", default=_env("NBMETER_API_KEY"))
    p.add_argument("--coap-host", default=_env("NBMETER_COAP_HOST", "127.0.0.1"))
    p.add_argument("--coap-port", type=int, default=int(_env("NBMETER_COAP_PORT", "5683") or 0))
    p.add_argument("--mqtt-url", default=_env("NBMETER_MQTT_URL", "mqtt://127.0.0.1:1883"))
    p.add_argument("--plain-coap", action="store_true", help="no OSCORE (lab tenants only)")
    p.add_argument("--coaps-port", type=int, default=int(_env("NBMETER_COAPS_PORT", "5684") or 0))
    p.add_argument(
        "--platform-url",
        default=_env("NBMETER_PLATFORM_URL", "http://127.0.0.1:8443"),
        help="the collector's platform push endpoint (base URL)",
    )


def latest_start_s(days: int, now_s: int) -> int:
    """The latest first day (UTC midnight, epoch s) of a `days`-long period whose whole
    virtual schedule, the last wake-up included, lies before `now_s`: no meter of the run
    sends an uplink from a time that has not come yet."""
    return ((now_s - SCHEDULE_AFTER_END_S) // SECONDS_PER_DAY - days) * SECONDS_PER_DAY


def _spec(args: argparse.Namespace, now_s: int | None = None) -> FleetSpec:
    """The fleet of `args`; the period defaults to the latest that is over by `now_s`.

    Raises ValueError for a --start whose schedule reaches past now."""
    now_s = int(time.time()) if now_s is None else now_s
    latest = latest_start_s(args.days, now_s)
    if args.start:
        day = datetime.strptime(args.start, "%Y-%m-%d").replace(tzinfo=UTC)
        start_s = int(day.timestamp())
        if start_s > latest:
            last = datetime.fromtimestamp(latest, UTC).date()
            raise ValueError(
                f"--start {args.start}: the meters would report after now (their last wake-up"
                f" is a day after the period), with readings the backend takes as from the"
                f" future; start on {last} or earlier"
            )
    else:
        start_s = latest
    return FleetSpec(meters=args.meters, days=args.days, seed=args.seed, start_s=start_s,
                     gas_share=args.gas_share, tenant=args.tenant,
                     dtls_share=args.dtls_share, platform_share=args.platform_share)  # fmt: skip


def _network(args: argparse.Namespace) -> NetworkModel:
    return NetworkModel(args.loss, args.latency_ms, args.jitter_ms, args.time_scale)


def _provisioning(args: argparse.Namespace, truth: Truth, uplinks: list[Uplink]) -> Provisioning:
    from simulator.provision import Provisioning, Target

    if not args.api_key:
        raise SystemExit(_fail("no API key: set NBMETER_API_KEY or pass --api-key"))
    target = Target(
        api_url=args.api_url, api_key=args.api_key, database_url=_env("NBMETER_DATABASE_URL"),
        credentials_key=_env("NBMETER_CREDENTIALS_KEY"),
        mqtt_admin_url=_env("NBMETER_MQTT_ADMIN_URL"), tenant=args.tenant,
        plain_coap=args.plain_coap,
    )  # fmt: skip
    return Provisioning(truth, uplinks, target, args.run_dir, args.cycle_days)


async def _provision(
    args: argparse.Namespace, truth: Truth, uplinks: list[Uplink]
) -> dict[str, DeviceCredentials]:
    return await _provisioning(args, truth, uplinks).start(exchanges_now=True)


def _build(args: argparse.Namespace) -> tuple[Truth, list[Uplink]]:
    from simulator.districts import add_districts

    truth = build_truth(_spec(args), parse_faults(args.faults))
    truth = add_districts(truth, args.districts, args.pipe_leaks)
    uplinks = build_schedule(truth, _network(args))
    print(
        f"fleet: {len(truth.meters)} meters, {truth.fleet.spec.days} days, "
        f"{len(truth.faults)} meter faults ({format_faults(truth.rates) or 'none'}), "
        f"{len(uplinks)} uplinks",
        file=sys.stderr,
    )
    return truth, uplinks


def _cmd_provision(args: argparse.Namespace) -> int:
    from simulator.backend import BackendError

    try:
        truth, uplinks = _build(args)
        creds = asyncio.run(_provision(args, truth, uplinks))
    except (FaultSpecError, ValueError, BackendError) as exc:
        return _fail(str(exc))
    print(f"provisioned {len(truth.meters)} meters ({len(creds)} with credentials) "
          f"into {args.run_dir}", file=sys.stderr)  # fmt: skip
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    """Build, provision, send; exit 0 unless the collector refused good readings.

    A timeout, 5.03 or 5.00 is reported, not fatal: the meter resends on its next wake-up
    and `sim verify` judges what was stored. An exception of the simulator propagates
    with its traceback (a bug, never a collector's answer).
    """
    from simulator.backend import BackendError, credentials_load
    from simulator.provision import save_run
    from simulator.runner import RunConfig

    try:
        truth, uplinks = _build(args)
    except (FaultSpecError, ValueError) as exc:
        return _fail(str(exc))
    if args.dry_run:
        save_run(args.run_dir, truth, uplinks, {}, {"tenant": args.tenant, "dry_run": True})
        print(f"dry run: ground truth saved in {args.run_dir}", file=sys.stderr)
        return 0
    config = RunConfig(
        coap_host=args.coap_host, coap_port=args.coap_port, mqtt_url=args.mqtt_url,
        tenant=args.tenant, plain_coap=args.plain_coap, concurrency=args.concurrency,
        rate=args.rate, speed=args.speed, herd=args.herd, time_scale=args.time_scale,
        network=_network(args), coaps_port=args.coaps_port, platform_url=args.platform_url,
    )  # fmt: skip
    creds_file = args.run_dir / "credentials.json"
    prov = None
    try:
        if args.no_provision and creds_file.exists():
            creds = credentials_load(json.loads(creds_file.read_text()))
        else:  # exchanges are registered during the run, at their virtual time
            prov = _provisioning(args, truth, uplinks)
            creds = asyncio.run(prov.start(exchanges_now=False))
        driver = _driver(args, truth, creds, prov.ids if prov else {})
        summary = asyncio.run(_send(args, truth, uplinks, creds, config, prov, driver))
    except BackendError as exc:
        return _fail(str(exc))
    # the ground truth records what was sent: reports widened over a backlog, and resends
    sent = summary.uplinks(uplinks)
    if prov is not None:
        prov.uplinks = sent
        prov.save()  # with the exchanged-in meters' ids and credentials
    else:
        truthfile.save(args.run_dir, truth, sent, truthfile.load_extra(args.run_dir))
    (args.run_dir / "results.json").write_text(json.dumps(summary.results))
    if driver is not None:
        driver.save(args.run_dir)
    else:
        (args.run_dir / command_run.COMMANDS_FILE).unlink(missing_ok=True)
    print("\n".join(summary.lines()))
    return 0 if summary.ok else 1


def _driver(
    args: argparse.Namespace, truth: Truth, creds: dict[str, DeviceCredentials],
    ids: dict[str, int],
) -> command_run.CommandDriver | None:  # fmt: skip
    """The run's CommandDriver (simulator.command_run), or None without --commands."""
    oscore = {a for a, c in creds.items() if c.oscore is not None}
    mqtt = {a for a, c in creds.items() if c.mqtt is not None}
    planned = command_run.plan(truth, oscore, args.commands, mqtt) if not args.plain_coap else []
    if not planned:
        return None
    missing = sorted({p.address for p in planned} - set(ids))
    if missing:  # --no-provision: the meter ids are in the saved manifest
        ids = {**truthfile.load_extra(args.run_dir).get("meter_ids", {}), **ids}
    return command_run.CommandDriver(truth, planned, _Queuer(args.api_url, args.api_key, ids))


class _Queuer:
    """Queues a run's commands through the API (one client, opened on first use)."""

    def __init__(self, api_url: str, api_key: str, ids: dict[str, int]) -> None:
        self.api_url, self.api_key, self.ids = api_url, api_key, ids
        self.backend: Any = None

    async def __call__(
        self, address: str, kind: str, cmd_args: dict[str, Any], key: str, ttl_s: int
    ) -> int:
        from simulator.backend import Backend

        if self.backend is None:
            self.backend = Backend(self.api_url, self.api_key)
        body = {"kind": kind, "args": cmd_args, "idempotency_key": key, "ttl_s": ttl_s}
        out = await self.backend.queue_command(int(self.ids[address]), body)
        return int(out["command_id"])

    async def aclose(self) -> None:
        """Close the client."""
        if self.backend is not None:
            await self.backend.close()


async def _send(
    args: argparse.Namespace, truth: Truth, uplinks: list[Uplink],
    creds: dict[str, DeviceCredentials], config: RunConfig, prov: Provisioning | None,
    driver: command_run.CommandDriver | None,
) -> Summary:  # fmt: skip
    from simulator.runner import send_all

    try:
        return await send_all(
            truth, uplinks, creds, config, progress=not args.quiet,
            events=prov.events() if prov else None, commands=driver,
        )  # fmt: skip
    finally:
        if driver is not None and isinstance(driver.queue, _Queuer):
            await driver.queue.aclose()


def _cmd_device(args: argparse.Namespace) -> int:
    from simulator.device import run_device

    return run_device(args)


def _cmd_verify(args: argparse.Namespace) -> int:
    from simulator.backend import BackendError
    from simulator.fetch import fetch_and_check

    if not args.api_key:
        return _fail("no API key: set NBMETER_API_KEY or pass --api-key")
    try:
        truth, uplinks, extra = truthfile.load(args.run_dir)
        report = asyncio.run(fetch_and_check(args, truth, uplinks, extra))
    except (truthfile.TruthFileError, BackendError) as exc:
        return _fail(str(exc))
    planned = command_run.load(args.run_dir)
    lines = report.table()
    if planned:  # the verdict comes after the command table
        lines = [x for x in lines if not x.startswith("verify: ")]
    print("\n".join(lines))
    ok = report.ok
    if planned:
        try:
            cycle = asyncio.run(_lifecycle(args, planned))
        except BackendError as exc:
            return _fail(str(exc))
        print("\n".join(cycle.lines))
        ok = ok and cycle.ok
        print(f"verify: {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


async def _lifecycle(
    args: argparse.Namespace, planned: list[command_run.Planned]
) -> command_run.Lifecycle:
    """The command lifecycle table of a run, from the mailbox through the API."""
    from simulator.backend import Backend

    backend = Backend(args.api_url, args.api_key)
    try:
        states = {p.command_id: await backend.command(p.command_id)
                  for p in planned if p.command_id}  # fmt: skip
    finally:
        await backend.close()
    return command_run.lifecycle(planned, states)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register `run`, `device`, `verify` and `provision` under the `sim` parser."""
    sub = parser.add_subparsers(dest="sim_command", required=True, metavar="SIM_COMMAND")

    p = sub.add_parser("run", help="simulate a fleet and send its uplinks")
    _model_args(p)
    _conn_args(p)
    p.add_argument("--rate", type=float, help="load mode: uplinks per second")
    p.add_argument("--speed", type=float, help="virtual seconds per real second")
    p.add_argument("--herd", action="store_true", help="everyone at once (thundering herd)")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--no-provision", action="store_true",
                   help="reuse credentials.json of --run-dir instead of provisioning")  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="build and save truth, send nothing")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.add_argument("--commands", type=int, default=0, metavar="N",
                   help="queue commands during the run: N meters' valves closed and opened"
                   " again (CoAP and MQTT meters), clock sets, reporting changes, OMS and"
                   " OSCORE key rollovers (0: none)")  # fmt: skip
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("provision", help="register the fleet and its credentials")
    _model_args(p)
    _conn_args(p)
    p.set_defaults(func=_cmd_provision)

    p = sub.add_parser("device", help="one meter: send now, show frame, response, storage")
    _conn_args(p)
    p.add_argument("--meter", required=True, help="the meter's address")
    p.add_argument("--day", type=int, help="which report day to send (default: the last)")
    p.add_argument("--time-scale", type=float, default=0.5)
    p.set_defaults(func=_cmd_device)

    p = sub.add_parser("verify", help="compare cycle reads with the ground truth")
    _conn_args(p)
    p.add_argument("--plot", type=Path, help="write a PNG of one meter (see --meter)")
    p.add_argument("--meter", help="meter address for --plot (default: a faulty one)")
    p.set_defaults(func=_cmd_verify)
