-- 0057: meter_last_seen is kept by one upsert per statement, not one per raw uplink.
--
-- 0043's row trigger ran a PL/pgSQL call and an INSERT ... ON CONFLICT for every archived
-- uplink: 8 µs of PostgreSQL CPU per uplink, two thirds of the raw archive's cost, on a
-- herd of 200,000 OSCORE uplinks in batches of 500. A statement trigger sees the batch's
-- rows in its transition table and upserts each meter once, its newest uplink, in meter
-- order (two collectors' batches of overlapping meters lock them in one order). The
-- collector archives a batch with one COPY, so that is one upsert per batch; a
-- hand-written INSERT of one row is kept as before. Statement triggers with transition
-- tables work on hypertables since TimescaleDB 2.18 (both editions; an INSERT or COPY
-- routed into chunks, compressed ones included, fills the hypertable's transition table;
-- this project runs 2.19).
--
-- A row's update changes no indexed column: at fillfactor 70 it stays on its page (HOT),
-- as for device_credentials (0056).

CREATE FUNCTION nbm_meters_seen() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO meter_last_seen AS s (meter_id, last_uplink_at)
    SELECT meter_id, max(received_at) FROM inserted WHERE meter_id IS NOT NULL
    GROUP BY meter_id ORDER BY meter_id
    ON CONFLICT (meter_id) DO UPDATE SET last_uplink_at = EXCLUDED.last_uplink_at
        WHERE s.last_uplink_at < EXCLUDED.last_uplink_at;
    RETURN NULL;
END $$;

DROP TRIGGER raw_uplinks_seen ON raw_uplinks;
DROP FUNCTION nbm_meter_seen();
CREATE TRIGGER raw_uplinks_seen AFTER INSERT ON raw_uplinks
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION nbm_meters_seen();

ALTER TABLE meter_last_seen SET (fillfactor = 70);
