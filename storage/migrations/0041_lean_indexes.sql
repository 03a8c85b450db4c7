-- 0041: drop the time-only indexes nothing reads (bytes per reading and per uplink).
--
-- create_hypertable made a (time DESC) index on each hypertable. Every query of
-- readings, raw_uplinks and quarantine names a meter, a tenant, a reason or an id (the
-- indexes readings_meter_time, raw_uplinks_meter, quarantine_tenant/_reason/_meter/_by_id
-- serve them); time ranges alone pick chunks by their constraints (chunk exclusion), and
-- dropping chunks (retention) needs no index. Each of these indexes cost an index entry
-- per row: ~17 B per reading (of ~115 B) and ~40 B per raw uplink, and its maintenance
-- on every insert. Dropping an index on a hypertable drops it on every chunk; new
-- chunks no longer get one.
DROP INDEX IF EXISTS readings_read_at_idx;
DROP INDEX IF EXISTS raw_uplinks_received_at_idx;
DROP INDEX IF EXISTS quarantine_received_at_idx;
