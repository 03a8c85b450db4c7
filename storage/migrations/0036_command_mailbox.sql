-- 0036: the downlink mailbox: commands to meters, waiting durably for the meter's next
-- reachability window (NB-IoT PSM), and bulk jobs that queue one command to many meters.
--
-- States and the transitions allowed between them are data in storage/command_states.py
-- (TRANSITIONS); the CHECK below lists the same states.
--   queued -> sent | cancelled | expired
--   sent   -> sent (delivered again) | acknowledged | failed | expired
--   expired (after it was sent) -> acknowledged | failed   (the device's late answer wins)
-- A later command for the same `setting` of a meter cancels a queued earlier one with
-- reason 'superseded_by=<command_id>'.

CREATE TABLE command_jobs (
    job_id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id       bigint NOT NULL REFERENCES tenants ON DELETE CASCADE,
    idempotency_key text CHECK (length(idempotency_key) BETWEEN 1 AND 200),
    kind            text NOT NULL,
    args            jsonb NOT NULL,
    selection       jsonb NOT NULL,  -- what was asked: {"meter_ids": [...]} or a query
    n_commands      integer NOT NULL CHECK (n_commands >= 0),
    created_by      text NOT NULL,   -- 'api-key:<key_id>' or 'cli:<user>'
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, idempotency_key)
);

CREATE TABLE commands (
    command_id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id       bigint NOT NULL REFERENCES tenants ON DELETE CASCADE,
    meter_id        bigint NOT NULL REFERENCES meters ON DELETE CASCADE,
    job_id          bigint REFERENCES command_jobs ON DELETE CASCADE,
    -- the caller's key: the same key again returns this command instead of a new one
    idempotency_key text CHECK (length(idempotency_key) BETWEEN 1 AND 200),
    kind            text NOT NULL CHECK (kind IN ('valve', 'clock', 'reporting')),
    setting         text NOT NULL,   -- what it changes; a later one supersedes a queued one
    args            jsonb NOT NULL,
    state           text NOT NULL DEFAULT 'queued'
                    CHECK (state IN ('queued', 'sent', 'acknowledged', 'failed', 'expired',
                                     'cancelled')),
    reason          text,            -- why it reached its terminal state
    result          jsonb,           -- the device's answer
    attempts        integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    created_by      text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz NOT NULL,
    sent_at         timestamptz,     -- first delivery
    last_sent_at    timestamptz,
    finished_at     timestamptz,     -- entered its terminal state
    CHECK (expires_at > created_at),
    CHECK ((state IN ('queued', 'sent')) = (finished_at IS NULL)),
    CHECK ((state = 'queued') = (sent_at IS NULL) OR state IN ('cancelled', 'expired')),
    UNIQUE (tenant_id, idempotency_key)
);
-- the collector's look-up on every uplink: a meter's pending commands, in order
CREATE INDEX commands_pending ON commands (meter_id, command_id) WHERE state IN ('queued', 'sent');
CREATE INDEX commands_by_meter ON commands (tenant_id, meter_id, command_id);
CREATE INDEX commands_by_state ON commands (tenant_id, state, command_id);
CREATE INDEX commands_by_job ON commands (job_id, command_id) WHERE job_id IS NOT NULL;
CREATE INDEX commands_expiry ON commands (expires_at) WHERE state IN ('queued', 'sent');
