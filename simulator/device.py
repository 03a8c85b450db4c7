"""`sim device --meter ADDRESS`: one meter, now: its frame in hex, the collector's answer,
and what the backend stored and decoded for the hours the frame carried (via the API)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys

from simulator import frames, truthfile
from simulator.backend import Backend, BackendError, credentials_load, iso
from simulator.decoded import describe
from simulator.faults import Outcome
from simulator.runner import RunConfig, Sender


async def _device(args: argparse.Namespace) -> int:
    truth, uplinks, extra = truthfile.load(args.run_dir)
    meter = next((m for m in truth.meters if m.address == args.meter), None)
    if meter is None:
        print(f"nbmeter sim: no meter {args.meter!r} in {args.run_dir}", file=sys.stderr)
        return 1
    mine = [u for u in uplinks if u.meter == meter.index and u.claimed == meter.index]
    if args.day is not None:
        mine = [u for u in mine if u.day == args.day]
    if not mine:
        print("nbmeter sim: that meter has no such uplink in the schedule", file=sys.stderr)
        return 1
    # the newest hours (a resend of an older report comes later in the file), sent as a
    # clean copy: one transmission, no emulated loss, no fault
    newest = max(mine, key=lambda u: (u.last_h, u.seq))
    up = dataclasses.replace(newest, outcome=Outcome.STORED, copies=1, corrupt=False,
                             lost_transmissions=0, latency_ms=0, fault="")  # fmt: skip
    payload = frames.encode(truth, up, truth.register_ml())
    print(f"meter     {meter.address} ({meter.kind}, {meter.format}, {meter.transport})")
    print(f"hours     {up.first_h}..{up.last_h} (day {up.day})")
    print(f"frame     {payload.hex().upper()}")
    for line in describe(meter.format, payload, up.send_s, meter):
        print(f"decoded   {line}")
    creds_file = args.run_dir / "credentials.json"
    creds = credentials_load(json.loads(creds_file.read_text())) if creds_file.exists() else {}
    config = RunConfig(coap_host=args.coap_host, coap_port=args.coap_port,
                       mqtt_url=args.mqtt_url, tenant=args.tenant,
                       plain_coap=args.plain_coap or bool(extra.get("plain_coap")),
                       time_scale=args.time_scale, sockets=1)  # fmt: skip
    sender = Sender(truth, creds, config)
    await sender.open()
    try:
        result = await sender.send(up)
    finally:
        sender.close()
    print(f"response  {result}")
    if not args.api_key:
        print("stored    (no API key: set NBMETER_API_KEY to see what was stored)")
        return 0 if result == "acked" else 1
    backend = Backend(args.api_url, args.api_key)
    try:
        row = await backend.meter_by_address(meter.address)
        if row is None:
            print("stored    the API knows no such meter")
            return 1
        start = truth.fleet.spec.start_s
        got = await backend.readings(row["meter_id"], start + (up.first_h - 1) * 3600,
                                     start + up.last_h * 3600)  # fmt: skip
    except BackendError as exc:
        print(f"stored    {exc}")
        return 1
    finally:
        await backend.close()
    for i in got.get("intervals", []):
        print(f"stored    {i['end']}  {i.get('end_register_m3')} m3  ({i.get('end_method')})")
    print(f"truth     last register {truth.register_ml()[meter.index, up.last_h]} mL at "
          f"{iso(start + up.last_h * 3600)}")  # fmt: skip
    return 0 if result == "acked" else 1


def run_device(args: argparse.Namespace) -> int:
    """Entry point of `sim device`."""
    return asyncio.run(_device(args))
