"""Interop: libcoap's command-line client (Debian package libcoap3-bin) against the collector."""

from __future__ import annotations

import asyncio
import shutil

import asyncpg
import pytest
from collector_testkit import cjt188_frame, hour
from conftest import RunningCollector, add_meter, count, new_address

CLIENT = shutil.which("coap-client-notls") or shutil.which("coap-client")


@pytest.mark.skipif(
    CLIENT is None, reason="coap-client-notls not installed (apt-get install libcoap3-bin)"
)
async def test_libcoap_client_gets_changed_after_storage(
    collector: RunningCollector, pool: asyncpg.Pool, lab_tenant: str, tmp_path: object
) -> None:
    """coap-client-notls POSTs a frame and gets 2.04 only once the reading is stored."""
    address = new_address()
    await add_meter(pool, lab_tenant, address)
    frame_file = tmp_path / "frame.bin"  # type: ignore[operator]
    frame_file.write_bytes(cjt188_frame(address, 120_000, hour(50)))
    uri = f"coap://127.0.0.1:{collector.coap_port}/u?t={lab_tenant}"
    proc = await asyncio.create_subprocess_exec(
        CLIENT,
        "-m",
        "post",
        "-f",
        str(frame_file),
        "-v",
        "7",
        "-B",
        "20",
        uri,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out.decode(errors="replace")
    assert b"c:2.04" in out, out.decode(errors="replace")
    assert (
        await count(
            pool,
            "SELECT count(*) FROM readings r JOIN meters m USING (meter_id) WHERE m.address = $1",
            address,
        )
        == 1
    )
