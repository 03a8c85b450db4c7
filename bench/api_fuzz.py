"""Schemathesis against a real API process, many cases: 5xx per endpoint (a script, not a test).

    NBMETER_DATABASE_URL=... .venv/bin/python bench/api_fuzz.py [--cases 30000] [--seed 1]
        [--workers 1]

Builds a scratch database (migrated; one tenant with an admin key and a few meters with
readings), starts `nbmeter api` on a free loopback port, then spreads `--cases` over every
operation of its /openapi.json: two thirds valid input, one third input the schema forbids
(for operations that take any), in passes with successive seeds until the count is
reached. Every response goes through schemathesis' checks (no 5xx; status code, content
type and body conform to the schema; invalid input refused with a 4xx) without stopping
at a failure. Prints per endpoint: cases, 5xx, other check failures; then the total, the
time taken and the API log's `request.failed` count (500s answered with an error id).
Exits 1 if any 5xx. The scratch database is dropped at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from schemathesis import checks as st_checks
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi import checks as oa_checks

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from storage.apikeys import create_api_key, create_tenant  # noqa: E402
from storage.migrate import migrate  # noqa: E402
from storage.rows import READ_S_EPOCH  # noqa: E402

CHECKS = [
    st_checks.not_a_server_error,
    oa_checks.status_code_conformance,
    oa_checks.content_type_conformance,
    oa_checks.response_schema_conformance,
    oa_checks.negative_data_rejection,
]
Endpoint = tuple[str, str]


def say(msg: str) -> None:
    """Progress on stderr, figures on stdout."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    """A free loopback TCP port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def build(dsn: str) -> str:
    """Migrate `dsn`; a tenant with 5 meters, 60 days of readings each; its admin key."""
    await migrate(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        tenant = await create_tenant(conn, "fuzz", "fuzz")
        first = datetime(2024, 1, 1, tzinfo=UTC)
        for n in range(5):
            meter = await conn.fetchval(
                "INSERT INTO meters (tenant_id, address, kind, format, installed_at)"
                " VALUES ($1, $2, 'water', 'cjt188', $3) RETURNING meter_id",
                tenant,
                f"FUZZ{n:04d}",
                first - timedelta(days=1),
            )
            since_2000 = int(first.timestamp()) - READ_S_EPOCH  # readings.read_s (0054)
            rows = [(meter, since_2000 + d * 86400, 1000 * d, 0) for d in range(60)]
            await conn.copy_records_to_table(
                "readings",
                records=rows,
                columns=["meter_id", "read_s", "register_ml", "flags"],
            )
        return await create_api_key(conn, tenant, ["admin"])
    finally:
        await conn.close()


def has_input(operation: schemathesis.schemas.APIOperation) -> bool:
    """True when the operation takes a body or a parameter besides the Authorization key."""
    names = [p.name.lower() for p in operation.iter_parameters()]
    return bool(operation.get_request_payload_content_types()) or any(
        n != "authorization" for n in names
    )


class Tally:
    """Cases, 5xx and other check failures per endpoint."""

    def __init__(self) -> None:
        self.cases: Counter[Endpoint] = Counter()
        self.server_errors: Counter[Endpoint] = Counter()
        self.failures: Counter[Endpoint] = Counter()
        self.kinds: Counter[str] = Counter()
        self.examples: dict[str, str] = {}


def fuzz_operation(
    operation: schemathesis.schemas.APIOperation,
    mode: GenerationMode,
    examples: int,
    run_seed: int,
    auth: dict[str, str],
    tally: Tally,
) -> None:
    """Run up to `examples` cases of one operation and mode; count, never stop early."""
    endpoint = (operation.method.upper(), operation.path)

    @seed(run_seed)
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: nothing fails here
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case) -> None:  # type: ignore[no-untyped-def]
        response = case.call(headers=auth, timeout=60)
        tally.cases[endpoint] += 1
        if response.status_code >= 500:
            tally.server_errors[endpoint] += 1
        try:
            case.validate_response(response, checks=CHECKS, headers=auth)
        except (AssertionError, BaseExceptionGroup) as exc:  # counted, the run goes on
            tally.failures[endpoint] += 1
            for failure in getattr(exc, "exceptions", [exc]):
                kind = type(failure).__name__
                tally.kinds[kind] += 1
                tally.examples.setdefault(
                    f"{kind} {endpoint[0]} {endpoint[1]}",
                    f"{str(failure)[:500]}\n    {case.as_curl_command(headers=auth)[:300]}",
                )

    run()


def fuzz(base: str, key: str, total: int, first_seed: int, only: str | None) -> Tally:
    """Spread `total` cases over every operation (or those matching `only`), in passes."""
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations()]
    operations = [op for op in operations if only is None or only in op.path]
    auth = {"Authorization": f"Bearer {key}"}
    tally = Tally()
    with_input = sum(1 for op in operations if has_input(op))
    per_op = max(3, total // max(1, with_input))
    passes = 0
    while sum(tally.cases.values()) < total and passes < 20:
        for i, op in enumerate(operations):
            plan = [(GenerationMode.POSITIVE, per_op * 2 // 3 if has_input(op) else 20)]
            if has_input(op):
                plan.append((GenerationMode.NEGATIVE, per_op - plan[0][1]))
            for mode, examples in plan:
                fuzz_operation(op, mode, examples, first_seed + 1000 * passes + i, auth, tally)
            say(f"pass {passes + 1}: {op.method.upper()} {op.path}: {sum(tally.cases.values())}")
        passes += 1
    return tally


def report(tally: Tally, seconds: float, failed_logged: int) -> int:
    """Print the table and totals; 1 if any 5xx."""
    print(f"{'endpoint':<50} {'cases':>7} {'5xx':>5} {'checks_failed':>14}")
    for method, path in sorted(tally.cases, key=lambda e: (e[1], e[0])):
        e = (method, path)
        print(
            f"{method + ' ' + path:<50} {tally.cases[e]:>7} {tally.server_errors[e]:>5}"
            f" {tally.failures[e]:>14}"
        )
    cases = sum(tally.cases.values())
    print(f"total_cases {cases}")
    print(f"total_5xx {sum(tally.server_errors.values())}")
    print(f"total_check_failures {sum(tally.failures.values())}")
    for kind, count in tally.kinds.most_common():
        print(f"  {kind}: {count}")
    for where, example in tally.examples.items():
        print(f"  first {where}: {example}")
    print(f"api_log_request_failed {failed_logged}")
    print(f"seconds {seconds:.1f}")
    print(f"cases_per_second {cases / seconds:.0f}")
    return 1 if tally.server_errors else 0


async def _admin(server: str, sql: str) -> None:
    conn = await asyncpg.connect(server)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def main() -> int:
    """Build, start the API, fuzz, print, drop."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=30_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--only", help="fuzz only operations whose path contains this")
    args = parser.parse_args()
    server = os.environ["NBMETER_DATABASE_URL"]
    name = f"nbmeter_fuzz_{secrets.token_hex(4)}"
    dsn = urlunsplit(urlsplit(server)._replace(path=f"/{name}"))
    asyncio.run(_admin(server, f'CREATE DATABASE "{name}"'))
    say(f"scratch database {name}")
    # SIGTERM unwinds like an exception, so the API is stopped and the database dropped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    proc = None
    try:
        key = asyncio.run(build(dsn))
        port = free_port()
        log = tempfile.NamedTemporaryFile(prefix="api-fuzz-", suffix=".log", delete=False)  # noqa: SIM115
        env = {**os.environ, "NBMETER_DATABASE_URL": dsn, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "nbmeter.cli", "api", "--port", str(port)),
                *("--workers", str(args.workers), "--log-level", "warning"),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                say("the API did not start")
                return 1
            time.sleep(0.2)
        say(f"API on {base} (log {log.name}); fuzzing {args.cases} cases")
        started = time.perf_counter()
        tally = fuzz(base, key, args.cases, args.seed, args.only)
        seconds = time.perf_counter() - started
        failed = Path(log.name).read_text(errors="replace").count("request.failed")
        return report(tally, seconds, failed)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
        asyncio.run(_admin(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        say(f"dropped {name}")


if __name__ == "__main__":
    sys.exit(main())
