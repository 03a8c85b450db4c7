-- 0031: API keys can expire, and every change to a key reaches every API process at once.

-- NULL: the key never expires. An expired key is refused with 401 "expired", as a revoked
-- one is with "revoked"; both rows stay for the audit trail.
ALTER TABLE api_keys ADD COLUMN expires_at timestamptz;
ALTER TABLE api_keys ADD CONSTRAINT api_keys_expires_after_creation
    CHECK (expires_at IS NULL OR expires_at > created_at);

-- API processes cache verified keys. Any change to a key row (a revocation through the API,
-- the CLI or plain SQL; a new expiry or scopes; a delete, also by its tenant's cascade)
-- notifies channel nbmeter_api_keys with the key_id, delivered to listeners at commit;
-- a TRUNCATE notifies '*' (forget every key). storage.apikeys.listen_key_changes listens.
CREATE FUNCTION nbm_api_key_changed() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    IF TG_LEVEL = 'STATEMENT' THEN
        PERFORM pg_notify('nbmeter_api_keys', '*');
    ELSE
        PERFORM pg_notify('nbmeter_api_keys', OLD.key_id);
    END IF;
    RETURN NULL;
END
$fn$;
CREATE TRIGGER api_keys_changed AFTER UPDATE OR DELETE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION nbm_api_key_changed();
CREATE TRIGGER api_keys_truncated AFTER TRUNCATE ON api_keys
    FOR EACH STATEMENT EXECUTE FUNCTION nbm_api_key_changed();
