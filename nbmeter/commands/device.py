"""`nbmeter device provision|revoke TENANT ADDRESS`: create/rotate or delete a meter's
transport credentials.

Prints the secrets once, as JSON on stdout (the database keeps only sealed or hashed
copies). Needs NBMETER_CREDENTIALS_KEY and the database (NBMETER_DATABASE_URL, or the local
stack's); an MQTT account is created when NBMETER_MQTT_ADMIN_URL is set and --no-mqtt is
not given.
`--dtls` adds a DTLS-PSK identity and key (coaps://, shown once, stored sealed).
`--platform onenet=IMEI` (or `oceanconnect=DEVICE_ID`, repeatable) maps the identity an
operator platform names the meter by, so that platform's pushes reach it.
`--aes-key HEX` stores an OMS meter's AES-128 key (32 hex digits), sealed; it is not
printed back. `revoke` deletes the OSCORE context and broker account (the meter and its
readings stay); running collectors refuse the device as soon as it commits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from dataclasses import asdict

from nbmeter.commands._env import database_url


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Attach `provision` to the `nbmeter device` subparser."""
    sub = parser.add_subparsers(dest="device_action", required=True)
    p = sub.add_parser("provision", help="create or rotate a meter's OSCORE and MQTT credentials")
    p.add_argument("tenant", help="tenant slug")
    p.add_argument("address", help="meter address exactly as the meter reports it")
    p.add_argument("--kind", choices=["water", "gas"], default="water")
    p.add_argument(
        "--format",
        dest="meter_format",
        default="cjt188",
        choices=["cjt188", "oms", "mbus", "senml", "interval"],
    )
    p.add_argument("--no-oscore", action="store_true", help="no OSCORE context")
    p.add_argument("--no-mqtt", action="store_true", help="no broker account")
    p.add_argument(
        "--dtls", action="store_true", help="a DTLS-PSK identity and key for coaps:// (udp/5684)"
    )
    p.add_argument(
        "--aes-key",
        type=_aes_key,
        metavar="HEX",
        help="the meter's OMS/wM-Bus AES-128 key, 32 hex digits (stored sealed)",
    )
    p.add_argument(
        "--platform",
        dest="platform_ids",
        action="append",
        type=_platform_id,
        default=[],
        metavar="PLATFORM=ID",
        help="the identity an operator platform names the meter by, e.g. onenet=<IMEI> or"
        " oceanconnect=<deviceId> (repeatable)",
    )
    p.set_defaults(func=_provision)
    r = sub.add_parser("revoke", help="delete a meter's OSCORE context and broker account")
    r.add_argument("tenant", help="tenant slug")
    r.add_argument("address", help="meter address exactly as the meter reports it")
    r.set_defaults(func=_revoke)


def _revoke(args: argparse.Namespace) -> int:
    from devices.provision import ProvisionError, revoke_device
    from storage.errors import StorageError

    db = database_url()
    admin = os.environ.get("NBMETER_MQTT_ADMIN_URL")
    try:
        result = asyncio.run(revoke_device(db, args.tenant, args.address, mqtt_admin_url=admin))
    except (ProvisionError, StorageError) as exc:
        print(f"nbmeter: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(asdict(result), indent=2))
    return 0


def _aes_key(text: str) -> bytes:
    """32 hex digits -> 16 bytes; argparse reports the ValueError as a usage error."""
    raw = bytes.fromhex(text.strip())
    if len(raw) != 16:  # AES-128
        msg = "an AES-128 key is 32 hex digits"
        raise ValueError(msg)
    return raw


def _platform_id(text: str) -> tuple[str, str]:
    """`onenet=869...` -> ("onenet", "869..."); argparse reports the ValueError."""
    platform, sep, device_id = text.partition("=")
    if not sep or not platform or not device_id:
        msg = "write PLATFORM=ID, e.g. onenet=869975031234567"
        raise ValueError(msg)
    return platform.strip(), device_id.strip()


def _provision(args: argparse.Namespace) -> int:
    from devices.provision import ProvisionError, provision_device
    from storage.errors import StorageError

    db = database_url()
    key = os.environ.get("NBMETER_CREDENTIALS_KEY")
    if not key:
        print("nbmeter: set NBMETER_CREDENTIALS_KEY (eval $(nbmeter stack env))", file=sys.stderr)
        return 1
    admin = None if args.no_mqtt else os.environ.get("NBMETER_MQTT_ADMIN_URL")
    try:
        result = asyncio.run(
            provision_device(
                db,
                args.tenant,
                args.address,
                credentials_key=key,
                mqtt_admin_url=admin,
                kind=args.kind,
                meter_format=args.meter_format,
                oscore=not args.no_oscore,
                aes_key=args.aes_key,
                platform_ids=dict(args.platform_ids),
                dtls_psk=args.dtls,
            )
        )
    except (ProvisionError, StorageError) as exc:
        print(f"nbmeter: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(asdict(result), indent=2))
    return 0
