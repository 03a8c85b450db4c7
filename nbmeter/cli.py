"""`nbmeter`: one command for operators, field engineers and CI.

  nbmeter stack up|down|status|env   the local TimescaleDB + Mosquitto
  nbmeter db migrate|status           schema migrations
  nbmeter decode [HEX ...]            decode frames (or JSONL on stdin) to JSON
  nbmeter collector                   CoAP + MQTT ingestion
  nbmeter api                         the billing API
  nbmeter tenant create               a tenant and its first admin API key
  nbmeter tenant key create|list|revoke  API keys (with expiry)
  nbmeter quarantine list|show|redecode  quarantined uplinks; re-decode them
  nbmeter command send|bulk|list|show|cancel|job  commands to meters (the mailbox)
  nbmeter reads manual|import         manual reads and historical imports
  nbmeter device provision|revoke     per-meter transport credentials
  nbmeter sim ...                     the device-fleet simulator
  nbmeter analytics run [--day D]     night flow, districts, silent meters (once)
  nbmeter demo                        the whole system with a demo fleet, verified
  nbmeter screenshots --out DIR       a PNG of every console page (Playwright + Chromium)

Every command exits 0 on success, 1 on a failure it explains, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from nbmeter.commands import (
    analytics,
    api,
    collector,
    command,
    db,
    decode,
    demo,
    device,
    quarantine,
    reads,
    screenshots,
    sim,
    stack,
    tenant,
)

Handler = Callable[[argparse.Namespace], int]

# name, module, help: the order is the order of `nbmeter --help`
COMMANDS = (
    ("stack", stack, "the local TimescaleDB + Mosquitto"),
    ("db", db, "database schema"),
    ("decode", decode, "decode meter frames to JSON, one object per frame"),
    ("demo", demo, "the whole system with a demo fleet, verified against ground truth"),
    ("collector", collector, "collector commands"),
    ("api", api, "api commands"),
    ("tenant", tenant, "tenant commands"),
    ("quarantine", quarantine, "quarantine commands"),
    ("command", command, "commands to meters: valve, clock, reporting, rotate_key, read"),
    ("reads", reads, "reads commands"),
    ("device", device, "device commands"),
    ("sim", sim, "sim commands"),
    ("analytics", analytics, "night flow, districts, silent meters: run the analytics"),
    ("screenshots", screenshots, "a PNG of every console page, from a running API"),
)


def build_parser() -> argparse.ArgumentParser:
    """The `nbmeter` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="nbmeter", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module, help_text in COMMANDS:
        module.add_arguments(sub.add_parser(name, help=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `nbmeter` console script."""
    args = build_parser().parse_args(argv)
    handler: Handler = args.func
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
