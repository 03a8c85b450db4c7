"""Prometheus metrics of the collector, and the small HTTP server that exposes /metrics.

Names follow Prometheus conventions (`_total`, `_seconds`); labels are bounded sets
(transport names, outcome names, quarantine reasons), never device ids.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

TRANSPORT_NAMES = {1: "coap", 2: "coap_oscore", 3: "mqtt"}

UPLINKS = Counter(
    "nbmeter_collector_uplinks_total",
    "Uplinks answered, by transport and outcome (stored, duplicate, quarantined, busy, failed).",
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
ACK_SECONDS = Histogram(
    "nbmeter_collector_uplink_ack_seconds",
    "From an uplink's arrival to its answer (durable or not).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
QUEUE_DEPTH = Gauge("nbmeter_collector_queue_depth", "Uplinks offered but not yet committed.")
DB_FAILURES = Counter(
    "nbmeter_collector_commit_failures_total", "Batch commits that failed and were retried."
)


def serve(host: str, port: int) -> object | None:
    """Start the /metrics HTTP server on host:port in a thread; None when port is 0."""
    if port == 0:
        return None
    server, _thread = start_http_server(port, addr=host)
    return server
