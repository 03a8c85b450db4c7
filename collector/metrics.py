"""Prometheus metrics of the collector, and the small HTTP server that exposes /metrics.

Names follow Prometheus conventions (`_total`, `_seconds`); labels are bounded sets
(transport names, outcome names, quarantine reasons), never device ids.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram, start_http_server

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

TRANSPORT_NAMES = {1: "coap", 2: "coap_oscore", 3: "mqtt", 6: "platform", 7: "coap_dtls"}

UPLINKS = Counter(
    "nbmeter_collector_uplinks_total",
    "Uplinks answered, by transport and outcome (stored, duplicate, quarantined, busy, failed,"
    " replayed: an OSCORE sequence number another process admitted before).",
    ["transport", "outcome"],
)
QUARANTINED = Counter(
    "nbmeter_collector_quarantined_total", "Uplinks quarantined, by reason.", ["reason"]
)
READINGS_NEW = Counter(
    "nbmeter_collector_readings_new_total", "Readings stored for the first time."
)
BATCH_SIZE = Histogram(
    "nbmeter_collector_batch_uplinks",
    "Uplinks per committed batch.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048),
)
BATCH_SECONDS = Histogram(
    "nbmeter_collector_batch_seconds",
    "Time to decode and commit one batch.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
COAP_LANE = Counter(
    "nbmeter_collector_coap_lane_total",
    "CoAP uplinks the uplink lane answered (answered) or handed to aiocoap's path after"
    " looking at them (handed_on: a pending command, an inner request not POST /u, a failed"
    " decryption, a replay; collector.coap_lane).",
    ["outcome"],
)
ACK_SECONDS = Histogram(
    "nbmeter_collector_uplink_ack_seconds",
    "From an uplink's arrival to its answer (durable or not).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
COMMANDS = Counter(
    "nbmeter_collector_commands_total",
    "Mailbox commands handed to devices (sent, again included) and answers recorded.",
    ["event"],
)
COMMAND_CLAIMS_SKIPPED = Counter(
    "nbmeter_collector_command_claims_skipped_total",
    "Windows that ran no claim: the meter has no pending command in the live pending view.",
)
PENDING_VIEW_LIVE = Gauge(
    "nbmeter_collector_pending_view_live",
    "1 while the pending-command view is live (windows of meters outside it skip the"
    " claim), 0 while every window claims (not loaded yet, listener lost, over its cap).",
)
PENDING_VIEW_METERS = Gauge(
    "nbmeter_collector_pending_view_meters",
    "Meters that may have a pending command, in the live view (0 while it is not live).",
)
QUEUE_DEPTH = Gauge("nbmeter_collector_queue_depth", "Uplinks offered but not yet committed.")
PLATFORM_REFUSED = Counter(
    "nbmeter_collector_platform_refused_total",
    "Platform pushes refused before the pipeline (malformed, bad signature, stale...), by code.",
    ["code"],
)
DB_FAILURES = Counter(
    "nbmeter_collector_commit_failures_total", "Batch commits that failed and were retried."
)

# CoAP under attack: what unauthenticated senders cost, and how much was refused or held back
COAP_REJECTED = Counter(
    "nbmeter_collector_coap_rejected_total",
    "CoAP requests refused before the pipeline, by kind (the event name logged for it).",
    ["kind"],
)
LOGS_SUPPRESSED = Counter(
    "nbmeter_collector_logs_suppressed_total",
    "Log lines held back by rate limiting, by kind ('library' for aiocoap's own).",
    ["kind"],
)
BLOCK1_TRANSFERS = Gauge(
    "nbmeter_collector_block1_transfers", "Block1 transfers being assembled (bounded)."
)
BLOCK1_EVICTED = Counter(
    "nbmeter_collector_block1_evicted_total",
    "Block1 transfers dropped to stay within the budget (their next block gets 4.08).",
)
OSCORE_LOOKUPS = Counter(
    "nbmeter_collector_oscore_lookups_total",
    "Database queries for OSCORE contexts (each loads every key id waiting at the time).",
)
OSCORE_LOOKUP_KIDS = Counter(
    "nbmeter_collector_oscore_lookup_kids_total", "OSCORE key ids looked up in the database."
)
OSCORE_INVALIDATIONS = Counter(
    "nbmeter_collector_oscore_invalidations_total",
    "Cached OSCORE contexts dropped, by cause (notify, listener_lost, listener_ready, replay).",
    ["cause"],
)
CREDENTIALS_LISTENING = Gauge(
    "nbmeter_collector_credentials_listening",
    "1 while credential changes arrive by LISTEN (contexts cached long), 0 on the short TTL.",
)
REPLAY_ANSWERS = Counter(
    "nbmeter_collector_oscore_replay_answers_total",
    "Retransmissions whose sequence number was already used, by answer (recorded, busy).",
    ["answer"],
)
COAP_PEERS = Gauge(
    "nbmeter_collector_coap_port_peers",
    "Other live collector processes sharing this process's CoAP port.",
)
COAP_RECEIVE_BUFFER = Gauge(
    "nbmeter_collector_coap_receive_buffer_bytes",
    "Receive buffer the kernel granted the CoAP socket (NBMETER_COAP__RECEIVE_BUFFER_BYTES,"
    " capped at net.core.rmem_max).",
)


def serve(host: str, port: int) -> WSGIServer | None:
    """Start the /metrics HTTP server on host:port in a thread; None when port is 0."""
    if port == 0:
        return None
    server, _thread = start_http_server(port, addr=host)
    return server


# the alert dispatcher (collector.webhooks, collector.alerts_mqtt)
WEBHOOK_ATTEMPTS = Counter(
    "nbmeter_webhook_attempts_total", "Webhook delivery attempts, by outcome (ok, failed).",
    ["outcome"],
)  # fmt: skip
WEBHOOK_LATENCY = Histogram(
    "nbmeter_webhook_event_to_delivery_seconds",
    "From an alarm event's row (in the uplink's transaction) to its first accepted delivery.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
WEBHOOK_DISABLED = Counter(
    "nbmeter_webhook_endpoints_disabled_total", "Endpoints disabled after sustained failure."
)
ALERTS_MQTT = Counter(
    "nbmeter_alerts_mqtt_published_total", "Alarm events acknowledged by the broker."
)

# the analytics run (collector.analytics)
ANALYTICS_SECONDS = Histogram(
    "nbmeter_analytics_run_seconds", "Duration of one analytics run (rollups and rules).",
    buckets=(0.05, 0.25, 1, 5, 15, 60, 300, 1800),
)  # fmt: skip
ANALYTICS_DAYS = Counter("nbmeter_analytics_days_total", "Tenant-days rolled up.")
ANALYTICS_ALARMS = Counter(
    "nbmeter_analytics_alarms_total",
    "Alarms the analytics raised (or renewed) and marked cleared, by kind.",
    ["kind", "change"],
)
SILENT_METERS = Gauge("nbmeter_silent_meters", "Meters past their silent limit at the last run.")
