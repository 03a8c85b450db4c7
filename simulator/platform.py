"""An operator IoT platform, emulated: uplinks in, signed (batched) HTTP pushes out.

A meter on an operator's platform never talks to the collector: the platform receives
its uplink and pushes it to the utility's endpoint in its own envelope, batching what
arrived together and retrying a push that was not answered 200 the way that platform
does. `PlatformEmulator.deliver(messages)` acts this out against a real collector and
returns what became of each message:

- `acked`: a 200 covered it (stored, or a duplicate of something stored);
- `refused: <code> <reason>`: a 4xx; the platform does not retry a refused push;
- `dropped: <status>`: the platform gave up after its retries (the data is lost to the
  utility, as in the field: the meter has handed it over and keeps no copy).

Retry behaviour, from each platform's push documentation (see `devices.platforms`):
OneNET retries a push answered other than 200; OceanConnect (IoTDA) discards a message
whose push failed and, after repeated failures, holds back later messages and retries
the endpoint every few minutes; here that is `RetryPolicy.attempts` pushes `backoff_s`
apart (scaled by `time_scale`), honouring Retry-After.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

from devices.platforms import oceanconnect_body, onenet_body


@dataclass(frozen=True)
class RetryPolicy:
    """How often, and how far apart, the platform pushes a message again."""

    attempts: int
    backoff_s: float


POLICIES = {
    "onenet": RetryPolicy(attempts=4, backoff_s=5.0),
    "oceanconnect": RetryPolicy(attempts=4, backoff_s=180.0),  # held back, every 3 min
}


@dataclass(frozen=True)
class Message:
    """One meter uplink as the platform received it."""

    device_id: str  # the platform's identity of the device (IMEI or device id)
    payload: bytes
    at_s: float  # when the platform received it


class PlatformEmulator:
    """Pushes messages to `base_url` (the collector's push endpoint) as `platform` does."""

    def __init__(
        self,
        platform: str,
        base_url: str,
        tenant: str,
        secret: str,
        *,
        batch_max: int = 10,
        time_scale: float = 1.0,
    ) -> None:
        if platform not in POLICIES:
            raise ValueError(f"no emulator for platform {platform!r}: {', '.join(POLICIES)}")
        self.platform, self.base_url, self.tenant = platform, base_url, tenant
        self.secret, self.batch_max, self.time_scale = secret, batch_max, time_scale
        self.policy = POLICIES[platform]
        self.pushes = 0  # HTTP requests made, retries included

    @property
    def path(self) -> str:
        """The callback URL path the tenant subscribed."""
        tail = f"/{self.secret}" if self.platform == "oceanconnect" else ""
        return f"/p/{self.tenant}/{self.platform}{tail}"

    def batches(self, messages: Sequence[Message]) -> list[list[Message]]:
        """How the platform groups messages into pushes (OceanConnect: one device each)."""
        if self.platform == "onenet":
            return [
                list(messages[i : i + self.batch_max])
                for i in range(0, len(messages), self.batch_max)
            ]
        by_device: dict[str, list[Message]] = {}
        for m in messages:
            by_device.setdefault(m.device_id, []).append(m)
        return [
            group[i : i + self.batch_max]
            for group in by_device.values()
            for i in range(0, len(group), self.batch_max)
        ]

    def body(self, batch: list[Message]) -> bytes:
        """The push body of `batch`, signed (OneNET) as the platform makes it."""
        if self.platform == "onenet":
            items: list[dict[str, object]] = [
                {
                    "type": 1,
                    "imei": m.device_id,
                    "ds_id": "3200_0_5505",
                    "at": int(m.at_s * 1000),
                    "value": m.payload.hex().upper(),
                }
                for m in batch
            ]
            return onenet_body(items, self.secret.encode(), uuid.uuid4().hex[:8])
        device = batch[0].device_id
        return oceanconnect_body(device, [(m.payload, m.at_s) for m in batch], uuid.uuid4().hex)

    async def deliver(self, messages: Sequence[Message]) -> list[str]:
        """Push every message (batched, retried per the policy); one result each."""
        results: dict[int, str] = {}
        index = {id(m): n for n, m in enumerate(messages)}
        async with httpx.AsyncClient(base_url=self.base_url, timeout=30) as client:
            for batch in self.batches(messages):
                outcome = await self._push(client, batch)
                for m in batch:
                    results[index[id(m)]] = outcome
        return [results[n] for n in range(len(messages))]

    async def send(self, message: Message) -> tuple[str, int]:
        """Push one message on its own: (result, HTTP requests it took)."""
        async with httpx.AsyncClient(base_url=self.base_url, timeout=30) as client:
            before = self.pushes
            outcome = await self._push(client, [message])
            return outcome, self.pushes - before

    async def _push(self, client: httpx.AsyncClient, batch: list[Message]) -> str:
        body = self.body(batch)  # a retry sends the same body (signature, nonce) again
        status, wait_s = 0, 0.0
        for attempt in range(self.policy.attempts):
            if attempt:
                await asyncio.sleep(wait_s * self.time_scale)
            self.pushes += 1
            started = time.monotonic()
            try:
                reply = await client.post(self.path, content=body)
            except httpx.HTTPError:
                status, wait_s = 0, self.policy.backoff_s
                continue
            status = reply.status_code
            if status == 200:
                return "acked"
            if 400 <= status < 500:
                detail = reply.json().get("error", "") if reply.content else ""
                return f"refused: {status} {detail}"
            retry_after = reply.headers.get("Retry-After", "")
            wait_s = float(retry_after) if retry_after.isdigit() else self.policy.backoff_s
            wait_s = max(0.0, wait_s - (time.monotonic() - started))
        return f"dropped: {status}"
