"""`nbmeter collector`: run the CoAP + MQTT collector until SIGTERM (settings from NBMETER_*)."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from pydantic import ValidationError

from nbmeter.commands._env import database_url


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Attach the collector's options to its `nbmeter collector` subparser."""
    parser.add_argument("--coap-port", type=int, help="UDP port for CoAP (default 5683)")
    parser.add_argument("--metrics-port", type=int, help="HTTP port for /metrics (0: off)")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from collector.logs import configure_logging
    from collector.main import run
    from collector.settings import CollectorSettings

    # values of any type: pydantic validates each against its field
    overrides: dict[str, Any] = {"database_url": database_url()}
    if args.metrics_port is not None:
        overrides["metrics_port"] = args.metrics_port
    try:
        settings = CollectorSettings(**overrides)
        if args.coap_port is not None:
            coap = settings.coap.model_copy(update={"port": args.coap_port})
            settings = settings.model_copy(update={"coap": coap})
    except ValidationError as exc:
        print(f"nbmeter collector: bad settings: {exc}")
        return 2
    configure_logging(settings.log_json)
    try:
        asyncio.run(run(settings))
    except KeyboardInterrupt:
        return 130
    return 0
