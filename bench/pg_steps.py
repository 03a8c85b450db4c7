"""PostgreSQL's CPU per OSCORE uplink, statement by statement, for herd batches as the
collector writes them; the collector's own CPU per step beside it.

    NBMETER_DATABASE_URL=... .venv/bin/python bench/pg_steps.py [--meters 100000]
        [--batch 500] [--seed 16]

A scratch database (created, migrated, dropped at the end) gets `bench/cityday.py`'s fleet
(`--meters` OSCORE meters: 60% nbm1 interval, 30% SenML, 10% CJ/T 188). Their day's
uplinks are then committed in batches of `--batch`, each as the collector commits a herd
batch: its key ids' contexts loaded in one query (`storage.credentials.load_oscore_many`),
then `collector.store.BatchStore.commit` (decode, readings, raw archive, health, replay
windows and recorded answers, in one transaction), on one connection, with the uplinks
as the uplink lane hands them on (device, replay window, partial IV).

Every statement on that connection is timed by its backend's own CPU clock
(`/proc/<pid>/schedstat`, nanoseconds: the backend runs on this machine) and by this
process's (`time.process_time`), and counted under a name from its text (the table it
writes or reads). Printed: per step, µs of PostgreSQL CPU and of this process's CPU per
uplink, and statements per batch; the totals; last line `pg_us_per_uplink=<x>`.
Nothing else should run meanwhile (the figures are CPU time, so a neighbour costs less
than it would a rate, but caches are shared).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import asyncpg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # ahead of bench/, whose collector.py is not the package

from collector.keys import MeterKeys  # noqa: E402
from collector.store import BatchStore  # noqa: E402
from collector.uplink import Device, Transport, Uplink  # noqa: E402
from storage import credentials, pgarrays  # noqa: E402
from storage.pool import keep_session  # noqa: E402

sys.path.insert(1, str(ROOT / "bench"))  # the city day's fleet (collector imported above)

from benchkit import drop_database, load_average, scratch_database  # noqa: E402
from cityday import DAY, payload, provision_fleet  # noqa: E402

# a table after these words (not a column inside a function call, as extract(.. FROM x))
_TABLE = re.compile(
    r"\b(?:INTO|UPDATE|FROM|COPY)\s+(?:ONLY\s+)?([a-z_][a-z0-9_.]*)(?![a-z0-9_.]*\))", re.I
)
_WRITE = re.compile(r"\b(?:INSERT\s+INTO|UPDATE)\s+([a-z_][a-z0-9_.]*)", re.I)


def step_name(sql: str) -> str:
    """A statement's step: its verb and the table it writes, else the first it reads
    (transaction control and a table-less SELECT as they are)."""
    verb = sql.lstrip().split(None, 1)[0].upper().rstrip(";") if sql.strip() else "?"
    if verb in ("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE"):
        return verb
    found = _WRITE.search(sql) or _TABLE.search(sql)
    return f"{verb} {found.group(1)}" if found else f"{verb} (no table) {sql.strip()[:30]}"


class Clocked(asyncpg.Connection):  # type: ignore[misc]  # asyncpg's base is untyped here
    """A connection that charges each statement's CPU (its backend's and ours) to a step."""

    pg_ns: defaultdict[str, int]
    py_s: defaultdict[str, float]
    calls: defaultdict[str, int]

    def clock(self) -> None:
        """Start charging (after the pool's own setup statements)."""
        self.pg_ns, self.py_s, self.calls = defaultdict(int), defaultdict(float), defaultdict(int)
        self._stat = f"/proc/{self.get_server_pid()}/schedstat"

    def _ns(self) -> int:
        with open(self._stat) as f:
            return int(f.read().split()[0])

    async def _charged(self, name: str, call: Any) -> Any:
        if not hasattr(self, "pg_ns"):
            return await call
        pg0, py0 = self._ns(), time.process_time()
        try:
            return await call
        finally:
            self.py_s[name] += time.process_time() - py0
            self.pg_ns[name] += self._ns() - pg0
            self.calls[name] += 1

    async def execute(self, query: str, *args: Any, **kw: Any) -> Any:
        return await self._charged(step_name(query), super().execute(query, *args, **kw))

    async def fetch(self, query: str, *args: Any, **kw: Any) -> Any:
        return await self._charged(step_name(query), super().fetch(query, *args, **kw))

    async def fetchrow(self, query: str, *args: Any, **kw: Any) -> Any:
        return await self._charged(step_name(query), super().fetchrow(query, *args, **kw))

    async def fetchval(self, query: str, *args: Any, **kw: Any) -> Any:
        return await self._charged(step_name(query), super().fetchval(query, *args, **kw))

    async def executemany(self, query: str, *args: Any, **kw: Any) -> Any:
        return await self._charged(step_name(query), super().executemany(query, *args, **kw))

    async def copy_records_to_table(self, table: str, **kw: Any) -> Any:
        call = super().copy_records_to_table(table, **kw)
        return await self._charged(f"COPY {table}", call)

    async def copy_to_table(self, table: str, **kw: Any) -> Any:
        return await self._charged(f"COPY {table}", super().copy_to_table(table, **kw))

    async def copy_from_query(self, query: str, *args: Any, **kw: Any) -> Any:
        call = super().copy_from_query(query, *args, **kw)
        return await self._charged(f"COPY FROM {step_name(query)}", call)


async def main(args: argparse.Namespace) -> None:
    server_url = os.environ["NBMETER_DATABASE_URL"]
    rng = random.Random(args.seed)
    print(f"# load_average={load_average()} meters={args.meters} batch={args.batch}", flush=True)
    name, db_url = await scratch_database(server_url)
    try:
        key_text = credentials.new_key()
        key = credentials.parse_key(key_text)
        _, _, meters = await provision_fleet(db_url, args.meters, key, rng)
        day_s = int(time.time()) // DAY * DAY - 2 * DAY
        frames = [payload(m, day_s, rng) for m in meters]
        readings = sum(n for _, n in frames)
        order = list(range(len(meters)))
        rng.shuffle(order)
        pool = await asyncpg.create_pool(  # as the collector's: no reset per release
            db_url, min_size=1, max_size=1, connection_class=Clocked, reset=keep_session
        )
        try:
            store = BatchStore(pool, MeterKeys(key))
            async with pool.acquire() as conn:
                conn.clock()
                clocked: Clocked = conn._con  # the pool's proxy holds the connection
            t0 = time.monotonic()
            done = 0
            for start in range(0, len(order), args.batch):
                part = order[start : start + args.batch]
                async with pool.acquire() as conn:
                    kids = [meters[i].kid for i in part]
                    found, _ = await credentials.load_oscore_many(conn, key, kids)
                batch = []
                for i in part:
                    m = meters[i]
                    secret = found[m.kid]
                    device = Device(
                        secret.meter_id,
                        secret.tenant_id,
                        secret.address,
                        secret.meter_format,
                        secret.installed_s,
                    )
                    frame = frames[i][0]
                    window = (secret.meter_id, 1, 1, 1, m.kid)  # its partial IV 1 admitted
                    batch.append(
                        Uplink(
                            frame,
                            Transport.COAP_OSCORE,
                            "[::1]:5683",
                            device=device,
                            replay_window=window,
                        )
                    )
                outcomes = await store.commit(batch)
                assert {o.status for o in outcomes} == {"stored"}, {o.status for o in outcomes}
                done += len(batch)
                if done % (args.batch * 40) == 0 or done == len(order):
                    print(
                        f"# {done}/{len(order)} uplinks, {time.monotonic() - t0:.0f} s", flush=True
                    )
            if args.explain:  # the context lookup's plan, for a batch of kids of this fleet
                kids = [meters[i].kid for i in order[: args.batch]]
                async with pool.acquire() as conn:
                    plan = await conn.fetch(
                        "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + credentials.LOAD_OSCORE_SQL,
                        pgarrays.byteas(kids),
                    )
                print("\n".join(f"# {r[0][:160]}" for r in plan))
        finally:
            await pool.close()
        n = len(order)
        print(f"uplinks={n} readings={readings} ({readings / n:.2f} per uplink)")
        print(f"{'step':<34} {'pg_us/uplink':>12} {'ours_us/uplink':>14} {'per_batch':>9}")
        batches = -(-n // args.batch)
        for name in [s for s in clocked.pg_ns if s.startswith("EXPLAIN")]:  # not a step
            del clocked.pg_ns[name], clocked.py_s[name], clocked.calls[name]
        for step in sorted(clocked.pg_ns, key=lambda s: -clocked.pg_ns[s]):
            print(
                f"{step:<34} {clocked.pg_ns[step] / 1e3 / n:12.1f}"
                f" {clocked.py_s[step] * 1e6 / n:14.1f} {clocked.calls[step] / batches:9.1f}"
            )
        pg = sum(clocked.pg_ns.values()) / 1e3 / n
        ours = sum(clocked.py_s.values()) * 1e6 / n
        print(f"{'total':<34} {pg:12.1f} {ours:14.1f}")
        print(f"pg_us_per_uplink={pg:.1f}")
    finally:
        await drop_database(server_url, name)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--meters", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=500, help="uplinks per committed batch")
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--explain", action="store_true", help="print the context lookup's plan")
    asyncio.run(main(parser.parse_args()))
