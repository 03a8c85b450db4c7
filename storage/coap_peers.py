"""Collector processes sharing a CoAP port: one row each, with a settings fingerprint.

Several collectors may bind one UDP port (SO_REUSEPORT); the kernel then spreads the
devices over them, so they must answer alike. `join(...)` records this process
(instance id, host, port, fingerprint of its CoAP-relevant settings) and returns the
other live processes on that host and port; it raises `PeerMismatchError`, naming the
settings that differ, when a live one has another fingerprint (and records nothing).
`heartbeat` keeps the row live (a row not seen for `live_s` is a dead process's, e.g.
after kill -9) and returns the live peers; `leave` deletes the row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import asyncpg

from storage.errors import StorageError


class PeerMismatchError(StorageError):
    """Another live process on this port runs with other settings (the message says which)."""


@dataclass(frozen=True, slots=True)
class Peer:
    """Another live collector process on the same host and CoAP port."""

    instance_id: str
    settings: dict[str, object]
    started_at: str


async def _live(
    conn: asyncpg.Connection, hostname: str, port: int, me: str, live_s: float
) -> list[Peer]:
    rows = await conn.fetch(
        "SELECT instance_id, settings, fingerprint, started_at FROM coap_listeners"
        " WHERE hostname = $1 AND port = $2 AND instance_id <> $3"
        " AND seen_at > now() - make_interval(secs => $4) ORDER BY started_at",
        hostname,
        port,
        me,
        live_s,
    )
    return [Peer(str(r[0]), json.loads(r[1]), r[3].isoformat()) for r in rows]


async def join(
    conn: asyncpg.Connection,
    *,
    instance_id: str,
    hostname: str,
    port: int,
    fingerprint: str,
    settings: dict[str, object],
    live_s: float,
) -> list[Peer]:
    """Record this process on (hostname, port); return the live peers (see module doc)."""
    async with conn.transaction():
        # one joiner at a time per port, so two differing processes cannot both get in
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1), $2)", hostname, port)
        peers = await _live(conn, hostname, port, instance_id, live_s)
        for peer in peers:
            differ = sorted(
                k
                for k in set(peer.settings) | set(settings)
                if peer.settings.get(k) != settings.get(k)
            )
            if differ:
                shown = ", ".join(
                    f"{k} (here {settings.get(k)!r}, there {peer.settings.get(k)!r})"
                    for k in differ
                )
                msg = (
                    f"another collector (instance {peer.instance_id}, started"
                    f" {peer.started_at}) serves CoAP on {hostname} port {port} with other"
                    f" settings: {shown}; give every process on the port the same settings,"
                    " or another port"
                )
                raise PeerMismatchError(msg)
        await conn.execute(
            "INSERT INTO coap_listeners (instance_id, hostname, port, fingerprint, settings)"
            " VALUES ($1, $2, $3, $4, $5::jsonb)",
            instance_id,
            hostname,
            port,
            fingerprint,
            json.dumps(settings, sort_keys=True),
        )
        # rows of processes dead for long (kill -9) are of no use to anyone
        await conn.execute("DELETE FROM coap_listeners WHERE seen_at < now() - interval '1 day'")
    return peers


async def heartbeat(
    conn: asyncpg.Connection, *, instance_id: str, hostname: str, port: int, live_s: float
) -> list[Peer]:
    """Mark this process live; return the other live processes on its port."""
    await conn.execute(
        "UPDATE coap_listeners SET seen_at = now() WHERE instance_id = $1", instance_id
    )
    return await _live(conn, hostname, port, instance_id, live_s)


async def leave(conn: asyncpg.Connection, instance_id: str) -> None:
    """Delete this process's row (a clean stop)."""
    await conn.execute("DELETE FROM coap_listeners WHERE instance_id = $1", instance_id)
