-- 0040: webhooks: per-tenant endpoints with an event filter, a durable outbox written in
-- the transaction that logs the alarm event, and a delivery log.
--
-- nbm_alarm_event (0039) is replaced so that every alarm event also puts one outbox row
-- per matching enabled endpoint, in the same transaction: an event is delivered if and
-- only if its alarm change committed. The dispatcher (collector.webhooks) claims due rows
-- with a lease (FOR UPDATE SKIP LOCKED, lease_until), so a dispatcher killed mid-delivery
-- loses nothing: the lease runs out and the row is delivered again (at least once; the
-- receiver de-duplicates on the event id). Outbox states and their transitions are data in
-- storage.webhooks.

CREATE TABLE webhook_endpoints (
    endpoint_id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id       bigint NOT NULL REFERENCES tenants ON DELETE CASCADE,
    url             text NOT NULL CHECK (url ~ '^https?://'),
    secret          text NOT NULL CHECK (length(secret) >= 16),
    -- the filter: NULL = every kind / event type; min_severity ranks info<warning<major<critical
    kinds           text[],
    event_types     text[],
    min_severity    text NOT NULL DEFAULT 'info'
                    CHECK (min_severity IN ('info', 'warning', 'major', 'critical')),
    enabled         boolean NOT NULL DEFAULT true,
    disabled_at     timestamptz,
    disabled_reason text,
    failing_since   timestamptz,   -- first failure of the current run of failures
    failures        integer NOT NULL DEFAULT 0,   -- consecutive failed attempts
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_endpoints_tenant ON webhook_endpoints (tenant_id);

CREATE TABLE webhook_outbox (
    event_id        uuid NOT NULL REFERENCES alarm_events ON DELETE CASCADE,
    endpoint_id     bigint NOT NULL REFERENCES webhook_endpoints ON DELETE CASCADE,
    state           text NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'delivered', 'dead')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    lease_until     timestamptz,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    delivered_at    timestamptz,
    PRIMARY KEY (event_id, endpoint_id)
);
CREATE INDEX webhook_outbox_due ON webhook_outbox (next_attempt_at) WHERE state = 'pending';

CREATE TABLE webhook_deliveries (
    delivery_id  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id     uuid NOT NULL,
    endpoint_id  bigint NOT NULL REFERENCES webhook_endpoints ON DELETE CASCADE,
    attempt      integer NOT NULL,
    attempted_at timestamptz NOT NULL,
    status_code  integer,          -- NULL: no HTTP answer (connect error, timeout)
    error        text,
    duration_ms  integer NOT NULL,
    ok           boolean NOT NULL
);
CREATE INDEX webhook_deliveries_endpoint ON webhook_deliveries (endpoint_id, delivery_id DESC);

CREATE FUNCTION nbm_severity_rank(s text) RETURNS integer LANGUAGE sql IMMUTABLE AS $$
    SELECT array_position(ARRAY['info', 'warning', 'major', 'critical'], s)
$$;

CREATE OR REPLACE FUNCTION nbm_alarm_event(p_alarm_id bigint, p_type text) RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
    a alarms;
    ev uuid;
BEGIN
    SELECT * INTO a FROM alarms WHERE alarm_id = p_alarm_id;
    INSERT INTO alarm_events (tenant_id, alarm_id, event_type, payload)
    VALUES (a.tenant_id, a.alarm_id, p_type, jsonb_build_object(
        'alarm_id', a.alarm_id, 'meter_id', a.meter_id,
        'address', (SELECT address FROM meters WHERE meter_id = a.meter_id),
        'kind', a.kind, 'severity', a.severity, 'state', a.state,
        'opened_at', a.opened_at, 'last_seen_at', a.last_seen_at,
        'occurrences', a.occurrences, 'cleared_at', a.cleared_at,
        'acked_at', a.acked_at, 'acked_by', a.acked_by, 'ack_note', a.ack_note,
        'closed_at', a.closed_at, 'closed_by', a.closed_by,
        'close_reason', a.close_reason, 'close_note', a.close_note))
    RETURNING event_id INTO ev;
    INSERT INTO webhook_outbox (event_id, endpoint_id)
    SELECT ev, e.endpoint_id FROM webhook_endpoints e
    WHERE e.tenant_id = a.tenant_id AND e.enabled
      AND (e.kinds IS NULL OR a.kind = ANY (e.kinds))
      AND (e.event_types IS NULL OR p_type = ANY (e.event_types))
      AND nbm_severity_rank(a.severity) >= nbm_severity_rank(e.min_severity);
    PERFORM pg_notify('nbmeter_alarms', a.tenant_id::text);
    RETURN ev;
END $$;
