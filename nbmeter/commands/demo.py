"""`nbmeter demo`: the whole system with a demo fleet, then the bills checked against truth.

Starts the collector (CoAP + MQTT, coaps with the `dtls` extra, the platform push endpoint)
and the billing API as background processes, creates a fresh demo tenant with an admin API
key, runs the simulator's fleet (1,000 meters over one billing cycle, every fault class on;
a tenth on DTLS-PSK and a tenth behind an emulated OneNET platform; `DISTRICTS` district
metered areas, each adding its bulk meter to the fleet, some with a pipe leak) through the real
transports (queueing commands on the way: valves closed and opened again, clock sets,
reporting changes), then `sim verify` compares the API's billing-cycle reads with the
ground truth, plots one meter and ends with the command lifecycle table. The
collector and the API stay up afterwards so the printed curl works; `nbmeter demo --stop`
stops them. Exit status is verify's.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from nbmeter.commands.demo_ingest import run_ingest_demo
from nbmeter.stack.config import load_config

API_PORT = 8000
COAP_PORT = 5683
COAPS_PORT = 5684  # DTLS-PSK meters, when the `dtls` extra is installed
PUSH_PORT = 8443  # meters behind an emulated operator platform (OneNET push)
METRICS_PORT = 9464
SHARE = "0.1"  # of the fleet on DTLS-PSK, and again behind the platform
# districts of 6 customer meters; each appends a bulk meter to the fleet (1,000 -> 1,003
# metered points) and two of them a pipe leak (sim run's --pipe-leaks 0.5), which sim
# verify's alarm table must show alarmed (district_loss); no command goes to their meters
DISTRICTS = "3"


def _say(message: str) -> None:
    print(f"demo: {message}", file=sys.stderr, flush=True)


def _state_dir() -> Path:
    path = load_config().home / "demo"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _free(port: int, kind: int = socket.SOCK_STREAM) -> bool:
    with socket.socket(socket.AF_INET, kind) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def stop_services() -> list[str]:
    """Stop the collector and API a previous demo left running; name what was stopped."""
    stopped = []
    for name in ("collector", "api"):
        pid_file = _state_dir() / f"{name}.pid"
        try:
            pid = int(pid_file.read_text(encoding="utf-8"))
            os.kill(pid, signal.SIGTERM)
        except (OSError, ValueError):
            continue
        finally:
            pid_file.unlink(missing_ok=True)
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except OSError:
                break
            time.sleep(0.1)
        stopped.append(name)
    return stopped


def _start(name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    log = _state_dir() / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nbmeter.cli", *argv],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    (_state_dir() / f"{name}.pid").write_text(str(proc.pid), encoding="utf-8")
    return proc


def _wait_port(port: int, proc: subprocess.Popen[bytes], name: str, *, udp: bool = False) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log = _state_dir() / f"{name}.log"
            msg = f"the {name} exited with {proc.returncode}; see {log}"
            raise SystemExit(f"nbmeter demo: {msg}")
        if udp:
            if not _free(port, socket.SOCK_DGRAM):
                return
        else:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    return
        time.sleep(0.2)
    msg = f"the {name} did not open port {port} within 60 s; see {_state_dir() / name}.log"
    raise SystemExit(f"nbmeter demo: {msg}")


async def _tenant(dsn: str, slug: str) -> str:
    from nbmeter.commands.tenant import create

    # UTC, like the simulator's clock: its consumption profile (night lows, morning peaks)
    # runs in UTC hours, so a tenant in another zone would see the simulated evening peak
    # in its local night window and the night-flow analytics would alarm on it
    _, key = await create(dsn, slug, "Demo water & gas utility", "UTC")
    return key


def _sim(argv: list[str], env: dict[str, str]) -> int:
    return subprocess.call([sys.executable, "-m", "nbmeter.cli", "sim", *argv], env=env)


def _example_read(api_url: str, api_key: str) -> str | None:
    """A real `/v1/meters/{id}/cycles/{cycle}` path of the demo tenant, if the API answers."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"}
    try:
        with httpx.Client(base_url=api_url, headers=headers, timeout=10) as client:
            meters = client.get("/v1/meters", params={"limit": 1}).json()
            cycles = client.get("/v1/cycles").json()
        meter_id = meters["items"][0]["meter_id"]
        closed = [c for c in cycles["cycles"] if c["end_date"] <= time.strftime("%Y-%m-%d")]
        cycle = (closed or cycles["cycles"])[-1]["cycle"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError):
        return None
    return f"/v1/meters/{meter_id}/cycles/{cycle}"


def _run(args: argparse.Namespace) -> int:
    """Run the whole-system demo (or the ingest-only one); return verify's exit status."""
    if args.ingest_only:
        return run_ingest_demo(args)
    if args.stop:
        print("stopped: " + (", ".join(stop_services()) or "nothing was running"))
        return 0
    stop_services()
    env = dict(os.environ)
    for var in ("NBMETER_DATABASE_URL", "NBMETER_MQTT_URL", "NBMETER_CREDENTIALS_KEY"):
        if not env.get(var):
            msg = f'{var} is not set: run `make demo`, or eval "$(nbmeter stack env)" first'
            raise SystemExit(f"nbmeter demo: {msg}")
    dtls = importlib.util.find_spec("DTLSSocket") is not None
    for port, kind, what in ((API_PORT, socket.SOCK_STREAM, "API"),
                             (COAP_PORT, socket.SOCK_DGRAM, "CoAP"),
                             (COAPS_PORT if dtls else 0, socket.SOCK_DGRAM, "coaps"),
                             (PUSH_PORT, socket.SOCK_STREAM, "platform push")):  # fmt: skip
        if port and not _free(port, kind):
            raise SystemExit(f"nbmeter demo: port {port} for the {what} is taken")
    slug = f"demo-{uuid.uuid4().hex[:6]}"
    api_key = asyncio.run(_tenant(env["NBMETER_DATABASE_URL"], slug))
    _say(f"tenant {slug} created (timezone UTC) with an admin API key")
    collector = _start(
        "collector",
        ["collector", "--coap-port", str(COAP_PORT), "--metrics-port", str(METRICS_PORT)],
        # a stable client id resumes its own persistent session on every demo run, and a
        # share group of its own keeps other collectors' stale sessions from taking a share
        {
            **env,
            "NBMETER_MQTT__CLIENT_ID": "nbmeter-demo-collector",
            "NBMETER_MQTT__SHARE_GROUP": "nbmeter-demo",
            "NBMETER_PLATFORM__PORT": str(PUSH_PORT),
            **({"NBMETER_DTLS__PORT": str(COAPS_PORT)} if dtls else {}),
        },
    )
    api = _start("api", ["api", "--host", "127.0.0.1", "--port", str(API_PORT)], env)
    _wait_port(COAP_PORT, collector, "collector", udp=True)
    _wait_port(API_PORT, api, "api")
    api_url = f"http://127.0.0.1:{API_PORT}"
    coaps = f", coaps udp/{COAPS_PORT}" if dtls else " (no coaps: the dtls extra is not installed)"
    _say(f"collector on udp/{COAP_PORT} + MQTT{coaps}, platform push tcp/{PUSH_PORT}")
    _say(f"API on {api_url}")
    run_dir = _state_dir() / slug
    common = ["--tenant", slug, "--api-url", api_url, "--api-key", api_key,
              "--coap-port", str(COAP_PORT), "--mqtt-url", env["NBMETER_MQTT_URL"],
              "--coaps-port", str(COAPS_PORT),
              "--platform-url", f"http://127.0.0.1:{PUSH_PORT}"]  # fmt: skip
    shares = ["--platform-share", SHARE, *(["--dtls-share", SHARE] if dtls else [])]
    sim_env = {**env, "NBMETER_API_KEY": api_key}
    started = time.monotonic()
    code = _sim(
        ["run", "--meters", str(args.meters), "--days", str(args.days), "--seed", "1",
         "--faults", "all", "--loss", "0.02", "--time-scale", "1", "--commands", "3",
         "--districts", DISTRICTS, "--run-dir", str(run_dir), *shares, *common],
        sim_env,
    )  # fmt: skip
    if code != 0:
        _say(f"sim run failed ({code}); collector log: {_state_dir() / 'collector.log'}")
        return code
    ran = time.monotonic()
    _say(f"sim run took {ran - started:.0f} s")
    plot = run_dir / "meter.png"
    code = _sim(["verify", "--run-dir", str(run_dir), "--plot", str(plot), *common], sim_env)
    _say(f"sim verify took {time.monotonic() - ran:.0f} s")
    print()
    auth = f"curl -H 'Authorization: Bearer {api_key}'"
    print(f"billing API      {api_url}   (OpenAPI: {api_url}/docs)")
    print(f"API key          {api_key}")
    print(f"meters           {auth} '{api_url}/v1/meters?limit=3'")
    print(f"billing cycles   {auth} '{api_url}/v1/cycles'")
    example = _example_read(api_url, api_key)
    if example:
        print(f"one cycle read   {auth} '{api_url}{example}'")
        cycle = example.rsplit("/", 1)[1]
        print(f"billing export   {auth} '{api_url}/v1/cycles/{cycle}/reads?format=csv'")
    print(f"metrics          http://127.0.0.1:{METRICS_PORT}/metrics   {api_url}/metrics")
    print(f"plot             {plot}")
    print(f"ground truth     {run_dir}")
    print("stop             .venv/bin/nbmeter demo --stop")
    return code


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `nbmeter demo` (and of its lesser `--ingest-only` form)."""
    parser.add_argument("--meters", type=int, default=1000, help="fleet size (default 1000)")
    parser.add_argument("--days", type=int, default=35, help="simulated days (default 35)")
    parser.add_argument("--hours", type=int, default=24, help="--ingest-only: hours of frames")
    parser.add_argument(
        "--ingest-only",
        action="store_true",
        help="only decode and store a generated batch in-process (no collector, API, sim)",
    )
    parser.add_argument(
        "--stop", action="store_true", help="stop the collector and API a demo left"
    )
    parser.set_defaults(func=_run)
