-- 0039: alarms as a lifecycle (open -> acknowledged -> closed), per-tenant alarm rules,
-- the alarm event log (the stable event ids webhooks and MQTT alerts carry), and the
-- device-health figures the decoders now extract beyond battery mV and radio.
--
-- Alarms are raised by a row trigger on meter_events: every writer of meter_events (the
-- collector, a re-decode, an import) raises alarms in its own transaction, and a replayed
-- uplink (whose events the ON CONFLICT DO NOTHING skips) raises nothing twice. While an
-- alarm of (meter, kind) is not closed, further events only bump last_seen_at and
-- occurrences (the partial unique index de-duplicates). An event with active = false, or
-- a later reading without the flag (storage.alarms.sweep), marks the condition cleared;
-- the sweep closes an alarm whose condition stayed cleared for the rule's
-- auto_close_after_s. Acknowledge and close are storage.alarms.transition (the allowed
-- transitions are data there).

ALTER TABLE device_health
    ADD COLUMN battery_pct smallint CHECK (battery_pct BETWEEN 0 AND 100),
    ADD COLUMN battery_low boolean,   -- the meter's own low-battery status bit
    ADD COLUMN meter_error boolean,   -- the meter reports an error (OMS STS, FD 17, ...)
    ADD COLUMN cell_id     bigint CHECK (cell_id BETWEEN 0 AND 4294967295);

-- The kinds an alarm can have, with the Flag bit that raises it (decoder.columns.Flag)
-- and its default severity and auto-close delay; a tenant's alarm_rules override them.
CREATE TABLE alarm_kinds (
    kind               text PRIMARY KEY,
    flag_bit           integer NOT NULL,
    severity           text NOT NULL,
    auto_close_after_s integer
);
INSERT INTO alarm_kinds (kind, flag_bit, severity, auto_close_after_s) VALUES
    ('valve_closed',   1,   'info',     86400),
    ('valve_abnormal', 2,   'major',    86400),
    ('low_battery',    4,   'warning',  604800),
    ('leak',           8,   'major',    86400),
    ('burst',          16,  'critical', 21600),
    ('reverse_flow',   32,  'major',    86400),
    ('tamper',         64,  'critical', NULL),   -- never closes by itself
    ('dry',            128, 'warning',  86400),
    ('meter_error',    256, 'major',    86400),
    ('valve_open',     0,   'info',     0);

CREATE TABLE alarm_rules (
    tenant_id          bigint NOT NULL REFERENCES tenants ON DELETE CASCADE,
    kind               text NOT NULL REFERENCES alarm_kinds,
    enabled            boolean NOT NULL DEFAULT true,   -- false: this kind raises no alarm
    severity           text CHECK (severity IN ('info', 'warning', 'major', 'critical')),
    -- seconds the condition must stay cleared before the alarm closes by itself;
    -- NULL: the kind's default; a negative value: never (close by hand)
    auto_close_after_s integer,
    -- low_battery only: a device_health battery_mv below this raises it too
    threshold          integer,
    PRIMARY KEY (tenant_id, kind)
);

CREATE TABLE alarms (
    alarm_id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id      bigint NOT NULL REFERENCES tenants ON DELETE CASCADE,
    meter_id       bigint NOT NULL,
    kind           text NOT NULL REFERENCES alarm_kinds,
    severity       text NOT NULL CHECK (severity IN ('info', 'warning', 'major', 'critical')),
    state          text NOT NULL DEFAULT 'open'
                   CHECK (state IN ('open', 'acknowledged', 'closed')),
    opened_at      timestamptz NOT NULL,   -- the first event's time (meter clock)
    raised_at      timestamptz NOT NULL DEFAULT now(),
    last_seen_at   timestamptz NOT NULL,   -- the newest event's time
    occurrences    integer NOT NULL DEFAULT 1,
    cleared_at     timestamptz,            -- the condition cleared at (NULL: still present)
    acked_at       timestamptz,
    acked_by       text,                   -- the API key id
    ack_note       text,
    closed_at      timestamptz,
    closed_by      text,                   -- the API key id; NULL when closed by the sweep
    close_reason   text CHECK (close_reason IN ('manual', 'cleared')),
    close_note     text,
    CHECK ((state = 'closed') = (closed_at IS NOT NULL))
);
CREATE UNIQUE INDEX alarms_one_open ON alarms (meter_id, kind) WHERE state <> 'closed';
CREATE INDEX alarms_tenant ON alarms (tenant_id, state, alarm_id DESC);

-- Every change of an alarm, once: its event_id is what a webhook or MQTT consumer
-- de-duplicates on. mqtt_sent_at: published on the tenant's alert topic.
CREATE TABLE alarm_events (
    event_id     uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    seq          bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    tenant_id    bigint NOT NULL REFERENCES tenants ON DELETE CASCADE,
    alarm_id     bigint NOT NULL REFERENCES alarms ON DELETE CASCADE,
    event_type   text NOT NULL
                 CHECK (event_type IN ('alarm.opened', 'alarm.acknowledged', 'alarm.closed')),
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    payload      jsonb NOT NULL,
    mqtt_sent_at timestamptz
);
CREATE INDEX alarm_events_tenant ON alarm_events (tenant_id, seq);
CREATE INDEX alarm_events_mqtt_due ON alarm_events (seq) WHERE mqtt_sent_at IS NULL;

-- An alarm event: logged, then fanned out (0040 adds the webhook outbox), then the
-- dispatcher woken at commit. Returns the event id.
CREATE FUNCTION nbm_alarm_event(p_alarm_id bigint, p_type text) RETURNS uuid
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
    PERFORM pg_notify('nbmeter_alarms', a.tenant_id::text);
    RETURN ev;
END $$;

-- Raise (or de-duplicate into the open alarm of) one (meter, kind) seen at `at`.
CREATE FUNCTION nbm_raise_alarm(p_meter bigint, p_kind text, p_at timestamptz)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    id bigint;
    fresh boolean;
BEGIN
    -- an event older than the clearing of an alarm already closed (a late backlog
    -- uplink) does not open the alarm again
    IF EXISTS (SELECT 1 FROM alarms c WHERE c.meter_id = p_meter AND c.kind = p_kind
               AND c.state = 'closed' AND p_at <= coalesce(c.cleared_at, c.closed_at)) THEN
        RETURN NULL;
    END IF;
    INSERT INTO alarms AS a (tenant_id, meter_id, kind, severity, opened_at, last_seen_at)
    SELECT m.tenant_id, p_meter, p_kind, coalesce(r.severity, k.severity), p_at, p_at
    FROM meters m
    JOIN alarm_kinds k ON k.kind = p_kind
    LEFT JOIN alarm_rules r ON r.tenant_id = m.tenant_id AND r.kind = p_kind
    WHERE m.meter_id = p_meter AND coalesce(r.enabled, true)
    ON CONFLICT (meter_id, kind) WHERE state <> 'closed' DO UPDATE SET
        last_seen_at = greatest(a.last_seen_at, EXCLUDED.last_seen_at),
        occurrences = a.occurrences + 1,
        cleared_at = CASE WHEN EXCLUDED.last_seen_at >= a.cleared_at THEN NULL
                          ELSE a.cleared_at END
    RETURNING alarm_id, (xmax = 0) INTO id, fresh;
    IF fresh THEN
        PERFORM nbm_alarm_event(id, 'alarm.opened');
    END IF;
    RETURN id;
END $$;

CREATE FUNCTION nbm_alarm_from_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.active THEN
        PERFORM nbm_raise_alarm(NEW.meter_id, NEW.kind, NEW.occurred_at);
    ELSE  -- the meter says the condition ended
        UPDATE alarms SET cleared_at = NEW.occurred_at
        WHERE meter_id = NEW.meter_id AND kind = NEW.kind AND state <> 'closed'
          AND last_seen_at <= NEW.occurred_at
          AND (cleared_at IS NULL OR cleared_at > NEW.occurred_at);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER meter_events_alarm AFTER INSERT ON meter_events
    FOR EACH ROW EXECUTE FUNCTION nbm_alarm_from_event();

-- A device_health row whose battery is below the tenant's low_battery threshold raises
-- low_battery (the meters' own low-battery bits arrive as meter_events already).
CREATE FUNCTION nbm_alarm_from_health() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (
        SELECT 1 FROM alarm_rules r JOIN meters m ON m.tenant_id = r.tenant_id
        WHERE m.meter_id = NEW.meter_id AND r.kind = 'low_battery'
          AND r.threshold IS NOT NULL AND NEW.battery_mv < r.threshold) THEN
        PERFORM nbm_raise_alarm(NEW.meter_id, 'low_battery', NEW.measured_at);
    END IF;
    RETURN NULL;
END $$;
-- WHEN: a row without a battery figure (most formats) costs no function call
CREATE TRIGGER device_health_alarm AFTER INSERT ON device_health
    FOR EACH ROW WHEN (NEW.battery_mv IS NOT NULL) EXECUTE FUNCTION nbm_alarm_from_health();
