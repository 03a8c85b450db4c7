"""`nbmeter api`: serve the billing API."""

from __future__ import annotations

import argparse


def _run(args: argparse.Namespace) -> int:
    from api.serve import run
    from api.settings import ApiSettings
    from nbmeter.commands._env import database_url

    settings = ApiSettings(database_url=database_url())
    run(args.host, args.port, settings, log_level=args.log_level, workers=args.workers)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `nbmeter api`."""
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--log-level", default="info")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes sharing the port (about one per core left after PostgreSQL's share)",
    )
    parser.set_defaults(func=_run)
