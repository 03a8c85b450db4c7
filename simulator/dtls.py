"""Simulated DTLS-PSK meters: each keeps one DTLS session open to the collector's coaps://.

An NB-IoT module with DTLS handshakes once and keeps the session across its reports (a
new handshake costs airtime and battery). `DtlsDevices.post(address, (identity, psk),
payload)` sends one CON POST to /u over that device's session (aiocoap's tinydtls client
transport, the `dtls` extra), opening the session on first use, and returns the same
`CoapResult` the plain CoAP endpoint does. A failed handshake or an unanswered request is
`answered=False` (a timeout to the meter).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiocoap

from simulator.coap import CoapResult


class DtlsDevices:
    """One aiocoap client context (one DTLS session) per simulated DTLS meter."""

    def __init__(self, host: str, port: int, timeout_s: float = 30.0) -> None:
        self.uri = f"coaps://{host}:{port}/u"
        self._patterns = (
            [f"coaps://{host}:{port}/*", f"coaps://{host}/*"]
            if port == 5684
            else [f"coaps://{host}:{port}/*"]
        )
        self.timeout_s = timeout_s
        self._contexts: dict[str, Any] = {}

    async def _context(self, address: str, identity: str, psk: str) -> Any:
        ctx = self._contexts.get(address)
        if ctx is None:
            ctx = await aiocoap.Context.create_client_context(transports=["tinydtls"])
            dtls = {"dtls": {"psk": {"ascii": psk}, "client-identity": {"ascii": identity}}}
            # aiocoap matches credentials on the request's URI as it renders it, which drops
            # the default port (5684, as `make demo` uses): register both spellings
            ctx.client_credentials.load_from_dict({pattern: dtls for pattern in self._patterns})
            self._contexts[address] = ctx
        return ctx

    async def post(self, address: str, cred: tuple[str, str], payload: bytes) -> CoapResult:
        """POST `payload` over `address`'s session; the collector's answer."""
        ctx = await self._context(address, *cred)
        request = aiocoap.Message(code=aiocoap.POST, uri=self.uri, payload=payload)
        try:
            reply = await asyncio.wait_for(ctx.request(request).response, self.timeout_s)
        except (aiocoap.error.Error, TimeoutError, OSError):
            # the session is gone (handshake refused, collector restarted): start afresh
            self._contexts.pop(address, None)
            with contextlib.suppress(Exception):
                await ctx.shutdown()
            return CoapResult("", b"", 1, False)
        code = f"{int(reply.code) >> 5}.{int(reply.code) & 0x1F:02d}"
        return CoapResult(code, bytes(reply.payload), 1, True, reply.opt.max_age)

    async def close(self) -> None:
        """End every session."""
        for ctx in self._contexts.values():
            with contextlib.suppress(Exception):
                await ctx.shutdown()
        self._contexts.clear()
