-- 0011: per-meter AES-128 keys for OMS / wireless M-Bus payload encryption (collector-owned).
--
-- OMS security mode 5 (AES-128-CBC) and ELL AES-128-CTR frames decrypt only with the
-- meter's own key (OMS vol. 2 §9). The collector must use the key, so it cannot be hashed:
-- like the OSCORE secrets (0010) it is sealed with AES-256-GCM under the collector's
-- credentials key (NBMETER_CREDENTIALS_KEY), nonce || ciphertext, and the associated data
-- binds it to its meter and purpose ("<meter_id>/oms-aes"), so a sealed key cannot be
-- moved to another meter or swapped with the OSCORE blob of the same row. No API route
-- reads this column.
--
-- A meter with only an AES key (say OMS over MQTT) has a credentials row without OSCORE,
-- which 0010's CHECK already allows (kid and sealed secret both NULL).

ALTER TABLE device_credentials
    ADD COLUMN aes_key_sealed bytea
        CHECK (aes_key_sealed IS NULL OR length(aes_key_sealed) = 12 + 16 + 16);
-- 12-byte nonce + 16-byte key + 16-byte GCM tag
