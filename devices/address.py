"""Where the broker is and how to reach it: `BrokerAddress.parse(url)` and `tls_context`.

Shared by everything that talks to the broker: the collector's subscriber, the
dynamic-security admin client (`devices.broker`) and the tests' clients. Pure parsing
plus the standard library's TLS context; no connection is opened here.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

_SCHEMES = {"mqtt": (False, 1883), "tcp": (False, 1883), "mqtts": (True, 8883), "ssl": (True, 8883)}


class MqttError(Exception):
    """The broker settings cannot work (URL, CA, TLS); the message says what to change."""


@dataclass(frozen=True)
class BrokerAddress:
    """Where the broker is and how to log in, from an `mqtt[s]://user:pw@host:port` URL."""

    host: str
    port: int
    username: str | None
    password: str | None
    tls: bool = False
    ca_file: Path | None = None

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        """Parse `mqtt://[user[:password]@]host[:port]` (default port 1883) or `mqtts://...`
        (TLS, default port 8883, optional `?ca=/path/ca.crt`). Raises ValueError."""
        parts = urlsplit(url)
        if parts.scheme not in _SCHEMES:
            msg = f"broker URL must start with mqtt:// or mqtts:// (got {parts.scheme!r})"
            raise ValueError(msg)
        tls, default_port = _SCHEMES[parts.scheme]
        query = parse_qs(parts.query, keep_blank_values=True)
        unknown = set(query) - {"ca"}
        if unknown:
            msg = f"broker URL: unknown parameter(s) {sorted(unknown)}; only ?ca= is known"
            raise ValueError(msg)
        ca = query.get("ca", [""])[-1]
        if ca and not tls:
            msg = "broker URL: ?ca= needs mqtts:// (the plain listener has no certificate)"
            raise ValueError(msg)
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or default_port,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            tls=tls,
            ca_file=Path(ca) if ca else None,
        )


def tls_context(address: BrokerAddress, ca_file: Path | None = None) -> ssl.SSLContext | None:
    """The client TLS context for `address` (None for plain MQTT): TLS 1.2+, certificate
    verified against `ca_file`, else the URL's `?ca=`, else the system's CAs, and the host
    name checked. Raises MqttError when the CA file is missing."""
    if not address.tls:
        return None
    ca = ca_file or address.ca_file
    if ca is not None and not ca.is_file():
        msg = (
            f"the CA file {ca} does not exist: set NBMETER_MQTT__CA_FILE (or ?ca= in the "
            "broker URL) to the CA that signed the broker's certificate (`nbmeter stack env` "
            "prints the local stack's)"
        )
        raise MqttError(msg)
    context = ssl.create_default_context(cafile=str(ca) if ca else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context
