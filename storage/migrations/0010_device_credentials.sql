-- 0010: per-device transport credentials (collector-owned).
--
-- No secret is stored in the clear. The OSCORE master secret and salt must be usable by
-- the server (OSCORE is symmetric), so they are sealed with AES-256-GCM under the
-- collector's credentials key (NBMETER_CREDENTIALS_KEY), the meter id bound in as
-- associated data so a sealed blob cannot be moved to another meter. MQTT passwords are
-- only ever verified by the broker, so the database keeps a one-way PBKDF2 hash (for audit
-- and rotation), never the password.
--
-- The OSCORE replay window (RFC 8613 §7.4) is persisted in the same transaction that
-- commits the uplink it admitted: after a crash, an uplink that was never committed is
-- still acceptable when the device retransmits it, and a committed one is a replay.

CREATE TABLE device_credentials (
    meter_id            bigint PRIMARY KEY REFERENCES meters ON DELETE CASCADE,
    tenant_id           bigint NOT NULL REFERENCES tenants ON DELETE RESTRICT,
    -- OSCORE: the device's Sender ID (our Recipient ID), in the clear for lookup (it is
    -- sent in the clear in every request's OSCORE option anyway)
    oscore_kid          bytea UNIQUE CHECK (length(oscore_kid) BETWEEN 1 AND 7),
    oscore_sender_id    bytea,     -- our Sender ID towards this device
    oscore_sealed       bytea,     -- AES-256-GCM(nonce || ct) of master secret and salt
    oscore_replay_index bigint,
    oscore_replay_bits  bigint,
    -- MQTT: the broker username and a PBKDF2-SHA512 hash of the password
    mqtt_username       text UNIQUE,
    mqtt_password_hash  text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    rotated_at          timestamptz NOT NULL DEFAULT now(),
    CHECK ((oscore_kid IS NULL) = (oscore_sealed IS NULL))
);
CREATE INDEX device_credentials_tenant ON device_credentials (tenant_id);
