"""`nbmeter stack up|down|status|env|tools`: the local TimescaleDB + Mosquitto."""

from __future__ import annotations

import argparse
import sys


def _run(args: argparse.Namespace) -> int:
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
        print(f"nbmeter: {exc}", file=sys.stderr)
        return 1
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `nbmeter stack`."""
    parser.add_argument("action", choices=["up", "down", "status", "env", "tools"])
    parser.add_argument("--export", action="store_true", help="env: prefix lines with `export `")
    parser.set_defaults(func=_run)
