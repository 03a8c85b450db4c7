"""Collector configuration: environment variables with the NBMETER_ prefix.

Top level: NBMETER_DATABASE_URL (required, from storage.settings), NBMETER_MQTT_URL (unset:
no MQTT), NBMETER_CREDENTIALS_KEY (base64 32 bytes; opens the sealed OSCORE secrets),
NBMETER_METRICS_PORT (0: off), NBMETER_EVENT_LOOP (uvloop, the default, or asyncio).
Sections use a double underscore: NBMETER_COAP__PORT=5684, NBMETER_PIPELINE__BATCH_MAX=256,
NBMETER_MQTT__CLIENT_ID=collector-b,
NBMETER_PLATFORM__PORT=8443 (the operator-platform push endpoint). A misspelt key inside
a section fails at startup.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pydantic_settings import SettingsConfigDict

from storage import compaction, retention
from storage.settings import DatabaseSettings


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CoapSettings(_Section):
    """The CoAP/UDP listener."""

    host: str = "::"  # dual-stack: IPv4 clients arrive as ::ffff:a.b.c.d
    port: int = Field(5683, ge=0, le=65535)
    max_payload_bytes: int = Field(4096, ge=64)  # larger uplinks: 4.13 (blockwise included)
    ack_wait_s: float = Field(10.0, gt=0)  # longest a device waits before a 5.03
    busy_max_age_s: int = Field(30, ge=0)  # Max-Age of a 5.03: when the device may retry
    exchange_lifetime_s: float = Field(247.0, gt=0)  # RFC 7252 deduplication window
    # answer in the ACK if ready this soon, else an empty ACK first (below ACK_TIMEOUT, 2 s,
    # so the device does not retransmit); aiocoap's 0.1 s made most answers separate
    empty_ack_delay_s: float = Field(1.0, gt=0, lt=2.0)
    dedup_max_entries: int = Field(200_000, ge=1000)  # bounds the dedup cache's memory
    # the common uplink (a CON or NON POST to /u in one datagram, OSCORE or a lab tenant's plain
    # CoAP, no pending command) answered beside aiocoap's message layer (collector.coap_lane)
    uplink_lane: bool = True
    # the UDP socket's receive buffer (SO_RCVBUF; 0: the system's default, ~200 KiB on
    # Linux, a few hundred datagrams): a herd of meters after an outage arrives faster than
    # it is decoded, and each datagram the kernel drops costs its meter a retransmission
    # 2-3 s later; the kernel caps the request at net.core.rmem_max (logged when it does)
    receive_buffer_bytes: int = Field(4 * 1024 * 1024, ge=0)
    # OSCORE contexts: cached this long while credential changes arrive by LISTEN, and
    # only context_fallback_ttl_s while that connection is down (the worst-case delay
    # before a rotated or revoked credential is refused)
    context_ttl_s: float = Field(300.0, gt=0)
    context_fallback_ttl_s: float = Field(5.0, gt=0)
    context_cache_max: int = Field(100_000, ge=100)
    unknown_kid_ttl_s: float = Field(30.0, gt=0)  # negative cache of unknown key ids
    unknown_kid_max: int = Field(100_000, ge=100)
    lookup_batch_max: int = Field(512, ge=1)  # key ids loaded per database query
    # a pause before each lookup for more key ids to arrive, taken while lookups find key
    # ids unknown (a flood of made-up ones: a query then serves a batch of them). A fleet's
    # known key ids are looked up at once: the loader runs once a socket read's datagrams
    # are all queued, and the next batch gathers while a query runs; the pause there only
    # added latency (bench/cityday.py's OSCORE rate, closed loop: 0.76 -> 0.86 of plain)
    lookup_gather_s: float = Field(0.005, ge=0)
    lookup_max_pending: int = Field(4096, ge=1)  # more waiting: 5.03
    # Block1 state of senders not yet authenticated by a whole request (RFC 7959)
    block1_max_transfers: int = Field(1024, ge=1)
    block1_max_per_source: int = Field(4, ge=1)
    block1_max_bytes: int = Field(2 * 1024 * 1024, ge=1024)
    block1_lifetime_s: float = Field(30.0, gt=0)
    # rejected requests: at most log_per_window log lines per kind per log_window_s
    log_window_s: float = Field(10.0, gt=0)
    log_per_window: int = Field(5, ge=0)
    answers_keep_s: float = Field(86_400.0, ge=600)  # recorded answers to OSCORE uplinks
    peer_live_s: float = Field(15.0, ge=3)  # a process on the port not seen since: dead


class MqttSettings(_Section):
    """The MQTT 5 subscription (shared, persistent, manual acknowledgement).

    `client_id` names this collector's broker session: keep it stable per collector
    instance (one per process; default: the host name), so a restart resumes the session
    and what waited in it. A crashed collector's session is taken over by a surviving
    member of the share group `will_delay_s` after the broker lost the connection (see
    collector/mqtt.py); `session_expiry_s` is only the safety net for the case where no
    collector is left to do so: Mosquitto 2.0 discards what an expired session holds.
    """

    client_id: str = Field(
        default_factory=lambda: f"nbmeter-collector-{socket.gethostname()}",
        pattern=r"^[A-Za-z0-9._:-]{1,100}$",  # also a topic level: no '/', '+' or '#'
    )
    share_group: str = Field("nbmeter", pattern=r"^[A-Za-z0-9._:-]{1,100}$")
    topic: str = "nbmeter/+/+/up"
    # how long the broker keeps an offline session (and the messages in it) when no
    # collector is left to take it over: longer than any outage of every collector
    session_expiry_s: int = Field(24 * 3600, ge=60)
    # a crashed collector's share waits this long for it to come back before a surviving
    # collector takes its session over (the will delay of its MQTT 5 will message)
    will_delay_s: int = Field(10, ge=1, le=3600)
    # graceful stop: longest wait for the broker to hand over what the session still holds
    leave_timeout_s: float = Field(30.0, gt=0)
    receive_maximum: int = Field(1000, ge=1, le=65535)  # unacked messages the broker sends
    keepalive_s: int = Field(30, ge=5)
    # CA certificate(s) that signed the broker's certificate, for an mqtts:// URL (unset:
    # the system's CAs); the URL may name it too, as `?ca=/path/ca.crt`
    ca_file: Path | None = None


class PipelineSettings(_Section):
    """Group commit: batch by count or time, bounded queue, retry while the DB is away."""

    batch_max: int = Field(512, ge=1)
    batch_wait_ms: float = Field(5.0, ge=0)
    max_pending: int = Field(20_000, ge=1)  # uplinks offered but not yet committed
    # batches committing at once: 1 = double buffering (the next batch fills while one
    # commits), which makes batches grow with the load; more overlap DB round trips
    workers: int = Field(1, ge=1, le=32)
    retry_initial_s: float = Field(0.2, gt=0)
    retry_max_s: float = Field(5.0, gt=0)
    pool_size: int = Field(4, ge=1)


class RedecodeSettings(_Section):
    """Re-decoding quarantined frames on request (collector.redecode)."""

    enabled: bool = True
    batch_max: int = Field(100, ge=1, le=5000)  # frames claimed and committed together
    poll_s: float = Field(30.0, gt=0)  # also look for requests this often (missed NOTIFY)
    yield_pending: int = Field(1000, ge=1)  # claim nothing while live uplinks queue this deep


class WebhookSettings(_Section):
    """Delivery: NBMETER_WEBHOOKS__TIMEOUT_S=5, NBMETER_WEBHOOKS__ENABLED=false, ..."""

    enabled: bool = True
    timeout_s: float = Field(5.0, gt=0)  # per request
    batch_max: int = Field(100, ge=1)  # rows leased per claim
    lease_s: float = Field(30.0, gt=0)  # a dead dispatcher's rows are due again after this
    poll_s: float = Field(2.0, gt=0)  # look for due retries this often
    backoff_base_s: float = Field(1.0, gt=0)
    backoff_max_s: float = Field(3600.0, gt=0)
    max_attempts: int = Field(30, ge=1)  # then the row is dead (replay revives it)
    disable_after_failures: int = Field(10, ge=1)  # consecutive failures ...
    disable_after_s: float = Field(3600.0, ge=0)  # ... over at least this long
    sweep_every_s: float = Field(60.0, gt=0)  # alarm auto-close
    pool_size: int = Field(3, ge=2)


class DtlsSettings(_Section):
    """CoAP over DTLS 1.2 PSK (collector.coap_dtls); port 0: off. Needs the `dtls` extra."""

    host: str = "127.0.0.1"  # one address: the transport cannot bind the any-address
    port: int = Field(0, ge=0, le=65535)  # 5684 is coaps' port
    reload_s: float = Field(5.0, gt=0)  # a new or rotated PSK takes effect within this
    max_sessions: int = Field(10_000, ge=1)  # DTLS sessions kept (LRU beyond)


class PlatformSettings(_Section):
    """The operator-platform push endpoint (collector.platform_http); port 0: off."""

    host: str = "127.0.0.1"  # where the platforms (or the TLS proxy in front) reach it
    port: int = Field(0, ge=0, le=65535)
    tls_certfile: str | None = None  # HTTPS straight from uvicorn (else a proxy terminates)
    tls_keyfile: str | None = None
    max_body_bytes: int = Field(1024 * 1024, ge=1024)
    ack_wait_s: float = Field(10.0, gt=0)  # longest a push waits before a 503
    retry_after_s: int = Field(30, ge=0)  # Retry-After of a 503
    max_pending: int = Field(20_000, ge=1)  # pipeline depth past which pushes get 503
    # a message's platform time may be this old (platforms retry and back-log) or ahead
    max_age_s: float = Field(3600.0, gt=0)
    max_ahead_s: float = Field(300.0, ge=0)
    secret_ttl_s: float = Field(5.0, gt=0)  # a rotated endpoint secret takes effect within
    device_ttl_s: float = Field(30.0, gt=0)  # a re-mapped platform identity takes effect within


class RetentionSettings(_Section):
    """Dropping expired chunks of the raw archive and the quarantine (storage.retention),
    and compacting closed readings chunks (storage.compaction).

    On by default in every collector (one at a time does it); the Apache edition of
    TimescaleDB has no retention policies, so without this job both grow for ever."""

    enabled: bool = True
    raw_uplinks_days: int = Field(retention.DEFAULT_DAYS, ge=1)  # a billing year + a month
    quarantine_days: int = Field(retention.DEFAULT_DAYS, ge=1)
    every_s: float = Field(3600.0, ge=60)
    # closed readings chunks get their indexes rebuilt packed (storage.compaction): a day's
    # chunk once its day ended this long ago (its last uplinks arrive the next day)
    compact: bool = True
    compact_after_h: float = Field(compaction.DEFAULT_AFTER.total_seconds() / 3600, ge=0)


class AnalyticsSettings(_Section):
    """The analytics run (collector.analytics): NBMETER_ANALYTICS__EVERY_S=300, ..."""

    enabled: bool = True
    every_s: float = Field(300.0, gt=0)  # silent meters are judged this often
    command_timeout_s: float = Field(1800.0, gt=0)  # a day's rollup of a large tenant


class CollectorSettings(DatabaseSettings):
    """Everything `collector.main.run` needs; read from the environment (prefix NBMETER_)."""

    model_config = SettingsConfigDict(
        env_prefix="NBMETER_", env_nested_delimiter="__", extra="ignore", frozen=True
    )

    mqtt_url: str | None = None
    credentials_key: SecretStr | None = None
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(9464, ge=0, le=65535)
    log_json: bool | None = None  # None: JSON unless stderr is a terminal
    shutdown_grace_s: float = Field(30.0, gt=0)
    # the event loop the process runs on: uvloop's (libuv; the API's too), or asyncio's own
    # selector loop. bench/cityday.py, same machine, alternating runs: OSCORE uplinks 94
    # against 109 collector CPU µs each, plain CoAP 78 against 87.
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"
    # driver files (*.toml) of the tenants' meter models, installed at start (all or none)
    drivers_dir: Path | None = None
    coap: CoapSettings = CoapSettings()
    mqtt: MqttSettings = MqttSettings()
    pipeline: PipelineSettings = PipelineSettings()
    redecode: RedecodeSettings = RedecodeSettings()
    webhooks: WebhookSettings = WebhookSettings()  # the alert dispatcher (collector.webhooks)
    platform: PlatformSettings = PlatformSettings()
    dtls: DtlsSettings = DtlsSettings()
    retention: RetentionSettings = RetentionSettings()
    analytics: AnalyticsSettings = AnalyticsSettings()  # collector.analytics
