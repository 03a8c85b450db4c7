-- 0047: OMS / wM-Bus AES key rollover that never strands a meter.
--
-- A new key is staged beside the current one (sealed exactly as 0011's, same associated
-- data "<meter_id>/oms-aes": both are this meter's keys, so moving the blob from one
-- column to the other needs no re-sealing). The collector decrypts with the current key
-- and, for a frame that does not decrypt, with the pending one; the first frame that
-- decrypts only under the pending key confirms it: the pending key becomes the current
-- one and the pending column is cleared (storage.credentials.promote_aes_keys). Until
-- then the meter may still send under its old key, and it is accepted.

ALTER TABLE device_credentials
    ADD COLUMN aes_key_pending_sealed bytea
        CHECK (aes_key_pending_sealed IS NULL OR length(aes_key_pending_sealed) = 12 + 16 + 16),
    ADD COLUMN aes_key_pending_at timestamptz,
    -- the rotate_key command that staged the pending key, and the one whose key is the
    -- current one: a command sent again after its key was confirmed carries that key
    -- again instead of staging another (which its device, answering from memory, would
    -- never take)
    ADD COLUMN aes_key_pending_command bigint,
    ADD COLUMN aes_key_command bigint;

-- The command that starts a rollover (decoder.commands: OMS meters). Its args are empty:
-- the collector stages the new key when it first sends the command and puts it in the
-- envelope (OSCORE-protected, or MQTT over TLS); the key never passes through the API.
-- The device's acknowledgement confirms the key as its first frame under it would.
ALTER TABLE commands DROP CONSTRAINT commands_kind_check;
ALTER TABLE commands ADD CONSTRAINT commands_kind_check
    CHECK (kind IN ('valve', 'clock', 'reporting', 'rotate_key'));
