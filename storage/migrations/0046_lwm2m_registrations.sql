-- 0046: LwM2M 1.1 registrations (Registration interface, /rd) of meters that speak LwM2M.
--
-- One row per Register; Update refreshes it (lifetime, binding, peer, expiry); De-register
-- and a new Register of the same meter close it (deregistered_at, reason). A row past
-- expires_at is ignored (the client missed its lifetime: no Update, no delivery, no Send).
-- The registration id is the Location-Path the client uses for Update / De-register: a
-- random token, so a plain CoAP lab client cannot guess another client's.

CREATE TABLE lwm2m_registrations (
    registration_id text PRIMARY KEY CHECK (registration_id ~ '^[0-9a-f]{16}$'),
    tenant_id       bigint NOT NULL REFERENCES tenants ON DELETE CASCADE,
    meter_id        bigint NOT NULL REFERENCES meters ON DELETE CASCADE,
    endpoint        text NOT NULL CHECK (length(endpoint) BETWEEN 1 AND 64),
    lwm2m_version   text NOT NULL,
    lifetime_s      integer NOT NULL CHECK (lifetime_s > 0),
    binding         text NOT NULL,           -- 'U', 'UQ' (LwM2M 1.0), ...
    queue_mode      boolean NOT NULL,        -- 1.1: Q parameter, 1.0: Q in the binding
    peer            text NOT NULL,           -- [host]:port the last message came from
    transport       smallint NOT NULL,       -- as raw_uplinks: 1 plain CoAP, 2 OSCORE
    objects         text NOT NULL DEFAULT '',  -- the client's link-format object list
    registered_at   timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz NOT NULL,
    deregistered_at timestamptz,
    reason          text,                    -- why it was closed: deregistered, replaced
    CHECK ((deregistered_at IS NULL) = (reason IS NULL))
);
-- one open registration per meter (a new Register replaces the open one)
CREATE UNIQUE INDEX lwm2m_registrations_open ON lwm2m_registrations (meter_id)
    WHERE deregistered_at IS NULL;
-- a plain CoAP Send is matched to its client by the address it comes from
CREATE INDEX lwm2m_registrations_peer ON lwm2m_registrations (peer, updated_at DESC)
    WHERE deregistered_at IS NULL;
