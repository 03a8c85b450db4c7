-- 0002: native compression and retention, where the TimescaleDB license allows them.
--
-- Compression and retention policies are Timescale License (TSL) features: the Docker
-- image (timescale/timescaledb) has them, a distribution's Apache-2.0 build does not
-- (`timescaledb.license = 'apache'`), and there calling them raises an error. So this
-- migration checks the license and uses dynamic EXECUTE: on Apache it changes nothing
-- and says so in a NOTICE; every other migration works on both editions.
--
-- readings: compressed after 7 days. Readings older than a week are only read for
--   billing-cycle boundaries and history, per meter and time range, which is exactly
--   what segmentby meter_id / orderby read_at DESC serves (one segment per meter per
--   chunk, min/max read_at per segment). Late uplinks older than 7 days still insert
--   (TimescaleDB 2.11+ decompresses on conflict checks), just more slowly. Never
--   dropped: readings are billing records.
-- raw_uplinks: compressed after 2 days (payloads are only re-read to re-decode recent
--   traffic after a decoder fix), dropped after 400 days: one full annual billing cycle
--   plus a month for disputes and the regulator's re-read window, after which the
--   decoded readings are the record.
-- quarantine: dropped after 400 days for the same reason (it holds rejected payloads,
--   which matter while a reading could still be disputed).

DO $$
BEGIN
    IF current_setting('timescaledb.license', true) IS DISTINCT FROM 'timescale' THEN
        RAISE NOTICE 'nbmeter 0002: timescaledb.license is %, not timescale: skipped compression '
            '(readings after 7 days, raw_uplinks after 2 days) and retention (raw_uplinks, '
            'quarantine after 400 days); storage will grow without bound',
            coalesce(current_setting('timescaledb.license', true), 'unset');
        RETURN;
    END IF;

    EXECUTE 'ALTER TABLE readings SET (timescaledb.compress,'
        ' timescaledb.compress_segmentby = ''meter_id'','
        ' timescaledb.compress_orderby = ''read_at DESC'')';
    EXECUTE 'SELECT add_compression_policy(''readings'', INTERVAL ''7 days'', if_not_exists => true)';

    EXECUTE 'ALTER TABLE raw_uplinks SET (timescaledb.compress,'
        ' timescaledb.compress_segmentby = ''meter_id'','
        ' timescaledb.compress_orderby = ''received_at DESC'')';
    EXECUTE 'SELECT add_compression_policy(''raw_uplinks'', INTERVAL ''2 days'', if_not_exists => true)';

    EXECUTE 'SELECT add_retention_policy(''raw_uplinks'', INTERVAL ''400 days'', if_not_exists => true)';
    EXECUTE 'SELECT add_retention_policy(''quarantine'', INTERVAL ''400 days'', if_not_exists => true)';
END
$$;
