"""API keys expire and are revoked at once, in every API process, despite the key cache.

The processes here cache verified keys for 600 s: only the expiry check on each request
and the NOTIFY listener can explain a 401 that comes sooner.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest
from brokerkit import free_port

from api.app import create_app
from api.settings import ApiSettings
from storage.apikeys import create_api_key, create_tenant, listen_key_changes

CACHE_TTL_S = 600
# the README's bound: a revocation is refused by every process within this (listener up)
REVOKE_BOUND_S = 1.0
# listener lost: re-checked after key_cache_fallback_ttl_s (1 s) once the loss is seen
FALLBACK_BOUND_S = 3.0


def bearer(key: str) -> dict[str, str]:
    """Authorization header for `key`."""
    return {"Authorization": f"Bearer {key}"}


async def _tenant(pool: asyncpg.Pool, n_keys: int = 1, **key_args) -> tuple[int, list[str]]:
    async with pool.acquire() as conn:
        tenant_id = await create_tenant(conn, f"k-{uuid.uuid4().hex[:12]}", "keys")
        keys = [await create_api_key(conn, tenant_id, ["admin"], **key_args) for _ in range(n_keys)]
    return tenant_id, keys


@pytest.fixture
async def cached_api(db_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client of an in-process app caching keys for 600 s (lifespan entered)."""
    app = create_app(ApiSettings(database_url=db_url, key_cache_ttl_s=CACHE_TTL_S))
    async with app.router.lifespan_context(app):
        for _ in range(200):  # the listener connects in the background
            if app.state.key_cache.listening:
                break
            await asyncio.sleep(0.02)
        assert app.state.key_cache.listening
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            yield client


async def test_an_expired_key_is_401_saying_it_expired_even_when_cached(cached_api, pool):
    """A cached key stops working at its expiry instant: 401 problem type key-expired."""
    expires = datetime.now(UTC) + timedelta(seconds=1.5)
    _, (key,) = await _tenant(pool, expires_at=expires)
    assert (await cached_api.get("/v1/meters", headers=bearer(key))).status_code == 200
    await asyncio.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 0.05)
    r = await cached_api.get("/v1/meters", headers=bearer(key))
    assert r.status_code == 401, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.headers["www-authenticate"].startswith("Bearer")
    body = r.json()
    assert body["type"] == "/problems/key-expired"
    assert "expired" in body["detail"]
    assert expires.isoformat()[:19] in body["detail"]


async def test_a_revoked_key_says_revoked_and_a_wrong_secret_says_nothing(api, pool):
    """A revoked key's 401 says revoked; the same id with a wrong secret is a plain 401."""
    _, (key,) = await _tenant(pool)
    key_id = key.split("_")[1]
    await pool.execute("UPDATE api_keys SET revoked_at = now() WHERE key_id = $1", key_id)
    r = await api.get("/v1/meters", headers=bearer(key))
    assert r.json()["type"] == "/problems/key-revoked"
    forged = f"nbm_{key_id}_{'A' * 43}"
    r = await api.get("/v1/meters", headers=bearer(forged))
    assert r.status_code == 401
    assert r.json()["type"] == "/problems/unauthorized"


async def test_keys_created_with_an_expiry_through_the_api(api, pool):
    """POST /v1/api-keys takes expires_at (future only) and lists it back."""
    _, (admin,) = await _tenant(pool)
    until = (datetime.now(UTC) + timedelta(days=90)).replace(microsecond=0)
    r = await api.post(
        "/v1/api-keys",
        headers=bearer(admin),
        json={"scopes": ["readings:read"], "expires_at": until.isoformat()},
    )
    assert r.status_code == 201, r.text
    assert datetime.fromisoformat(r.json()["expires_at"]) == until
    listed = {k["key_id"]: k for k in (await api.get("/v1/api-keys", headers=bearer(admin))).json()}
    assert datetime.fromisoformat(listed[r.json()["key_id"]]["expires_at"]) == until
    assert listed[admin.split("_")[1]]["expires_at"] is None
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    for when in (past, "9999-01-01T00:00:00Z", "2030-01-01T00:00:00"):
        r = await api.post(
            "/v1/api-keys", headers=bearer(admin), json={"scopes": ["admin"], "expires_at": when}
        )
        assert r.status_code == 422, (when, r.text)


def _cli(db_url: str, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NBMETER_DATABASE_URL": db_url}
    return subprocess.run(
        [sys.executable, "-m", "nbmeter.cli", "tenant", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_cli_creates_expiring_keys_lists_and_revokes(db_url, pool):
    """`nbmeter tenant key create --expires-in 90d`, `key list`, `key revoke` on the stack."""
    slug = f"cli-{uuid.uuid4().hex[:10]}"
    made = await asyncio.to_thread(_cli, db_url, "create", slug, "--key-expires-in", "90d")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    row = await pool.fetchrow(
        "SELECT expires_at - created_at AS life FROM api_keys WHERE key_id = $1", key.split("_")[1]
    )
    assert abs(row["life"] - timedelta(days=90)) < timedelta(minutes=1)
    made = await asyncio.to_thread(
        _cli, db_url, "key", "create", slug, "--scope", "readings:read", "--expires-in", "12h"
    )
    assert made.returncode == 0, made.stderr
    key_id = made.stdout.strip().split("_")[1]
    listed = await asyncio.to_thread(_cli, db_url, "key", "list", slug)
    assert key_id in listed.stdout
    assert "readings:read" in listed.stdout
    assert "expires" in listed.stdout
    revoked = await asyncio.to_thread(_cli, db_url, "key", "revoke", slug, key_id)
    assert revoked.returncode == 0, revoked.stderr
    assert await pool.fetchval(
        "SELECT revoked_at IS NOT NULL FROM api_keys WHERE key_id = $1", key_id
    )
    again = await asyncio.to_thread(_cli, db_url, "key", "revoke", slug, key_id)
    assert again.returncode == 1
    assert "no live API key" in again.stderr
    bad = await asyncio.to_thread(_cli, db_url, "key", "create", slug, "--expires-in", "soon")
    assert bad.returncode == 2
    assert "not a duration" in bad.stderr


@pytest.fixture(scope="module")
def api_processes(db_url: str) -> Iterator[list[str]]:
    """Two `nbmeter api` processes on the session database, caching keys for 600 s."""
    env = {
        **os.environ,
        "NBMETER_DATABASE_URL": db_url,
        "NBMETER_KEY_CACHE_TTL_S": str(CACHE_TTL_S),
    }
    urls, procs = [], []
    for _ in range(2):
        port = free_port()
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "nbmeter.cli",
                    "api",
                    "--port",
                    str(port),
                    "--log-level",
                    "warning",
                ],
                env=env,
            )
        )
        urls.append(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 60
        for url in urls:
            while True:
                try:
                    if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, f"{url} did not start"
                time.sleep(0.1)
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(20)


async def _wait_listening(urls: list[str]) -> None:
    """Until every process says (in /metrics) that its key listener is connected."""
    deadline = time.monotonic() + 15
    async with httpx.AsyncClient(timeout=5) as client:
        for url in urls:
            while (
                "nbmeter_api_key_listener_up 1.0" not in (await client.get(f"{url}/metrics")).text
            ):
                assert time.monotonic() < deadline, f"the key listener of {url} did not connect"
                await asyncio.sleep(0.05)


async def _warm(clients: list[httpx.AsyncClient], key: str) -> None:
    for client in clients:
        for _ in range(3):
            assert (await client.get("/v1/meters", headers=bearer(key))).status_code == 200


async def _until_refused(clients: list[httpx.AsyncClient], key: str, bound_s: float) -> float:
    """Seconds until every process answers 401 for `key` (polling every 5 ms)."""
    started = time.perf_counter()
    pending = set(range(len(clients)))
    while pending:
        for i in list(pending):
            r = await clients[i].get("/v1/meters", headers=bearer(key))
            if r.status_code == 401:
                assert r.json()["type"] == "/problems/key-revoked"
                pending.discard(i)
        elapsed = time.perf_counter() - started
        assert elapsed < bound_s * 3, f"still accepted after {elapsed:.3f} s by {pending}"
        await asyncio.sleep(0.005)
    return time.perf_counter() - started


async def test_revocation_reaches_every_process_within_the_bound(api_processes, pool, db_url):
    """Revoked by SQL, by the CLI or through one process: every process refuses it < 1 s."""
    await _wait_listening(api_processes)
    _, keys = await _tenant(pool, n_keys=4)
    admin = keys[3]
    clients = [httpx.AsyncClient(base_url=url, timeout=10) for url in api_processes]
    delays = {}
    try:
        for key in keys[:3]:
            await _warm(clients, key)
        key_id = keys[0].split("_")[1]
        await pool.execute("UPDATE api_keys SET revoked_at = now() WHERE key_id = $1", key_id)
        delays["sql"] = await _until_refused(clients, keys[0], REVOKE_BOUND_S)

        slug = await pool.fetchval(
            "SELECT slug FROM tenants JOIN api_keys USING (tenant_id) WHERE key_id = $1", key_id
        )
        done = await asyncio.to_thread(_cli, db_url, "key", "revoke", slug, keys[1].split("_")[1])
        assert done.returncode == 0, done.stderr
        delays["cli"] = await _until_refused(clients, keys[1], REVOKE_BOUND_S)

        r = await clients[0].delete(f"/v1/api-keys/{keys[2].split('_')[1]}", headers=bearer(admin))
        assert r.status_code == 204
        delays["api"] = await _until_refused(clients[1:], keys[2], REVOKE_BOUND_S)
    finally:
        for client in clients:
            await client.aclose()
    print(f"revocation to 401 in every process: {delays}")
    assert all(d < REVOKE_BOUND_S for d in delays.values()), delays


async def test_a_lost_listener_empties_the_cache_and_reconnects(api_processes, pool):
    """Listeners killed: keys are re-checked within the fallback bound; they come back."""
    await _wait_listening(api_processes)
    _, keys = await _tenant(pool, n_keys=2)
    clients = [httpx.AsyncClient(base_url=url, timeout=10) for url in api_processes]
    try:
        for key in keys:
            await _warm(clients, key)
        killed = await pool.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = 'nbmeter-api-keys'"
        )
        assert killed >= 2  # these two processes' (and this session's in-process app's)
        # revoked while nobody listens: the notification is lost
        await pool.execute(
            "UPDATE api_keys SET revoked_at = now() WHERE key_id = $1", keys[0].split("_")[1]
        )
        lost = await _until_refused(clients, keys[0], FALLBACK_BOUND_S)
        assert lost < FALLBACK_BOUND_S
        await _wait_listening(api_processes)
        await _warm(clients, keys[1])
        await pool.execute(
            "UPDATE api_keys SET revoked_at = now() WHERE key_id = $1", keys[1].split("_")[1]
        )
        back = await _until_refused(clients, keys[1], REVOKE_BOUND_S)
    finally:
        for client in clients:
            await client.aclose()
    print(f"listener lost: refused after {lost:.3f} s; back: {back:.3f} s")
    assert back < REVOKE_BOUND_S


class StallingProxy:
    """A loopback TCP relay to PostgreSQL that can stall: bytes stop, nothing is closed
    (what a dead peer or a cut cable looks like to the client)."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Listen on a free loopback port."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await self.flowing.wait()
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        for task in (self._pipe(reader, up_writer), self._pipe(up_reader, writer)):
            t = asyncio.create_task(task)
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Stop listening and drop every relay."""
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()


async def test_a_silently_dead_listener_is_noticed_within_two_checks(db_url):
    """The listener's connection stalls (no FIN): reported lost within 2 x check interval."""
    parts = urlsplit(db_url)
    proxy = StallingProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    await proxy.start()
    netloc = f"{parts.username}:{parts.password}@127.0.0.1:{proxy.port}"
    states: list[tuple[float, bool]] = []
    listening = asyncio.Event()

    def on_state(up: bool, _why: str | None) -> None:
        states.append((time.perf_counter(), up))
        if up:
            listening.set()

    check_s = 0.5
    task = asyncio.create_task(
        listen_key_changes(
            urlunsplit(parts._replace(netloc=netloc)),
            lambda _key_id: None,
            on_state,
            check_every_s=check_s,
            retry_s=0.2,
        )
    )
    try:
        await asyncio.wait_for(listening.wait(), 15)
        await asyncio.sleep(check_s * 1.5)  # a few healthy checks first
        assert all(up for _, up in states)
        proxy.flowing.clear()
        stalled = time.perf_counter()
        while not any(not up for at, up in states if at > stalled):
            assert time.perf_counter() - stalled < check_s * 4, "stall not noticed"
            await asyncio.sleep(0.01)
        noticed = next(at for at, up in states if at > stalled and not up) - stalled
        proxy.flowing.set()
        while not states[-1][1]:  # reconnects once bytes flow again
            assert time.perf_counter() - stalled < 15, "did not reconnect"
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await proxy.close()
    print(f"silent loss noticed after {noticed:.3f} s (check every {check_s} s)")
    assert noticed <= 2 * check_s + 0.2
