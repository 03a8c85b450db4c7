-- 0038: operator IoT platform push ingest (OneNET / OceanConnect HTTP push), and DTLS-PSK
-- credentials of devices that speak coaps:// (both: issue 14, "let in the meters that exist").
--
-- A meter reached through an operator's platform is known there by the platform's own
-- device identity (a device id or the module's IMEI). `platform_devices` maps that
-- identity to the meter, per tenant and platform; a push naming an identity not listed is
-- quarantined as `unknown_device`. `platform_secrets` holds each tenant's endpoint secret
-- per platform (the token the platform signs its pushes with, or carries in the callback
-- URL). The platform computes a signature from it, so the collector needs it in the clear:
-- it is sealed with AES-256-GCM under the credentials key (as OSCORE secrets are, 0010),
-- the tenant id and platform bound in as associated data. Shown once when created.

CREATE TABLE platform_devices (
    tenant_id          bigint NOT NULL REFERENCES tenants ON DELETE CASCADE,
    platform           text   NOT NULL CHECK (platform IN ('onenet', 'oceanconnect', 'ctwing')),
    platform_device_id text   NOT NULL CHECK (length(platform_device_id) BETWEEN 1 AND 128),
    meter_id           bigint NOT NULL REFERENCES meters ON DELETE CASCADE,
    created_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, platform, platform_device_id),
    UNIQUE (meter_id, platform)  -- a meter has one identity per platform
);

CREATE TABLE platform_secrets (
    tenant_id     bigint NOT NULL REFERENCES tenants ON DELETE CASCADE,
    platform      text   NOT NULL CHECK (platform IN ('onenet', 'oceanconnect', 'ctwing')),
    secret_sealed bytea  NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    rotated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, platform)
);

-- DTLS 1.2 PSK (coaps://, RFC 6347 / RFC 4279) per device: the PSK identity the device
-- sends in its ClientKeyExchange (in the clear, so stored in the clear for lookup) and
-- the pre-shared key, sealed like the OSCORE secret (meter id and purpose 'dtls-psk' as
-- associated data). Shown once when provisioned.
CREATE TABLE dtls_credentials (
    meter_id      bigint PRIMARY KEY REFERENCES meters ON DELETE CASCADE,
    tenant_id     bigint NOT NULL REFERENCES tenants ON DELETE CASCADE,
    psk_identity  text   NOT NULL UNIQUE CHECK (length(psk_identity) BETWEEN 1 AND 128),
    psk_sealed    bytea  NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    rotated_at    timestamptz NOT NULL DEFAULT now()
);
-- collectors read new and rotated keys incrementally (rotated_at after their last read)
CREATE INDEX dtls_credentials_rotated ON dtls_credentials (rotated_at);

-- a revoked (deleted) DTLS credential is announced on nbmeter_credentials (0030's channel
-- and payload, no OSCORE key ids) when its transaction commits, so collectors forget the
-- key at once; a removed meter is announced already by 0030's meters trigger
CREATE FUNCTION nbm_notify_dtls_revoked() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('nbmeter_credentials', json_build_object(
        'meter_id', OLD.meter_id, 'kids', ARRAY[]::text[])::text);
    RETURN NULL;
END $$;
CREATE TRIGGER dtls_credentials_notify_delete AFTER DELETE ON dtls_credentials
    FOR EACH ROW EXECUTE FUNCTION nbm_notify_dtls_revoked();
