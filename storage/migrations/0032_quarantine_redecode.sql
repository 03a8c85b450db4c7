-- 0032: the quarantine as the billing office sees it: ids, re-decode requests, resolution;
-- and tenant settings changed through the API, with an audit trail.
--
-- Quarantine rows get a stable id. A hypertable cannot take an identity column added
-- later (PostgreSQL refuses identity on a table with child tables), so the id comes from
-- an owned sequence. It is unique by construction but not by constraint: a unique index
-- on a hypertable must include the partitioning column (received_at).

CREATE SEQUENCE quarantine_id_seq AS bigint;
ALTER TABLE quarantine ADD COLUMN quarantine_id bigint;
UPDATE quarantine SET quarantine_id = nextval('quarantine_id_seq');
ALTER TABLE quarantine ALTER COLUMN quarantine_id SET DEFAULT nextval('quarantine_id_seq');
ALTER TABLE quarantine ALTER COLUMN quarantine_id SET NOT NULL;
ALTER SEQUENCE quarantine_id_seq OWNED BY quarantine.quarantine_id;

-- A re-decoded row is resolved: what became of its frame (stored, duplicate, or
-- quarantined again, then `superseded_by` names the new row), by which job, when.
ALTER TABLE quarantine
    ADD COLUMN resolved_at timestamptz,
    ADD COLUMN resolution text CHECK (resolution IN ('stored', 'duplicate', 'quarantined')),
    ADD COLUMN resolved_by_job bigint,
    ADD COLUMN superseded_by bigint;

CREATE INDEX quarantine_by_id ON quarantine (quarantine_id);
-- the API's list: a tenant's rows newest first, keyset (received_at, quarantine_id)
CREATE INDEX quarantine_tenant ON quarantine (tenant_id, received_at DESC, quarantine_id DESC);

-- Re-decode requests: a durable queue. A job is what a caller asked for (one row, or every
-- row matching a filter); its items are the rows, one each. States and the transitions
-- allowed between them are data in storage/quarantine.py (JOB_TRANSITIONS,
-- ITEM_TRANSITIONS); the CHECKs below list the same states.
--   job:  queued -> done | failed        (failed: at least one item failed)
--   item: queued -> stored | duplicate | quarantined | skipped | failed
-- The collector claims queued items (FOR UPDATE SKIP LOCKED), feeds their frames through
-- its live store path, and records each outcome with the quarantine row's resolution in
-- one transaction. NOTIFY nbmeter_redecode wakes it when a job is queued.
CREATE TABLE redecode_jobs (
    job_id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id    bigint NOT NULL REFERENCES tenants ON DELETE CASCADE,
    state        text NOT NULL DEFAULT 'queued' CHECK (state IN ('queued', 'done', 'failed')),
    selection    jsonb NOT NULL,   -- what was asked: {"quarantine_id": n} or the filter
    requested_by text NOT NULL,    -- 'api-key:<key_id>' or 'cli:<user>'
    requested_at timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    n_items      integer NOT NULL CHECK (n_items >= 0),
    CHECK ((state = 'queued') = (finished_at IS NULL))
);
CREATE INDEX redecode_jobs_tenant ON redecode_jobs (tenant_id, job_id DESC);

CREATE TABLE redecode_items (
    job_id            bigint NOT NULL REFERENCES redecode_jobs ON DELETE CASCADE,
    quarantine_id     bigint NOT NULL,
    received_at       timestamptz NOT NULL,  -- the quarantine row's: finds its chunk
    state             text NOT NULL DEFAULT 'queued' CHECK (state IN (
                          'queued', 'stored', 'duplicate', 'quarantined', 'skipped', 'failed')),
    reason            text,     -- quarantined again: the new reason; skipped/failed: why
    detail            text,
    n_readings        integer,
    n_new             integer,
    new_quarantine_id bigint,   -- quarantined again: the new row
    done_at           timestamptz,
    PRIMARY KEY (job_id, quarantine_id),
    CHECK ((state = 'queued') = (done_at IS NULL))
);
-- the collector's claim walks queued items in job order
CREATE INDEX redecode_items_queued ON redecode_items (job_id, quarantine_id) WHERE state = 'queued';
-- a row's re-decode history, and the row a re-quarantined one came from
CREATE INDEX redecode_items_row ON redecode_items (quarantine_id, job_id);
CREATE INDEX redecode_items_new_row ON redecode_items (new_quarantine_id)
    WHERE new_quarantine_id IS NOT NULL;
-- at most one open request per quarantine row: asking again joins the open one
CREATE UNIQUE INDEX redecode_items_one_open ON redecode_items (quarantine_id)
    WHERE state = 'queued';

-- Tenant settings changed through the API (or the CLI): who, when, what, old and new.
CREATE TABLE tenant_settings_changes (
    change_id  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id  bigint NOT NULL REFERENCES tenants ON DELETE CASCADE,
    changed_at timestamptz NOT NULL DEFAULT now(),
    changed_by text NOT NULL,
    field      text NOT NULL,
    old_value  jsonb,
    new_value  jsonb
);
CREATE INDEX tenant_settings_changes_tenant ON tenant_settings_changes (tenant_id, change_id DESC);
