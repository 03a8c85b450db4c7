"""Ingest benchmark: ReadingWriter against a raw binary COPY of the same rows, same server.

    NBMETER_DATABASE_URL=postgresql://... .venv/bin/python bench/ingest.py [--rows N ...]

Creates a scratch database on that server, migrates it with `storage.migrate.migrate`,
registers `--meters` meters and ingests `--rows` hourly readings (the fleet reports
once an hour; each hour is one batch, rows in random arrival order) in alternating
rounds of
- raw COPY: the pre-encoded binary COPY payload of each batch as it arrived, one
  transaction per batch, into `bench_raw`, a hypertable created LIKE readings (same
  unique index); encoding is not timed;
- raw COPY, key-sorted: the same, with each batch pre-sorted by (meter_id, read_at)
  as the writer sends it, into `bench_raw_sorted`: the server's own ceiling;
- writer: `ReadingWriter.write` of the same batches into the real `readings`
  (validation, sorting, meter check, encoding and dedup all timed);
The two alternate batch by batch (the first of each pair alternating by round), so
that both see the same background load. After round 1 come a replay of every batch
(must insert 0) and the writer with `copy_first=False` (the staging + INSERT ... ON
CONFLICT path, for fresh rows). Both tables are truncated between rounds. Medians
are reported; the last line is `ratio_vs_raw_copy=<median of per-round writer/raw>`.
The database is dropped at the end, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import numpy as np

from storage import copybin
from storage.ingest import ReadingBatch, ReadingWriter
from storage.migrate import migrate
from storage.rows import READ_S_EPOCH

T0_S = 1_767_225_600  # 2026-01-01T00:00:00Z
_RAW_DDL = """
CREATE TABLE bench_raw (LIKE readings INCLUDING ALL);
SELECT create_hypertable('bench_raw', by_range('read_s', 86400));
CREATE TABLE bench_raw_sorted (LIKE readings INCLUDING ALL);
SELECT create_hypertable('bench_raw_sorted', by_range('read_s', 86400));
"""


def _database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def make_batches(meter_ids: np.ndarray, n_rows: int, seed: int) -> list[ReadingBatch]:
    """Hourly batches of one reading per meter, in a random arrival order per hour."""
    rng = np.random.default_rng(seed)
    hours = -(-n_rows // len(meter_ids))
    batches = []
    left = n_rows
    for hour in range(hours):
        take = min(left, len(meter_ids))
        left -= take
        mid = rng.permutation(meter_ids)[:take]
        read_at = np.full(take, T0_S + hour * 3600, np.int64) + rng.integers(0, 60, take)
        batches.append(
            ReadingBatch(
                meter_id=mid,
                read_at_s=read_at,
                register_ml=mid * 1_000 + hour * 10,
                flags=np.zeros(take, np.uint32),
                received_at_us=(T0_S + hour * 3600 + 90) * 1_000_000,
            )
        )
    return batches


def by_key(batch: ReadingBatch) -> ReadingBatch:
    """The same rows in (meter_id, read_at) order, the order the writer sends them in."""
    order = np.lexsort((batch.read_at_s, batch.meter_id))
    return ReadingBatch(
        meter_id=batch.meter_id[order],
        read_at_s=batch.read_at_s[order],
        register_ml=batch.register_ml[order],
        flags=batch.flags[order],
        received_at_us=batch.received_at_us,
    )


RAW_COLUMNS = ("read_s", "meter_id", "register_ml", "flags")


def raw_payload(batch: ReadingBatch) -> bytes:
    """The binary COPY payload of `batch` in its own row order, no validation or sorting."""
    columns: list[copybin.Column] = [  # the table's column order (0054)
        ("read_s", "integer", batch.read_at_s - READ_S_EPOCH),
        ("meter_id", "integer", batch.meter_id),
        ("register_ml", "bigint", batch.register_ml),
        ("flags", "integer", batch.flags),
    ]
    return copybin.encode(columns, len(batch))


class Progress:
    """One status line per phase: rewritten in place on a terminal, printed once otherwise."""

    def __init__(self, label: str, total: int) -> None:
        """Start the clock for `total` rows of phase `label`."""
        self.label, self.total, self.done = label, total, 0
        self.tty = sys.stdout.isatty()

    def show(self, rates: str, *, final: bool = False) -> None:
        """Show rows done so far and `rates`; `final` ends the line."""
        text = f"  {self.label:<24} {self.done:>9,}/{self.total:,} rows  {rates}"
        if self.tty:
            print(f"\r{text:<110}", end="\n" if final else "", flush=True)
        elif final:
            print(text, flush=True)


def _rate(rows: int, seconds: float) -> float:
    return rows / seconds if seconds else 0.0


async def timed(
    label: str, batches: list[ReadingBatch], write: Callable[[int], Awaitable[str]]
) -> float:
    """Run `write(i)` for every batch, showing progress; return rows per second."""
    total = sum(len(b) for b in batches)
    progress = Progress(label, total)
    paths: dict[str, int] = {}
    elapsed = 0.0
    for i, batch in enumerate(batches):
        started = time.perf_counter()
        path = await write(i)
        elapsed += time.perf_counter() - started
        paths[path] = paths.get(path, 0) + 1
        progress.done += len(batch)
        progress.show(f"{_rate(progress.done, elapsed):>9,.0f} rows/s")
    summary = " ".join(f"{k}x{v}" for k, v in sorted(paths.items()))
    progress.show(f"{_rate(total, elapsed):>9,.0f} rows/s  {elapsed:5.2f} s  {summary}", final=True)
    return _rate(total, elapsed)


async def paired(
    batches: list[ReadingBatch], steps: dict[str, Callable[[int], Awaitable[str]]], *, turn: int
) -> dict[str, float]:
    """Run every step on each batch in turn (rotating who goes first); return rows/s per step.

    Interleaving per batch exposes all steps to the same background load (this machine
    is shared), which phase-by-phase runs do not.
    """
    total = sum(len(b) for b in batches)
    names = list(steps)
    progress = Progress(" | ".join(names), total)
    spent = dict.fromkeys(names, 0.0)
    paths: dict[str, int] = {}
    for i, batch in enumerate(batches):
        shift = (turn + i) % len(names)
        for name in names[shift:] + names[:shift]:
            started = time.perf_counter()
            path = await steps[name](i)
            spent[name] += time.perf_counter() - started
            if name == "writer":
                paths[path] = paths.get(path, 0) + 1
        progress.done += len(batch)
        progress.show(" | ".join(f"{_rate(progress.done, spent[n]):>9,.0f}" for n in names))
    summary = " ".join(f"{k}x{v}" for k, v in sorted(paths.items()))
    rates = {n: _rate(total, spent[n]) for n in names}
    progress.show(
        " | ".join(f"{rates[n]:>9,.0f}" for n in names) + f" rows/s  writer paths: {summary}",
        final=True,
    )
    return rates


async def run(args: argparse.Namespace) -> None:
    """Create, fill, measure and drop the scratch database."""
    name = f"nbmeter_bench_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(args.dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    print(f"scratch database {name}: migrating ...", flush=True)
    try:
        await measure(_database(args.dsn, name), args)
    finally:
        admin = await asyncpg.connect(args.dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()
        print(f"scratch database {name} dropped", flush=True)


async def measure(url: str, args: argparse.Namespace) -> None:
    """The measurements proper, on the migrated scratch database at `url`."""
    await migrate(url)
    async with asyncpg.create_pool(url, min_size=2, max_size=2) as pool:
        await pool.execute(_RAW_DDL)
        tenant = await pool.fetchval(
            "INSERT INTO tenants (slug, name) VALUES ('bench', 'bench') RETURNING tenant_id"
        )
        rows = await pool.fetch(
            "INSERT INTO meters (tenant_id, address, kind, format)"
            " SELECT $1, lpad(g::text, 14, '0'), 'water', 'cjt188'"
            " FROM generate_series(1, $2) g RETURNING meter_id",
            tenant,
            args.meters,
        )
        meter_ids = np.array([r["meter_id"] for r in rows], np.int64)
        batches = make_batches(meter_ids, args.rows, seed=1)
        payloads = [raw_payload(b) for b in batches]
        sorted_payloads = [raw_payload(by_key(b)) for b in batches]
        print(
            f"{args.rows:,} readings, {args.meters:,} meters, {len(batches)} batches "
            f"of <= {len(meter_ids):,} rows; {args.rounds} rounds",
            flush=True,
        )
        writer = ReadingWriter(pool)
        raw_rates: list[float] = []
        sorted_rates: list[float] = []
        writer_rates: list[float] = []
        replay_rate = merge_rate = 0.0
        async with pool.acquire() as conn:

            async def raw(i: int) -> str:
                async with conn.transaction():
                    await conn.copy_to_table(
                        "bench_raw",
                        source=memoryview(payloads[i]),
                        columns=RAW_COLUMNS,
                        format="binary",
                    )
                return "copy"

            async def raw_sorted(i: int) -> str:
                async with conn.transaction():
                    await conn.copy_to_table(
                        "bench_raw_sorted",
                        source=memoryview(sorted_payloads[i]),
                        columns=RAW_COLUMNS,
                        format="binary",
                    )
                return "copy"

            async def write(i: int) -> str:
                result = await writer.write(batches[i], conn=conn)
                if result.new != len(batches[i]):
                    msg = f"batch {i}: {result.new} new of {len(batches[i])}"
                    raise RuntimeError(msg)
                return result.path

            replay_writer = ReadingWriter(pool)  # its own merge-run state

            async def replay(i: int) -> str:
                result = await replay_writer.write(batches[i], conn=conn)
                if result.new or result.duplicate != len(batches[i]):
                    msg = f"replay of batch {i} inserted {result.new} rows"
                    raise RuntimeError(msg)
                return result.path

            merge_writer = ReadingWriter(pool, copy_first=False)

            async def merge_only(i: int) -> str:
                return (await merge_writer.write(batches[i], conn=conn)).path

            for round_no in range(1, args.rounds + 1):
                print(f"round {round_no}/{args.rounds}", flush=True)
                await conn.execute("TRUNCATE bench_raw, bench_raw_sorted, readings")
                rates = await paired(
                    batches, {"raw": raw, "raw_sorted": raw_sorted, "writer": write}, turn=round_no
                )
                raw_rates.append(rates["raw"])
                sorted_rates.append(rates["raw_sorted"])
                writer_rates.append(rates["writer"])
                if round_no == 1:
                    replay_rate = await timed("replay (0 new)", batches, replay)
                    await conn.execute("TRUNCATE readings")
                    merge_rate = await timed("writer, copy_first=off", batches, merge_only)
            stored = await conn.fetchval("SELECT count(*) FROM readings")
            if stored != args.rows:
                msg = f"readings holds {stored} rows, expected {args.rows}"
                raise RuntimeError(msg)
    raw_rate = statistics.median(raw_rates)
    writer_rate = statistics.median(writer_rates)
    # the ratio of each round pairs runs made under the same background load
    ratio = statistics.median(w / r for w, r in zip(writer_rates, raw_rates, strict=True))
    print(f"summary (median of {args.rounds} rounds; rows/s)")
    print(f"  raw binary COPY        {raw_rate:>10,.0f}   rounds: {_rates(raw_rates)}")
    print(
        f"  raw COPY, key-sorted   {statistics.median(sorted_rates):>10,.0f}   "
        f"rounds: {_rates(sorted_rates)}"
    )
    print(f"  ReadingWriter          {writer_rate:>10,.0f}   rounds: {_rates(writer_rates)}")
    print(f"  replay, 0 inserted     {replay_rate:>10,.0f}")
    print(f"  writer, merge path     {merge_rate:>10,.0f}   (staging + ON CONFLICT, fresh rows)")
    print(f"  writer / raw per round {_ratios(writer_rates, raw_rates)}")
    print(f"  writer / raw key-sorted per round {_ratios(writer_rates, sorted_rates)}")
    print(f"ratio_vs_raw_copy={ratio:.3f}")


def _ratios(writer: list[float], raw: list[float]) -> str:
    return ", ".join(f"{w / r:.3f}" for w, r in zip(writer, raw, strict=True))


def _rates(rates: list[float]) -> str:
    return ", ".join(f"{r:,.0f}" for r in rates)


def main() -> None:
    """Parse arguments and run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default=os.environ.get("NBMETER_DATABASE_URL"))
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--meters", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not args.dsn:
        parser.error("set NBMETER_DATABASE_URL or pass --dsn (`eval $(nbmeter stack env)`)")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
