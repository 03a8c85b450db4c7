"""`nbmeter quarantine list|show|redecode`: the same rows and queue as the API, from a terminal."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from datetime import UTC, datetime

import asyncpg

from storage.archive import ArchiveWriter
from storage.rows import QuarantineRow


async def nbmeter(db_url: str, *args: str) -> tuple[int, str, str]:
    """Run `nbmeter ARGS` on the session database; (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nbmeter.cli", *args,
        env={**os.environ, "NBMETER_DATABASE_URL": db_url},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_list_show_and_redecode(db_url: str, pool: asyncpg.Pool, make_tenant) -> None:
    """list prints the tenant's rows, show the payload as hex, redecode queues a job once."""
    a = await make_tenant()
    slug = await pool.fetchval("SELECT slug FROM tenants WHERE tenant_id = $1", a.tenant_id)
    at = datetime(2025, 4, 1, tzinfo=UTC)
    await ArchiveWriter(pool).write_quarantine(
        [
            QuarantineRow(
                at, a.tenant_id, None, 1, "[::1]:9", "undecodable", "no_key: k", b"\x01\x02"
            )
        ]
    )
    qid = await pool.fetchval(
        "SELECT quarantine_id FROM quarantine WHERE tenant_id = $1", a.tenant_id
    )
    code, out, _ = await nbmeter(
        db_url, "quarantine", "list", "--tenant", slug, "--error", "no_key"
    )
    assert code == 0
    assert out.split("\t")[0] == str(qid)
    code, out, _ = await nbmeter(db_url, "quarantine", "show", str(qid), "--tenant", slug)
    assert (code, json.loads(out)["payload"]) == (0, "0102")
    code, out, _ = await nbmeter(db_url, "quarantine", "redecode", str(qid), "--tenant", slug)
    job = json.loads(out)
    assert (code, job["state"], job["n_items"]) == (0, "queued", 1)
    assert job["requested_by"].startswith("cli:")
    code, out, _ = await nbmeter(db_url, "quarantine", "redecode", str(qid), "--tenant", slug)
    assert json.loads(out)["job_id"] == job["job_id"]
    code, _, err = await nbmeter(db_url, "quarantine", "list", "--tenant", "no-such-tenant")
    assert code == 1
    assert "no tenant 'no-such-tenant'" in err
