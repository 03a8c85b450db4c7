-- 0045: webhook signing secrets are sealed like the other secrets (storage.credentials):
-- AES-256-GCM under the credentials key (NBMETER_CREDENTIALS_KEY), the endpoint id and the
-- purpose 'webhook' as associated data, so a sealed secret opens for its own row only.
--
-- SQL cannot seal (it has no key): rows written before this migration keep their clear
-- `secret` until a dispatcher holding the key starts (storage.webhooks.seal_clear_secrets
-- moves each one to `secret_sealed` and clears `secret`). New rows are sealed on insert.
-- Exactly one of the two columns is set.

ALTER TABLE webhook_endpoints ADD COLUMN secret_sealed bytea;
ALTER TABLE webhook_endpoints ALTER COLUMN secret DROP NOT NULL;
ALTER TABLE webhook_endpoints ADD CONSTRAINT webhook_endpoints_one_secret
    CHECK ((secret IS NULL) <> (secret_sealed IS NULL));
COMMENT ON COLUMN webhook_endpoints.secret IS
    'legacy clear signing secret (before 0045); NULL once sealed into secret_sealed';
COMMENT ON COLUMN webhook_endpoints.secret_sealed IS
    'nonce || AES-256-GCM(credentials key, signing secret), AAD "<endpoint_id>/webhook"';
