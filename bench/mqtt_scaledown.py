"""MQTT scale-down and crashes under a steady stream: is every accepted uplink stored, and when?

    python bench/mqtt_scaledown.py [--rate 300] [--seconds 24] [--will-delay 5]

Needs NBMETER_DATABASE_URL (a TimescaleDB server; a scratch database is created and
dropped) and the mosquitto binary (a private broker on free loopback ports is started
from the project's template). Three collector processes share the group; one device
publishes QoS 1 uplinks at `--rate` for `--seconds`. A quarter in, one collector gets
SIGTERM; half-way, another is killed with -9; at three quarters a new one joins. Prints
what the broker accepted, what was stored, the seconds from the last publish until all
were stored, the graceful stop's duration, and how long after the kill the survivor had
taken the killed collector's session over (and how many uplinks were waiting in it).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import secrets
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests", ROOT / "tests/collector"):
    sys.path.insert(0, str(path))

from brokerkit import free_port, start_broker  # noqa: E402
from collector_testkit import cjt188_frame, hour  # noqa: E402
from mqtt_testkit import CollectorProcess, Streamer  # noqa: E402

from devices.broker import prepare_broker_files  # noqa: E402
from devices.provision import provision_device  # noqa: E402
from storage.credentials import new_key  # noqa: E402
from storage.migrate import migrate  # noqa: E402


def _iso(record: dict[str, object]) -> float:
    return dt.datetime.fromisoformat(str(record["timestamp"])).timestamp()


async def main(args: argparse.Namespace) -> None:
    """Run the scenario on a scratch database and a private broker; print the figures."""
    server = os.environ["NBMETER_DATABASE_URL"]
    name = f"nbmeter_bench_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(server)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    db_url = urlunsplit(urlsplit(server)._replace(path=f"/{name}"))
    work = Path(tempfile.mkdtemp(prefix="nbmeter-mqtt-bench-"))
    broker = None
    procs: list[CollectorProcess] = []
    try:
        await migrate(db_url)
        port = free_port()
        env = prepare_broker_files(work, port)
        broker = start_broker(work, port)
        pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
        slug = f"bench-{uuid.uuid4().hex[:8]}"
        await pool.execute("INSERT INTO tenants (slug, name) VALUES ($1, $1)", slug)
        key = new_key()
        device = await provision_device(
            db_url,
            slug,
            f"{uuid.uuid4().int % 10**14:014d}",
            credentials_key=key,
            mqtt_admin_url=env["NBMETER_MQTT_ADMIN_URL"],
        )
        group = f"bench-{uuid.uuid4().hex[:6]}"

        def collector(n: int) -> CollectorProcess:
            c = CollectorProcess(
                work,
                db_url=db_url,
                mqtt_url=env["NBMETER_MQTT_URL"],
                key=key,
                client_id=f"c{n}-{group}",
                group=group,
                will_delay_s=args.will_delay,
            )
            procs.append(c)
            return c

        first = [collector(n) for n in range(3)]
        for c in first:
            c.wait_log("broker.connected", client_id=c.client_id, role="member")
        total = int(args.rate * args.seconds)
        frames = [cjt188_frame(device.address, 1_000 * (h + 1), hour(h)) for h in range(total)]
        streamer = Streamer(env["NBMETER_MQTT_URL"], port, device.mqtt, frames)
        streamer.start(args.rate)
        streamer.wait_sent(total // 4, within_s=args.seconds * 2)
        t0 = time.monotonic()
        rc = first[0].terminate()
        stop_s = time.monotonic() - t0
        streamer.wait_sent(total // 2, within_s=args.seconds * 2)
        first[1].kill()
        killed_at = time.time()
        streamer.wait_sent(3 * total // 4, within_s=args.seconds * 2)
        collector(3).wait_log("broker.connected", role="member")
        codes = streamer.finish(within_s=args.seconds * 2)
        last = time.monotonic()
        accepted = sum(1 for code in codes if code == 0)
        sql = "SELECT count(*) FROM readings WHERE meter_id = $1"
        stored = 0
        while time.monotonic() - last < args.will_delay + 60:
            stored = int(await pool.fetchval(sql, device.meter_id))
            if stored >= accepted:
                break
            await asyncio.sleep(0.05)
        settle_s = time.monotonic() - last
        adopted = [
            r
            for c in procs
            for r in c.events("broker.session_adopted")
            if r.get("peer") == first[1].client_id
        ]
        await pool.close()
        print(f"load: {args.rate:.0f} uplinks/s for {args.seconds} s, 3 collectors, load average "
              f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")  # fmt: skip
        print(f"accepted_by_broker={accepted} stored={stored} missing={accepted - stored}")
        print(f"all_stored_after_last_publish_s={settle_s:.2f}")
        print(f"graceful_stop_s={stop_s:.2f} exit_code={rc} "
              f"session_ended={bool(first[0].events('broker.session_ended'))}")  # fmt: skip
        if adopted:
            lag = _iso(adopted[0]) - killed_at
            print(f"kill9_taken_over_after_s={lag:.2f} (will delay {args.will_delay} s) "
                  f"waiting_in_session={adopted[0]['messages']}")  # fmt: skip
        else:
            print("kill9_taken_over_after_s=never")
    finally:
        for c in procs:
            c.close()
        if broker is not None:
            broker.terminate()
            broker.wait(10)
        admin = await asyncpg.connect(server)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=300.0)
    parser.add_argument("--seconds", type=float, default=24.0)
    parser.add_argument("--will-delay", type=int, default=5)
    asyncio.run(main(parser.parse_args()))
