"""The billing API as the simulator sees it (HTTP, Bearer key), plus the provisioning adapter.

`Backend` wraps the `/v1` routes the simulator needs: bulk meter import, meter exchange,
the billing calendar, cycle reads (NDJSON export), a meter's cycle read with its alarms,
and meter lookup by address. Errors become `BackendError` with the API's problem detail.

ADAPTER (credentials): the API keeps only a reference to device credentials; the secrets
are made by `devices.provision.provision_device`. Until an HTTP route for that exists,
`provision_credentials` calls it in-process, which needs the database URL,
NBMETER_CREDENTIALS_KEY and the broker's admin URL. OMS meters' AES keys (from the truth
file) go the same way, stored sealed (`aes_key=`).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx

from billing import units
from simulator.coap import OscoreCredentials
from simulator.mqtt import MqttCredentials
from simulator.runner import DeviceCredentials

IMPORT_CHUNK = 5000


class BackendError(Exception):
    """The API refused a request or could not be reached; the message says which."""


def m3_text(ml: int, scale: int) -> str:
    """Exact decimal m3 text of `ml` with the register's decimals (scale -3: 3 places)."""
    return str(units.m3(ml, scale))


def ml_of(text: str | None) -> int | None:
    """Millilitres of an exact decimal m3 text; None stays None."""
    return None if text is None else units.ml(text)


def iso(epoch_s: int) -> str:
    """RFC 3339 UTC text of an epoch second."""
    return datetime.fromtimestamp(epoch_s, UTC).isoformat().replace("+00:00", "Z")


class Backend:
    """An authenticated client of the billing API."""

    def __init__(self, base_url: str, api_key: str, timeout_s: float = 60.0) -> None:
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=timeout_s,
        )

    async def close(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()

    async def _call(self, method: str, path: str, **kw: Any) -> Any:
        try:
            resp = await self._client.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise BackendError(f"{method} {path}: {exc}") from exc
        if resp.status_code >= 400:
            try:
                detail = resp.json().get("detail", resp.text)
            except ValueError:
                detail = resp.text
            raise BackendError(f"{method} {path}: {resp.status_code} {detail}")
        return resp.json() if resp.content else None

    async def import_meters(self, rows: list[dict[str, Any]]) -> list[int]:
        """Register meters in chunks; returns their ids in order; raises on any row error."""
        ids: list[int] = []
        for i in range(0, len(rows), IMPORT_CHUNK):
            out = await self._call("POST", "/v1/meters/import", json=rows[i : i + IMPORT_CHUNK])
            if out["errors"]:
                first = out["errors"][0]
                raise BackendError(f"meter import row {i + first['row']}: {first['detail']}")
            ids.extend(out["meter_ids"])
        return ids

    async def exchange(self, meter_id: int, body: dict[str, Any]) -> dict[str, Any]:
        """Exchange a meter; returns {"removed": meter, "installed": meter}."""
        out: dict[str, Any] = await self._call("POST", f"/v1/meters/{meter_id}/exchange", json=body)
        return out

    async def set_cycle_dates(self, starts: list[date]) -> None:
        """Replace the tenant's billing calendar by explicit cycle start dates."""
        body = {"cycle_day": 1, "dates": [d.isoformat() for d in starts]}
        await self._call("PUT", "/v1/billing-calendar", json=body)

    async def meter_by_address(self, address: str) -> dict[str, Any] | None:
        """The active meter with `address`, or None."""
        page = await self._call("GET", "/v1/meters", params={"address": address, "limit": 10})
        items = [m for m in page["items"] if m.get("removed_at") is None] or page["items"]
        return items[0] if items else None

    async def queue_command(self, meter_id: int, body: dict[str, Any]) -> dict[str, Any]:
        """Queue a command for a meter (the mailbox); returns the command."""
        out: dict[str, Any] = await self._call("POST", f"/v1/meters/{meter_id}/commands", json=body)
        return out

    async def command(self, command_id: int) -> dict[str, Any]:
        """One command as the mailbox has it now."""
        out: dict[str, Any] = await self._call("GET", f"/v1/commands/{command_id}")
        return out

    async def cycle_reads(self, cycle: date) -> AsyncIterator[dict[str, Any]]:
        """Every meter's cycle read rows (the NDJSON export)."""
        path = f"/v1/cycles/{cycle.isoformat()}/reads"
        try:
            async with self._client.stream("GET", path, params={"format": "ndjson"}) as resp:
                if resp.status_code >= 400:
                    await resp.aread()
                    raise BackendError(f"GET {path}: {resp.status_code} {resp.text}")
                async for line in resp.aiter_lines():
                    if line.strip():
                        yield json.loads(line)
        except httpx.HTTPError as exc:
            raise BackendError(f"GET {path}: {exc}") from exc

    async def meter_cycle(self, meter_id: int, cycle: date) -> dict[str, Any]:
        """One meter's cycle read with VEE issues and alarms."""
        out: dict[str, Any] = await self._call(
            "GET", f"/v1/meters/{meter_id}/cycles/{cycle.isoformat()}"
        )
        return out

    async def create_district(self, name: str, bulk_id: int, customer_ids: list[int]) -> int:
        """Define a district metered area (an admin key); its id."""
        body = {"name": name, "bulk_meter_id": bulk_id, "meter_ids": customer_ids}
        out = await self._call("POST", "/v1/districts", json=body)
        return int(out["district_id"])

    async def run_analytics(self, first: date, last: date) -> None:
        """Have the backend roll up and judge the days first..last (an admin key)."""
        day = first
        while day <= last:  # the API takes at most 92 days a call
            end = min(last, day + timedelta(days=91))
            params = {"from": day.isoformat(), "to": end.isoformat()}
            await self._call("POST", "/v1/analytics/run", params=params)
            day = end + timedelta(days=1)

    async def alarms(self) -> list[dict[str, Any]]:
        """Every lifecycle alarm of the tenant (open, acknowledged, closed; at most 1,000)."""
        states = [("state", s) for s in ("open", "acknowledged", "closed")]
        got: list[dict[str, Any]] = await self._call("GET", "/v1/alarms", params=states)
        return got

    async def readings(self, meter_id: int, start_s: int, end_s: int) -> dict[str, Any]:
        """Hourly interval reads of a meter between two instants."""
        params = {"from": iso(start_s), "to": iso(end_s), "step": "1h"}
        out: dict[str, Any] = await self._call(
            "GET", f"/v1/meters/{meter_id}/readings", params=params
        )
        return out


async def provision_credentials(
    addresses: list[tuple[str, str, str, bool, bool]],
    *,
    database_url: str,
    credentials_key: str,
    tenant: str,
    mqtt_admin_url: str | None,
    aes_keys: dict[str, bytes] | None = None,
    dtls: set[str] | None = None,
    platform: set[str] | None = None,
) -> dict[str, DeviceCredentials]:
    """ADAPTER: OSCORE/MQTT secrets per (address, kind, format, oscore, mqtt), in-process.

    Calls `devices.provision.provision_device` for each meter (see the module docstring);
    `aes_keys` (address -> OMS AES-128 key) are stored with their meters; the addresses in
    `dtls` get a DTLS-PSK credential, those in `platform` a OneNET identity (an IMEI).
    """
    from devices.provision import ProvisionError, provision_device

    out: dict[str, DeviceCredentials] = {}
    for address, kind, fmt, want_oscore, want_mqtt in addresses:
        try:
            dev = await provision_device(
                database_url, tenant, address, credentials_key=credentials_key,
                mqtt_admin_url=mqtt_admin_url if want_mqtt else None, kind=kind,
                meter_format=fmt, oscore=want_oscore, aes_key=(aes_keys or {}).get(address),
                dtls_psk=address in (dtls or ()),
                platform_ids={"onenet": imei_of(address)} if address in (platform or ()) else None,
            )  # fmt: skip
        except ProvisionError as exc:
            raise BackendError(f"provision {address}: {exc}") from exc
        out[address] = credentials_from(dev.oscore, dev.mqtt, dev.dtls, dev.platforms)
    return out


def imei_of(address: str) -> str:
    """A 15-digit IMEI-like platform identity for a simulated meter (stable per address)."""
    digits = "".join(c for c in address if c.isdigit())
    return ("86" + digits)[-15:].rjust(15, "0")


async def create_platform_secret(database_url: str, tenant: str, credentials_key: str) -> str:
    """ADAPTER: the tenant's OneNET endpoint secret (created or rotated), in-process."""
    from devices.provision import ProvisionError
    from devices.provision import create_platform_secret as create

    try:
        return await create(database_url, tenant, "onenet", credentials_key=credentials_key)
    except ProvisionError as exc:
        raise BackendError(f"platform secret: {exc}") from exc


def credentials_from(
    oscore: dict[str, str],
    mqtt: dict[str, str],
    dtls: dict[str, str] | None = None,
    platforms: dict[str, str] | None = None,
) -> DeviceCredentials:
    """`DeviceCredentials` from the provisioning output (hex OSCORE, MQTT account, DTLS
    identity and key, platform identities)."""
    return DeviceCredentials(
        oscore=OscoreCredentials.from_hex(oscore) if oscore else None,
        mqtt=MqttCredentials(mqtt["username"], mqtt["password"], mqtt["topic"]) if mqtt else None,
        dtls=(dtls["psk_identity"], dtls["psk"]) if dtls else None,
        platform_id=(platforms or {}).get("onenet"),
    )


def credentials_json(creds: dict[str, DeviceCredentials]) -> dict[str, Any]:
    """The credentials file content (secrets in hex; the file must be mode 0600)."""
    out: dict[str, Any] = {}
    for address, c in creds.items():
        entry: dict[str, Any] = {}
        if c.oscore:
            entry["oscore"] = {
                "sender_id": c.oscore.sender_id.hex(),
                "recipient_id": c.oscore.recipient_id.hex(),
                "master_secret": c.oscore.master_secret.hex(),
                "master_salt": c.oscore.master_salt.hex(),
            }
        if c.mqtt:
            entry["mqtt"] = {"username": c.mqtt.username, "password": c.mqtt.password,
                             "topic": c.mqtt.topic}  # fmt: skip
        if c.dtls:
            entry["dtls"] = {"psk_identity": c.dtls[0], "psk": c.dtls[1]}
        if c.platform_id:
            entry["platforms"] = {"onenet": c.platform_id}
        out[address] = entry
    return out


def credentials_load(obj: dict[str, Any]) -> dict[str, DeviceCredentials]:
    """Inverse of `credentials_json`."""
    return {
        a: credentials_from(
            e.get("oscore") or {}, e.get("mqtt") or {}, e.get("dtls"), e.get("platforms")
        )
        for a, e in obj.items()
    }
