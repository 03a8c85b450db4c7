-- 0053: EN 13757-3 compact-frame formats learned from full frames, per tenant.
--
-- A compact frame (CI 79 / 7B / 73) carries a format signature (the CRC-16/EN 13757 of the
-- DIF/VIF header bytes its meter model leaves out) instead of the header: it decodes only
-- through the header a full frame of the same model sent. The collector keeps what a
-- tenant's stored full frames taught here, so every collector process, and the next start,
-- decodes that tenant's compact frames with it. A format is the tenant's alone: one
-- tenant's meters never teach how another tenant's frames are read. The first format
-- stored under a key stays (a later one with other bytes would be a CRC-16 collision; a
-- compact frame read through the wrong one fails its data CRC and is quarantined).
--
-- `swept_at`: when the quarantined compact frames this format can now decode were last
-- queued for re-decoding (storage.compact_formats.sweep): once at once, and once more
-- after the collectors have all read the format, for frames refused meanwhile.

CREATE TABLE compact_formats (
    tenant_id    bigint NOT NULL REFERENCES tenants ON DELETE CASCADE,
    manufacturer text NOT NULL CHECK (length(manufacturer) = 3),
    version      smallint NOT NULL CHECK (version BETWEEN 0 AND 255),
    device_type  smallint NOT NULL CHECK (device_type BETWEEN 0 AND 255),
    signature    integer NOT NULL CHECK (signature BETWEEN 0 AND 65535),
    format       bytea NOT NULL CHECK (octet_length(format) BETWEEN 1 AND 255),
    learned_at   timestamptz NOT NULL DEFAULT now(),
    swept_at     timestamptz,
    PRIMARY KEY (tenant_id, manufacturer, version, device_type, signature)
);
