-- 0030: OSCORE credentials take effect at once, answers survive a crash, and the CoAP
-- port knows who shares it (collector-owned).
--
-- 1. Credential changes are announced. Every change of a device's OSCORE context
--    (provisioning, rotation, revocation) and every removal of a meter sends
--    NOTIFY nbmeter_credentials in the transaction that makes it, so it is delivered
--    when (and only when) that transaction commits. Collectors LISTEN and drop their
--    cached contexts (and their negative cache of unknown key ids) at once.
--    Payload: JSON {"meter_id": n, "kids": ["hex", ...]} (old and new key id).
--
-- 2. The answer to each OSCORE uplink is recorded with the uplink, in the transaction
--    that commits it: (kid, partial IV) -> outcome. After a crash, or in another
--    process sharing the port, a retransmission whose sequence number the replay window
--    has seen gets the recorded answer, protected with a fresh server sequence number
--    (RFC 8613 §7.5.1: a server must not reuse the request's nonce for a second
--    answer), instead of 4.01 "Replay detected". The primary key also makes a sequence
--    number count once: a second commit of the same (kid, partial IV) inserts nothing.
--    Replay windows are persisted per context (meter and kid), so an uplink of the old
--    context committed after a rotation does not move the new context's window.
--    Rows are kept a day (a CoAP retransmission comes within EXCHANGE_LIFETIME, 247 s).
--
-- 3. The server's own OSCORE sequence number per context (oscore_server_seq), taken
--    with UPDATE ... RETURNING, so no two processes, and no process after a restart,
--    ever protect two answers with one nonce. Reset with the context (new keys).
--
-- 4. coap_listeners: one row per running collector process and CoAP port, with the
--    fingerprint of its CoAP-relevant settings; a process whose fingerprint differs
--    from the live ones on its host and port refuses to start.

CREATE TABLE oscore_answers (
    kid         bytea NOT NULL,           -- the context (a rotation draws a new kid)
    piv         bigint NOT NULL,          -- the request's Partial IV (sequence number)
    meter_id    bigint NOT NULL,
    status      text NOT NULL,            -- stored, duplicate, quarantined
    reason      text NOT NULL DEFAULT '', -- quarantine reason
    detail      text NOT NULL DEFAULT '',
    answered_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kid, piv)
);
CREATE INDEX oscore_answers_age ON oscore_answers (answered_at);

ALTER TABLE device_credentials
    ADD COLUMN oscore_server_seq bigint NOT NULL DEFAULT 0;

CREATE FUNCTION nbm_notify_credentials() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    kids text[] := ARRAY[]::text[];
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') AND OLD.oscore_kid IS NOT NULL THEN
        kids := kids || encode(OLD.oscore_kid, 'hex');
    END IF;
    IF TG_OP IN ('UPDATE', 'INSERT') AND NEW.oscore_kid IS NOT NULL THEN
        kids := kids || encode(NEW.oscore_kid, 'hex');
    END IF;
    PERFORM pg_notify('nbmeter_credentials', json_build_object(
        'meter_id', CASE WHEN TG_OP = 'DELETE' THEN OLD.meter_id ELSE NEW.meter_id END,
        'kids', kids)::text);
    RETURN NULL;
END $$;

-- only changes of the context itself: the replay window is updated with every commit
CREATE TRIGGER device_credentials_notify_insert AFTER INSERT ON device_credentials
    FOR EACH ROW EXECUTE FUNCTION nbm_notify_credentials();
CREATE TRIGGER device_credentials_notify_delete AFTER DELETE ON device_credentials
    FOR EACH ROW EXECUTE FUNCTION nbm_notify_credentials();
CREATE TRIGGER device_credentials_notify_update AFTER UPDATE ON device_credentials
    FOR EACH ROW WHEN (OLD.oscore_kid IS DISTINCT FROM NEW.oscore_kid
        OR OLD.oscore_sealed IS DISTINCT FROM NEW.oscore_sealed
        OR OLD.oscore_sender_id IS DISTINCT FROM NEW.oscore_sender_id)
    EXECUTE FUNCTION nbm_notify_credentials();

CREATE FUNCTION nbm_notify_meter_removed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('nbmeter_credentials', json_build_object(
        'meter_id', NEW.meter_id,
        'kids', COALESCE((SELECT array_agg(encode(oscore_kid, 'hex'))
                          FROM device_credentials
                          WHERE meter_id = NEW.meter_id AND oscore_kid IS NOT NULL),
                         ARRAY[]::text[]))::text);
    RETURN NULL;
END $$;

CREATE TRIGGER meters_notify_removed AFTER UPDATE ON meters
    FOR EACH ROW WHEN (OLD.removed_at IS DISTINCT FROM NEW.removed_at)
    EXECUTE FUNCTION nbm_notify_meter_removed();

CREATE TABLE coap_listeners (
    instance_id text PRIMARY KEY,
    hostname    text NOT NULL,
    port        integer NOT NULL,
    fingerprint text NOT NULL,
    settings    jsonb NOT NULL,   -- the fingerprinted settings, to say which one differs
    started_at  timestamptz NOT NULL DEFAULT now(),
    seen_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX coap_listeners_port ON coap_listeners (hostname, port, seen_at);
