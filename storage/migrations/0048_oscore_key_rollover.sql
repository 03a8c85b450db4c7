-- 0048: OSCORE context rollover that never strands a meter.
--
-- A rotate_key command for an OSCORE device stages a new context beside the current one:
-- a new master secret and salt AND a new key id (the device's Sender ID). A new kid,
-- because everything about a context is keyed by it: the lookup of a request's context
-- (the kid is in the clear in its OSCORE option), the replay window (persisted per meter
-- and kid), the recorded answers (oscore_answers: kid, partial IV) and the server's
-- sequence numbers. With its own kid the pending context is found by the request itself,
-- never by trial decryption, and a device that restarts its sequence numbers at 0 under
-- the new secret meets no answer recorded for the old context's numbers.
--
-- The pending secret is sealed exactly as the current one (0010: the bare meter id is
-- the associated data), so promotion moves the blob between columns without re-sealing.
-- The collector accepts both contexts until the device confirms the new one: by
-- acknowledging the command (its answer, under either context), or by its first request
-- that verifies under the pending kid. Then the pending context becomes the current one
-- with a fresh replay window and server sequence number, and the old kid is gone (a
-- request under it is refused 4.01, a replay of an old one too).

ALTER TABLE device_credentials
    ADD COLUMN oscore_pending_kid bytea UNIQUE
        CHECK (length(oscore_pending_kid) BETWEEN 1 AND 7),
    ADD COLUMN oscore_pending_sender_id bytea,
    ADD COLUMN oscore_pending_sealed bytea,
    ADD COLUMN oscore_pending_at timestamptz,
    -- the rotate_key command that staged the pending context, and the one whose context
    -- is the current one (as 0047's: a command sent again after its context was confirmed
    -- carries that context again instead of staging another)
    ADD COLUMN oscore_pending_command bigint,
    ADD COLUMN oscore_command bigint,
    ADD CONSTRAINT device_credentials_oscore_pending_whole
        CHECK ((oscore_pending_kid IS NULL) = (oscore_pending_sealed IS NULL)
            AND (oscore_pending_kid IS NULL) = (oscore_pending_sender_id IS NULL)),
    -- a context is staged beside a current one, never alone
    ADD CONSTRAINT device_credentials_oscore_pending_beside
        CHECK (oscore_pending_kid IS NULL OR oscore_kid IS NOT NULL);

-- Announcements (0030) name the pending kid too: a cached "unknown kid" entry for it, or
-- the context it replaces, is dropped when it is staged, promoted or cleared.
CREATE OR REPLACE FUNCTION nbm_notify_credentials() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    kids text[] := ARRAY[]::text[];
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        IF OLD.oscore_kid IS NOT NULL THEN
            kids := kids || encode(OLD.oscore_kid, 'hex');
        END IF;
        IF OLD.oscore_pending_kid IS NOT NULL THEN
            kids := kids || encode(OLD.oscore_pending_kid, 'hex');
        END IF;
    END IF;
    IF TG_OP IN ('UPDATE', 'INSERT') THEN
        IF NEW.oscore_kid IS NOT NULL THEN
            kids := kids || encode(NEW.oscore_kid, 'hex');
        END IF;
        IF NEW.oscore_pending_kid IS NOT NULL THEN
            kids := kids || encode(NEW.oscore_pending_kid, 'hex');
        END IF;
    END IF;
    PERFORM pg_notify('nbmeter_credentials', json_build_object(
        'meter_id', CASE WHEN TG_OP = 'DELETE' THEN OLD.meter_id ELSE NEW.meter_id END,
        'kids', kids)::text);
    RETURN NULL;
END $$;

DROP TRIGGER device_credentials_notify_update ON device_credentials;
CREATE TRIGGER device_credentials_notify_update AFTER UPDATE ON device_credentials
    FOR EACH ROW WHEN (OLD.oscore_kid IS DISTINCT FROM NEW.oscore_kid
        OR OLD.oscore_sealed IS DISTINCT FROM NEW.oscore_sealed
        OR OLD.oscore_sender_id IS DISTINCT FROM NEW.oscore_sender_id
        OR OLD.oscore_pending_kid IS DISTINCT FROM NEW.oscore_pending_kid
        OR OLD.oscore_pending_sealed IS DISTINCT FROM NEW.oscore_pending_sealed)
    EXECUTE FUNCTION nbm_notify_credentials();

CREATE OR REPLACE FUNCTION nbm_notify_meter_removed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('nbmeter_credentials', json_build_object(
        'meter_id', NEW.meter_id,
        'kids', COALESCE((SELECT array_agg(encode(k, 'hex'))
                          FROM device_credentials,
                               unnest(ARRAY[oscore_kid, oscore_pending_kid]) AS k
                          WHERE meter_id = NEW.meter_id AND k IS NOT NULL),
                         ARRAY[]::text[]))::text);
    RETURN NULL;
END $$;
