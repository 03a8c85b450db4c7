-- 0049: readings packed for bytes per reading: no per-uplink columns, no padding.
--
-- On the embedded default (TimescaleDB Apache edition: no compression) every reading is a
-- heap tuple plus an entry of readings_meter_time, kept forever. Before: meter_id bigint,
-- read_at, register_ml, flags int4, transport int2, received_at, quality int2: 24 B tuple
-- header (23 B + the null bitmap of quality, MAXALIGNed) + 48 B data (8+8+8+4+2, 2 B pad,
-- +8) = 72 B, plus its 4 B line pointer. After: read_at, register_ml, meter_id int4, flags
-- int4, quality int2: 24 B header + 24 B data (8+8+4+4; quality is NULL for device
-- readings and takes no space) = 48 B + 4 B line pointer, 157 tuples per 8 kB page
-- (8168 / 52) = 52.2 B per reading; an entered read (quality set) is 56 B.
--
-- What went, and where it lives now:
-- - transport and received_at are facts of the uplink, and raw_uplinks keeps both per
--   uplink. Nothing read readings.transport (an entered read is known by its manual_reads
--   row and its quality); received_at served one rule: a reading dated more than the
--   future tolerance (5 min) after it was received is a clock running ahead and billing
--   leaves it out. Ingest already rejects dates more than a day ahead (clock_future
--   quarantine), which does not cover 5 min..1 day, so ingest now sets the flag bit
--   4096 (decoder.columns.Flag.CLOCK_AHEAD, storage.rows.FUTURE_TOLERANCE_S) and billing
--   (nbm_boundary_read below, billing.boundary, billing.vee) tests the bit instead. The
--   copy below sets it from the stored received_at with the shipped 5 min tolerance.
-- - meter_id is int4 here: meters.meter_id stays bigint (every other table and the API),
--   and a CHECK on meters keeps ids below 2^31 (2.1 billion meters; ingest writes only
--   known meters). In the index the key is (int4, timestamptz) = 4 + 4 pad + 8: its entry
--   is 24 B + 4 B line pointer as with bigint, so the index gains nothing; the heap saves 8.
--
-- The table is rebuilt (a column type and order cannot change in place): a new hypertable
-- with the same chunk interval, the rows copied over, the old one dropped, the new renamed
-- and its unique index built once over the copied rows. Nothing else is attached to
-- readings: no trigger, view, foreign key or continuous aggregate (0001..0047); SQL
-- functions name it by text and find the new table; compression (licensed edition only,
-- as 0002) is set again. The copy holds the table locked for the migration's transaction:
-- on a large installation stop the collectors first (they would wait, not fail).

ALTER TABLE meters ADD CONSTRAINT meters_meter_id_int4 CHECK (meter_id BETWEEN 1 AND 2147483647);

CREATE TABLE readings_packed (
    read_at     timestamptz NOT NULL,
    register_ml bigint      NOT NULL CONSTRAINT readings_register_ml_nonnegative
                                     CHECK (register_ml >= 0),
    meter_id    integer     NOT NULL,  -- meters.meter_id (no FK: ingest speed)
    flags       integer     NOT NULL DEFAULT 0,  -- decoder.columns.Flag bits
    quality     smallint                         -- an entered read's ESPI quality (0033)
);

DO $$
DECLARE
    chunk interval;
BEGIN
    SELECT d.time_interval INTO STRICT chunk FROM timescaledb_information.dimensions d
    WHERE d.hypertable_schema = current_schema() AND d.hypertable_name = 'readings'
      AND d.column_name = 'read_at';
    PERFORM create_hypertable('readings_packed', by_range('read_at', chunk),
                              create_default_indexes => false);
END
$$;

INSERT INTO readings_packed (read_at, register_ml, meter_id, flags, quality)
SELECT read_at, register_ml, meter_id,
       CASE WHEN read_at > received_at + interval '300 seconds' THEN flags | 4096
            ELSE flags & ~4096 END,
       quality
FROM readings;

DROP TABLE readings;
ALTER TABLE readings_packed RENAME TO readings;
-- the idempotency key, and the index every cycle-boundary lookup walks (as 0001). Leaf
-- pages are built full (fillfactor 100, the default is 90): an index built over a chunk
-- (here, or a REINDEX of a closed day's chunk) is 28.6 B per reading instead of 31.7 B.
-- Ingest's random-meter inserts into the open chunk split pages half and half whatever
-- the fillfactor (~70% full: ~40 B per reading). Chunks inherit the setting.
CREATE UNIQUE INDEX readings_meter_time ON readings (meter_id, read_at DESC)
    WITH (fillfactor = 100);

-- as 0002: compression segmented by meter where the license has it; Apache: nothing
DO $$
BEGIN
    IF current_setting('timescaledb.license', true) IS DISTINCT FROM 'timescale' THEN
        RETURN;
    END IF;
    EXECUTE 'ALTER TABLE readings SET (timescaledb.compress,'
        ' timescaledb.compress_segmentby = ''meter_id'','
        ' timescaledb.compress_orderby = ''read_at DESC'')';
    EXECUTE 'SELECT add_compression_policy(''readings'', INTERVAL ''7 days'', if_not_exists => true)';
END
$$;

-- nbm_boundary_read as in 0033, but a reading is usable when it is not flagged clock ahead
-- (flags & 4096) instead of "read_at <= received_at + p_future_tolerance", so the
-- tolerance argument goes: dropped and created again (CREATE OR REPLACE cannot change the
-- arguments). Twin: billing.boundary (History.boundary_read).
DROP FUNCTION nbm_boundary_read(bigint, timestamptz, text, timestamptz, timestamptz, timestamptz,
    bigint, bigint, integer, integer, numeric, interval, interval, interval);

CREATE FUNCTION nbm_boundary_read(
    p_meter bigint, p_at timestamptz, p_edge text, p_bound timestamptz,
    p_installed timestamptz, p_removed timestamptz, p_initial_ml bigint, p_final_ml bigint,
    p_scale integer, p_digits integer, p_max_flow_ml_h numeric,
    p_actual_window interval,
    p_reach interval DEFAULT interval '45 days')
RETURNS TABLE (
    register_ml bigint, method text, basis text, quality smallint, basis_at timestamptz,
    prev_at timestamptz, next_at timestamptz, rolled_over boolean, used_flags integer)
LANGUAGE sql STABLE PARALLEL SAFE AS $fn$
SELECT
    CASE k.how
        WHEN 'installation' THEN p_initial_ml
        WHEN 'removal' THEN p_final_ml
        WHEN 'actual_prev' THEN p.register_ml
        WHEN 'actual_next' THEN n.register_ml
        WHEN 'interpolated' THEN (mod(p.register_ml + c.unit * (
                div(2 * w.dr * w.dt_at + w.dt * c.unit, 2 * w.dt * c.unit)
                - (mod(2 * w.dr * w.dt_at + w.dt * c.unit, 2 * w.dt * c.unit) < 0)::int
            ), c.modulus))::bigint
        WHEN 'reference_day' THEN mod(p.register_ml + mod(ld.b_ml - ld.a_ml + c.modulus, c.modulus),
                                      c.modulus)::bigint
        WHEN 'average_daily_use' THEN (mod(p.register_ml + c.unit * (
                div(2 * e.used * e.dt_at + e.dt * c.unit, 2 * e.dt * c.unit)), c.modulus))::bigint
        WHEN 'last_read' THEN p.register_ml
    END,
    CASE
        WHEN k.how IN ('actual_prev', 'actual_next') THEN 'actual'
        WHEN k.how IN ('reference_day', 'average_daily_use', 'last_read') THEN 'estimated'
        ELSE k.how
    END,
    CASE WHEN k.how IN ('reference_day', 'average_daily_use', 'last_read') THEN k.how END,
    (CASE k.how
        WHEN 'actual_prev' THEN coalesce(p.quality, CASE WHEN p.flags & 832 <> 0 THEN 10 ELSE 0 END)
        WHEN 'actual_next' THEN coalesce(n.quality, CASE WHEN n.flags & 832 <> 0 THEN 10 ELSE 0 END)
        WHEN 'installation' THEN 0 WHEN 'removal' THEN 0
        WHEN 'interpolated' THEN 9 WHEN 'reference_day' THEN 8
        WHEN 'average_daily_use' THEN 12 WHEN 'last_read' THEN 10
    END)::smallint,
    CASE k.how
        WHEN 'actual_prev' THEN p.read_at WHEN 'actual_next' THEN n.read_at
        WHEN 'installation' THEN p_installed WHEN 'removal' THEN p_removed
        WHEN 'missing' THEN NULL ELSE p.read_at
    END,
    p.read_at, n.read_at,
    k.how = 'interpolated' AND w.wrapped,
    CASE k.how WHEN 'actual_prev' THEN p.flags WHEN 'actual_next' THEN n.flags END
FROM (SELECT power(10::numeric, p_scale + 6) AS unit,
             power(10::numeric, p_digits + p_scale + 6) AS modulus) c
-- The neighbours of `at`, looked for within 35 days of p_bound (a meter silent for longer
-- than a cycle is 'missing': it needs a visit, not a bill from stale history). Index
-- conditions compare read_at only with p_bound, a constant of the caller's query, so
-- TimescaleDB prunes chunks once per query (startup exclusion) instead of once per meter;
-- `at` itself (an installation or removal instant inside the cycle, p_edge set) and the
-- installed/removed limits are interval filters on purpose. Scanning from p_bound loses
-- nothing: readings between p_bound and an installation are invalid anyway, and so are
-- readings after a removal.
LEFT JOIN LATERAL (
    SELECT r.read_at, r.register_ml, r.flags, r.quality FROM readings r
    WHERE r.meter_id = p_meter AND r.read_at <= p_bound
      AND r.read_at > p_bound - least(p_reach, interval '35 days')
      AND r.read_at - p_at <= interval '0'
      AND r.read_at - p_installed >= interval '0'
      AND coalesce(p_removed, 'infinity') - r.read_at >= interval '0'
      AND r.flags & 4096 = 0
    ORDER BY r.read_at DESC LIMIT 1) p ON true
LEFT JOIN LATERAL (
    SELECT r.read_at, r.register_ml, r.flags, r.quality FROM readings r
    WHERE r.meter_id = p_meter AND r.read_at >= p_bound
      AND r.read_at <= p_bound + least(p_reach, interval '35 days')
      AND r.read_at - p_at > interval '0'
      AND r.read_at - p_installed >= interval '0'
      AND coalesce(p_removed, 'infinity') - r.read_at >= interval '0'
      AND r.flags & 4096 = 0
    ORDER BY r.read_at ASC LIMIT 1) n ON true
CROSS JOIN LATERAL (
    SELECT (n.register_ml - p.register_ml)::numeric AS raw,
           (extract(epoch FROM n.read_at - p.read_at) * 1000000)::numeric AS dt,
           (extract(epoch FROM p_at - p.read_at) * 1000000)::numeric AS dt_at) d
CROSS JOIN LATERAL (
    SELECT d.dt, d.dt_at,
           d.raw < 0 AND (d.raw + c.modulus) * 3600000000 <= p_max_flow_ml_h * d.dt AS wrapped,
           CASE WHEN d.raw < 0 AND (d.raw + c.modulus) * 3600000000 <= p_max_flow_ml_h * d.dt
                THEN d.raw + c.modulus ELSE d.raw END AS dr) w
-- estimation inputs, fetched only when there is no reading after `at` (one-time filters)
LEFT JOIN LATERAL (
    SELECT a.register_ml AS a_ml, b.register_ml AS b_ml FROM
    (SELECT r.register_ml FROM readings r
     WHERE n.read_at IS NULL AND p.read_at IS NOT NULL AND p_edge IS DISTINCT FROM 'remove'
       AND p.read_at >= p_bound - interval '7 days'
       AND r.meter_id = p_meter AND r.read_at BETWEEN p_bound - interval '15 days' AND p_bound
       AND r.read_at BETWEEN p.read_at - interval '7 days' - p_actual_window
                         AND p.read_at - interval '7 days' + p_actual_window
       AND r.read_at >= p_installed AND r.flags & 4096 = 0
       AND r.read_at >= p_bound - p_reach
     ORDER BY abs(extract(epoch FROM r.read_at - (p.read_at - interval '7 days'))), r.read_at
     LIMIT 1) a,
    (SELECT r.register_ml FROM readings r
     WHERE n.read_at IS NULL AND p.read_at IS NOT NULL AND p_edge IS DISTINCT FROM 'remove'
       AND r.meter_id = p_meter
       AND r.read_at BETWEEN p_bound - interval '8 days' AND p_bound - interval '6 days'
       AND r.read_at BETWEEN p_at - interval '7 days' - p_actual_window
                         AND p_at - interval '7 days' + p_actual_window
       AND r.read_at >= p_installed AND r.flags & 4096 = 0
       AND r.read_at >= p_bound - p_reach
     ORDER BY abs(extract(epoch FROM r.read_at - (p_at - interval '7 days'))), r.read_at
     LIMIT 1) b) ld ON true
LEFT JOIN LATERAL (
    SELECT r.read_at, r.register_ml FROM readings r
    WHERE n.read_at IS NULL AND p.read_at IS NOT NULL AND p_edge IS DISTINCT FROM 'remove'
      AND r.meter_id = p_meter AND r.read_at BETWEEN p_bound - interval '45 days' AND p_bound
      AND r.read_at >= p.read_at - interval '30 days' AND r.read_at <= p.read_at - interval '1 day'
      AND r.read_at >= p_installed AND r.flags & 4096 = 0
       AND r.read_at >= p_bound - p_reach
    ORDER BY r.read_at ASC LIMIT 1) base ON true
CROSS JOIN LATERAL (
    SELECT mod((p.register_ml - base.register_ml)::numeric + c.modulus, c.modulus) AS used,
           (extract(epoch FROM p.read_at - base.read_at) * 1000000)::numeric AS dt,
           (extract(epoch FROM p_at - p.read_at) * 1000000)::numeric AS dt_at) e
CROSS JOIN LATERAL (
    SELECT CASE
        WHEN p_edge = 'install' AND p_initial_ml IS NOT NULL THEN 'installation'
        WHEN p_edge = 'remove' AND p_final_ml IS NOT NULL THEN 'removal'
        WHEN p.read_at IS NOT NULL AND p_at - p.read_at <= p_actual_window
             AND (n.read_at IS NULL OR p_at - p.read_at <= n.read_at - p_at) THEN 'actual_prev'
        WHEN n.read_at IS NOT NULL AND (n.read_at - p_at <= p_actual_window
             OR (p.read_at IS NULL AND p_edge = 'install')) THEN 'actual_next'
        WHEN p.read_at IS NOT NULL AND n.read_at IS NOT NULL THEN 'interpolated'
        WHEN ld.b_ml IS NOT NULL AND ld.a_ml IS NOT NULL THEN 'reference_day'
        WHEN base.read_at IS NOT NULL THEN 'average_daily_use'
        WHEN p.read_at IS NOT NULL THEN 'last_read'
        ELSE 'missing'
    END AS how) k
$fn$;
