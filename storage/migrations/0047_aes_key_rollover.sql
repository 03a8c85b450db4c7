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
    ADD COLUMN aes_key_pending_at timestamptz;
