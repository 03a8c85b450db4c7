"""The OSCORE context loader's waiters (`collector.coap_oscore.DeviceContexts`): an
awaiting request's future and the uplink lane's callback both hear when a key id's
loading ends, a failed one included, and one failing callback does not cost the others
theirs. The database is real; its pool is closed to make the load fail."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from collector.coap_oscore import ContextsUnavailable, DeviceContexts
from collector.settings import CoapSettings

KID = b"\x01\x02"


async def test_every_waiter_hears_of_a_failed_load(db_url: str) -> None:
    """Callbacks run (the context then unknown to `peek`), the future fails with
    ContextsUnavailable, and a callback's own exception stops none of the others."""
    pool = await asyncpg.create_pool(db_url, min_size=0, max_size=1)
    await pool.close()  # every acquire now fails
    contexts = DeviceContexts(pool, bytes(32), CoapSettings())
    heard: list[object] = []

    def boom() -> None:
        raise RuntimeError("a bug in one waiter")

    assert contexts.when_loaded(KID, lambda: heard.append(contexts.peek(KID)))
    assert contexts.when_loaded(KID, boom)
    future = contexts.wanted(KID)
    assert future is not None
    assert contexts.when_loaded(KID, lambda: heard.append("last"))
    with pytest.raises(ContextsUnavailable):
        await asyncio.wait_for(future, 10)
    assert heard == [None, "last"]
    contexts.close()


async def test_without_a_credentials_key_nothing_waits(db_url: str) -> None:
    """No credentials key: no context can open, so nothing is queued (False, None)."""
    pool = await asyncpg.create_pool(db_url, min_size=0, max_size=1)
    try:
        contexts = DeviceContexts(pool, None, CoapSettings())
        assert not contexts.when_loaded(KID, lambda: None)
        assert contexts.wanted(KID) is None
        contexts.close()
    finally:
        await pool.close()
