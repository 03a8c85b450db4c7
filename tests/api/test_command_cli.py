"""`nbmeter command send|bulk|list|show|cancel|job`: the mailbox from a terminal."""

from __future__ import annotations

import json

import asyncpg
from test_quarantine_cli import nbmeter


async def test_send_list_cancel_and_bulk(db_url: str, pool: asyncpg.Pool, make_tenant, add_meter):
    """send by address queues (the same --key twice: one command), list shows it, cancel
    ends it, bulk by query makes a job that `job` counts; bad input exits 1 saying why."""
    t = await make_tenant()
    slug = await pool.fetchval("SELECT slug FROM tenants WHERE tenant_id = $1", t.tenant_id)
    meter = await add_meter(t.tenant_id, address="CLI-1", kind="gas")
    base = ("command", "send", "--tenant", slug, "--address", "CLI-1", "--kind", "valve")
    code, out, err = await nbmeter(db_url, *base, "--arg", "action=close", "--key", "k1")
    assert code == 0, err
    cmd = json.loads(out)
    assert (cmd["meter_id"], cmd["state"], cmd["created_by"][:4]) == (meter, "queued", "cli:")
    code, again, _ = await nbmeter(db_url, *base, "--arg", "action=close", "--key", "k1")
    assert json.loads(again)["command_id"] == cmd["command_id"]
    code, out, _ = await nbmeter(db_url, "command", "list", "--tenant", slug, "--state", "queued")
    assert out.splitlines()[0].startswith(f"{cmd['command_id']}\tmeter={meter}\tvalve")
    code, out, _ = await nbmeter(
        db_url, "command", "cancel", str(cmd["command_id"]), "--tenant", slug
    )
    assert json.loads(out)["state"] == "cancelled"
    code, _, err = await nbmeter(db_url, *base, "--arg", "action=half")
    assert code == 1
    assert "action must be" in err
    code, out, err = await nbmeter(
        db_url, "command", "bulk", "--tenant", slug, "--kind", "clock", "--meter-kind", "gas"
    )
    assert code == 0, err
    job = json.loads(out)
    code, out, _ = await nbmeter(db_url, "command", "job", str(job["job_id"]), "--tenant", slug)
    assert json.loads(out)["counts"] == {"queued": 1}
