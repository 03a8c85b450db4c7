"""`nbmeter`: one command for operators, field engineers and CI.

  nbmeter stack up|down|status|env   the local TimescaleDB + Mosquitto
  nbmeter db migrate|status           schema migrations
  nbmeter decode [HEX ...]            decode frames (or JSONL on stdin) to JSON
  nbmeter collector                   CoAP + MQTT ingestion
  nbmeter api                         the billing API
  nbmeter tenant create               a tenant and its first admin API key
  nbmeter tenant key create|list|revoke  API keys (with expiry)
  nbmeter quarantine list|show|redecode  quarantined uplinks; re-decode them
  nbmeter reads manual|import         manual reads and historical imports
  nbmeter device provision|revoke     per-meter transport credentials
  nbmeter sim ...                     the device-fleet simulator
  nbmeter demo                        the whole system with a demo fleet, verified

Every command exits 0 on success, 1 on a failure it explains, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable
from typing import Any

Handler = Callable[[argparse.Namespace], int]


def _fail(message: str) -> int:
    print(f"nbmeter: {message}", file=sys.stderr)
    return 1


def _stack(args: argparse.Namespace) -> int:
    from nbmeter import stack

    try:
        cfg = stack.load_config()
        if args.action == "up":
            print(stack.up(cfg), file=sys.stderr)
        elif args.action == "down":
            print(stack.down(cfg), file=sys.stderr)
        elif args.action == "status":
            ok, lines = stack.status(cfg)
            print("\n".join(lines))
            return 0 if ok else 1
        elif args.action == "tools":
            from nbmeter.stack.control import tools

            print("\n".join(tools(cfg)), file=sys.stderr)
        else:
            print("\n".join(stack.env_lines(cfg, export=args.export)))
    except stack.StackError as exc:
        return _fail(str(exc))
    return 0


def database_url() -> str:
    """NBMETER_DATABASE_URL, or the local stack's URL when it is not set."""
    url = os.environ.get("NBMETER_DATABASE_URL")
    if url:
        return url
    from nbmeter.stack.config import load_config
    from nbmeter.stack.control import database_url as stack_url

    return stack_url(load_config())


def _db(args: argparse.Namespace) -> int:
    from storage import migrate
    from storage.errors import StorageError

    try:
        if args.action == "migrate":
            applied = asyncio.run(migrate.migrate(database_url()))
            print(
                f"applied {len(applied)} migration(s)"
                + (": " + ", ".join(applied) if applied else " (schema current)")
            )
        else:
            names = asyncio.run(migrate.current(database_url()))
            pending = [m.name for m in migrate.available() if m.name not in names]
            print(f"applied: {len(names)}; pending: {', '.join(pending) or 'none'}")
    except StorageError as exc:
        return _fail(str(exc))
    return 0


def _decode(args: argparse.Namespace) -> int:
    from nbmeter.decode_cmd import run_decode

    return run_decode(args)


def _demo(args: argparse.Namespace) -> int:
    if args.ingest_only:
        from nbmeter.demo import run_ingest_demo

        return run_ingest_demo(args)
    from nbmeter.system_demo import run_system_demo

    return run_system_demo(args)


def _optional(module: str, attr: str) -> Any:
    """Import `module.attr` of a component that may not be built yet, or None."""
    try:
        mod = __import__(module, fromlist=[attr])
    except ImportError:
        return None
    return getattr(mod, attr, None)


def build_parser() -> argparse.ArgumentParser:
    """The `nbmeter` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="nbmeter", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("stack", help="the local TimescaleDB + Mosquitto")
    p.add_argument("action", choices=["up", "down", "status", "env", "tools"])
    p.add_argument("--export", action="store_true", help="env: prefix lines with `export `")
    p.set_defaults(func=_stack)

    p = sub.add_parser("db", help="database schema")
    p.add_argument("action", choices=["migrate", "status"])
    p.set_defaults(func=_db)

    p = sub.add_parser("decode", help="decode meter frames to JSON, one object per frame")
    p.add_argument(
        "frames", nargs="*", help="hex frames; none: read lines (hex or JSONL) from stdin"
    )
    p.add_argument("--keys", help="JSON file mapping meter id to AES-128 key (hex)")
    p.add_argument("--received-at", type=int, help="receive time, UTC epoch seconds (default now)")
    p.set_defaults(func=_decode)

    p = sub.add_parser(
        "demo", help="the whole system with a demo fleet, verified against ground truth"
    )
    p.add_argument("--meters", type=int, default=1000, help="fleet size (default 1000)")
    p.add_argument("--days", type=int, default=35, help="simulated days (default 35)")
    p.add_argument("--hours", type=int, default=24, help="--ingest-only: hours of frames")
    p.add_argument(
        "--ingest-only",
        action="store_true",
        help="only decode and store a generated batch in-process (no collector, API, sim)",
    )
    p.add_argument("--stop", action="store_true", help="stop the collector and API a demo left")
    p.set_defaults(func=_demo)

    for name, module in (
        ("collector", "collector.cli"),
        ("api", "api.cli"),
        ("tenant", "api.cli_tenant"),
        ("quarantine", "api.cli_quarantine"),
        ("reads", "api.cli_reads"),
        ("device", "collector.cli_device"),
        ("sim", "simulator.cli"),
    ):
        add = _optional(module, "add_arguments")
        if add is not None:
            add(sub.add_parser(name, help=f"{name} commands"))
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
