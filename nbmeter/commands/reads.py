"""`nbmeter reads manual|import`: enter a manual read, or import historical reads, from a shell.

The same checks and bookkeeping as POST /v1/meters/{id}/manual-reads and /v1/reads/import
(storage.manual_reads), for the tenant named by its slug; `entered_by` is `cli:<name>`
(--by, default the login name).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pydantic import ValidationError

from api.read_import import BodyError, Kind, parse
from api.schemas_manual import ManualReadCreate
from api.settings import ApiSettings
from storage import manual_reads
from storage.apikeys import UnknownTenantError, tenant_id_of
from storage.errors import StorageError
from storage.manual_reads import EnteredRead, EnteredReadError
from storage.pool import connected


def _fail(message: str) -> int:
    print(f"nbmeter reads: {message}", file=sys.stderr)
    return 1


async def _enter(
    dsn: str,
    slug: str,
    reads: list[EnteredRead],
    problems: list[tuple[int, str]],
    source: manual_reads.Source,
    entered_by: str,
    tolerance: timedelta,
    body_sha256: bytes | None = None,
) -> manual_reads.ImportResult:
    async with connected(dsn, "entering reads") as conn:
        try:
            tenant_id = await tenant_id_of(conn, slug)
        except UnknownTenantError:
            msg = f"no tenant {slug!r}: see `nbmeter tenant create`"
            raise EnteredReadError([(0, msg)]) from None
        return await manual_reads.store(
            conn,
            tenant_id,
            reads,
            source=source,
            entered_by=entered_by,
            now=datetime.now(UTC),
            tolerance=tolerance,
            problems=problems,
            body_sha256=body_sha256,
        )


def _run(args: argparse.Namespace) -> int:
    from nbmeter.commands._env import database_url

    dsn = database_url()
    settings = ApiSettings(database_url=dsn)
    tolerance = timedelta(seconds=settings.future_tolerance_s)
    who = f"cli:{args.by or getpass.getuser()}"
    problems: list[tuple[int, str]] = []
    try:
        if args.action == "manual":
            if args.meter_id is None or args.register_m3 is None or args.at is None:
                return _fail("manual needs --meter-id, --register-m3 and --at")
            try:
                body = ManualReadCreate.model_validate(
                    {
                        "read_at": args.at,
                        "register_m3": args.register_m3,
                        "source": args.source,
                        "note": args.note,
                    }
                )
            except ValidationError as exc:
                return _fail(str(exc.errors()[0]["msg"]))
            read = EnteredRead(
                1,
                args.meter_id,
                None,
                body.read_at,
                body.millilitres(),
                manual_reads.MANUAL_QUALITY,
                body.note,
            )
            done = asyncio.run(_enter(dsn, args.tenant, [read], [], body.source, who, tolerance))
            print("stored" if done.stored else "already stored (same read)")
            return 0
        if args.file is None:
            return _fail("import needs --file (CSV, or JSON when it ends in .json)")
        data = Path(args.file).read_bytes()
        kind: Kind = "json" if args.file.endswith(".json") else "csv"
        try:
            reads, problems = parse(data, kind)
        except BodyError as exc:
            return _fail(f"line {exc.line}: {exc.reason}")
        done = asyncio.run(
            _enter(
                dsn,
                args.tenant,
                reads,
                problems,
                "import",
                who,
                tolerance,
                manual_reads.body_digest(data),
            )
        )
    except EnteredReadError as exc:
        for line, reason in exc.problems:
            print(f"line {line}: {reason}", file=sys.stderr)
        return _fail("refused, nothing stored")
    except StorageError as exc:
        return _fail(str(exc))
    state = "replayed (imported before)" if done.replayed else "imported"
    print(
        f"{state}: import {done.import_id}, {done.rows} rows, {done.stored} stored,"
        f" {done.duplicates} already stored"
    )
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `nbmeter reads`."""
    parser.add_argument("action", choices=["manual", "import"])
    parser.add_argument("--tenant", required=True, help="tenant slug")
    parser.add_argument("--meter-id", type=int, help="manual: the meter")
    parser.add_argument("--register-m3", help="manual: the register read, e.g. 123.456")
    parser.add_argument("--at", help="manual: when it was read, ISO 8601 with offset")
    parser.add_argument("--source", choices=["visit", "customer_photo", "other"], default="visit")
    parser.add_argument("--note")
    parser.add_argument("--file", help="import: a CSV file, or a JSON array (*.json)")
    parser.add_argument("--by", help="who enters it (default: the login name)")
    parser.set_defaults(func=_run)
