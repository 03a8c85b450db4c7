"""CoAP side of the mailbox: commands ride on the uplink's 2.04, answers come to POST /c.

Why piggy-backed on the answer, not a server-initiated request: an NB-IoT meter in PSM
is reachable only just after it transmits, and its own CON exchange is the one moment we
know it listens, from the address and port it used (NAT bindings on the operator's side
expire within seconds to minutes). The 2.04 reaches it in the same round trip, protected
by the same OSCORE exchange, with no request of ours to retransmit into a radio that may
already sleep. The answer is built only after the uplink's batch is durable, as before.

- `with_commands(message, device, downlinks)`: the 2.04 (or duplicate's 2.04) to an
  authenticated device gets the envelope of its pending commands as payload
  (content-format 50, application/json). Plain CoAP (lab tenants, not authenticated) and
  quarantined uplinks get none: a command goes only to the device that proved who it is.
- `ResultResource` (POST /c, OSCORE only): the device's answers. 2.04 when each named
  command was its own (recorded or a repeat), 4.04 naming the ids that were not (another
  meter's commands cannot be read or answered), 4.00 for a body that is not a result,
  4.01 without OSCORE, 5.03 when the database is away (send it again).
"""
# aiocoap is untyped (as in collector.coap)
# mypy: disable-error-code="no-untyped-call,misc,no-any-return"

from __future__ import annotations

from typing import Any

import aiocoap
from aiocoap import error, resource

from collector.coap_oscore import DeviceContext, storage_answers
from collector.downlink import Downlinks
from collector.uplink import Device

JSON_FORMAT = 50  # RFC 7252 §12.3: application/json


async def with_commands(
    message: aiocoap.Message, device: Device | None, downlinks: Downlinks | None
) -> aiocoap.Message:
    """`message` (the uplink's answer) with the device's pending commands, if any."""
    if downlinks is None or device is None or message.code != aiocoap.CHANGED:
        return message
    envelope = await downlinks.for_meter(device.meter_id)
    if envelope:
        message.payload = envelope
        message.opt.content_format = JSON_FORMAT
    return message


class ResultResource(resource.Resource):
    """POST /c: a device's answers to its commands (see the module docstring)."""

    def __init__(self, downlinks: Downlinks, busy_max_age_s: int) -> None:
        super().__init__()
        self._downlinks = downlinks
        self._busy_s = busy_max_age_s

    async def render_post(self, request: aiocoap.Message) -> Any:
        """Record the answers; 2.04, or 4.04 naming the command ids that are not ours."""
        ctx = getattr(request.remote, "security_context", None)
        if not isinstance(ctx, DeviceContext):
            raise error.Unauthorized("answers need OSCORE")
        device = ctx.device
        try:
            with storage_answers(self._busy_s):
                outcome = await self._downlinks.answer(
                    device.meter_id, device.address, bytes(request.payload)
                )
        except ValueError as exc:
            raise error.BadRequest(str(exc)[:200]) from None
        unknown = sorted(cid for cid, what in outcome.items() if what == "unknown")
        if unknown:
            text = "no such command of this meter: " + ",".join(map(str, unknown[:20]))
            return aiocoap.Message(code=aiocoap.NOT_FOUND, payload=text.encode())
        return aiocoap.Message(code=aiocoap.CHANGED)
