-- 0054: readings keyed by int4 seconds: 20 B instead of 28 B per index entry.
--
-- Bytes per reading on the embedded default (no compression: every reading is a heap
-- tuple plus an entry of readings_meter_time, kept forever). After 0049 a reading was a
-- 48 B tuple + 4 B line pointer (52.2 B a reading on 8 kB pages) and an index entry of
-- 8 B header + (int4 meter_id, 4 B pad, 8 B timestamptz) + 4 B line pointer = 28 B: 80.4 B
-- at best, 80.7 B measured on compacted chunks. The index entry is what can shrink: with
-- the time as int4 seconds the key is 8 B, the entry 16 B + 4 B = 20 B. TimescaleDB
-- allows no unique index without the partitioning column, so the time column itself is
-- int4 (an expression index beside a timestamptz column would not be unique-able).
--
-- read_s: whole seconds since 2000-01-01T00:00:00Z (PostgreSQL's own epoch), int4: the
-- times 1931-12-13T20:45:52Z .. 2068-01-19T03:14:07Z. Device readings are whole seconds
-- already (the decoders' unit; ingest refuses dates before 2015 and more than a day
-- ahead); an entered read is kept to the second as well (storage.manual_reads), and one
-- outside that range is refused. The tuple stays 48 B (int4 time, int4 meter, int8
-- register, int4 flags: 20 B of data, an entered read's quality fits in its padding).
-- Measured (bench/cityday.py): 72.5 B per reading compacted.
--
-- SQL speaks timestamptz everywhere else: nbm_at(read_s) is the reading's time;
-- nbm_floor_s(t) / nbm_ceil_s(t) turn a bound into seconds for an index condition:
--   read_at <= t  is  read_s <= nbm_floor_s(t)     read_at > t  is  read_s > nbm_floor_s(t)
--   read_at >= t  is  read_s >= nbm_ceil_s(t)      read_at < t  is  read_s < nbm_ceil_s(t)
-- (exact for any t: a double holds its seconds to well under a microsecond; a bound
-- outside int4 is clamped, so 'infinity' works). All three are IMMUTABLE and inline into
-- the query (no function call per row or per index rescan): an index condition on a
-- query's constant still prunes chunks at executor startup. nbm_now_s() is the
-- hypertable's integer "now" (compression policies).
--
-- The table is rebuilt as in 0049 (a column's type cannot change in place): a new
-- hypertable with the same chunk interval in seconds, the rows copied, the old one dropped,
-- the new one renamed, its unique index built once over the copied rows. A reading whose
-- time had a fraction of a second (an entered read) lands on its whole second; were two
-- of a meter's readings within one second, the earlier one is kept. manual_reads keeps
-- its own timestamptz (joined through nbm_floor_s). The copy holds the table locked for
-- the migration's transaction: on a large installation stop the collectors first.

CREATE FUNCTION nbm_at(s integer) RETURNS timestamptz
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS
$$ SELECT to_timestamp(s::bigint + 946684800) $$;

-- Not STRICT, so that they inline (a STRICT SQL function inlines only if its body is
-- strict, and least/greatest are not): NULL gives NULL through the CASE instead. Their
-- epoch is that of an interval (immutable; a timestamptz's own is only stable).
CREATE FUNCTION nbm_floor_s(t timestamptz) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS
$$ SELECT CASE WHEN t IS NOT NULL THEN least(greatest(
       floor(date_part('epoch', t - timestamptz '2000-01-01 00:00:00+00')),
       -2147483648), 2147483647)::integer END $$;

CREATE FUNCTION nbm_ceil_s(t timestamptz) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS
$$ SELECT CASE WHEN t IS NOT NULL THEN least(greatest(
       ceil(date_part('epoch', t - timestamptz '2000-01-01 00:00:00+00')),
       -2147483648), 2147483647)::integer END $$;

CREATE FUNCTION nbm_now_s() RETURNS integer
LANGUAGE sql STABLE PARALLEL SAFE AS $$ SELECT nbm_floor_s(now()) $$;

CREATE TABLE readings_s (
    read_s      integer NOT NULL,  -- seconds since 2000-01-01T00:00:00Z: nbm_at(read_s)
    meter_id    integer NOT NULL,  -- meters.meter_id (no FK: ingest speed)
    register_ml bigint  NOT NULL CONSTRAINT readings_register_ml_nonnegative
                                 CHECK (register_ml >= 0),
    flags       integer NOT NULL DEFAULT 0,  -- decoder.columns.Flag bits
    quality     smallint                     -- an entered read's ESPI quality (0033)
);

DO $$
DECLARE
    chunk interval;
BEGIN
    SELECT d.time_interval INTO STRICT chunk FROM timescaledb_information.dimensions d
    WHERE d.hypertable_schema = current_schema() AND d.hypertable_name = 'readings'
      AND d.column_name = 'read_at';
    PERFORM create_hypertable('readings_s',
        by_range('read_s', extract(epoch FROM chunk)::integer), create_default_indexes => false);
    PERFORM set_integer_now_func('readings_s', 'nbm_now_s');
    IF EXISTS (SELECT 1 FROM readings
               WHERE read_at < '1931-12-13T20:45:52Z' OR read_at >= '2068-01-19T03:14:08Z') THEN
        RAISE EXCEPTION 'readings before 1931-12-13 or after 2068-01-19 cannot be kept as int4'
            ' seconds: delete them (SELECT * FROM readings WHERE read_at < ''1932-01-01'''
            ' OR read_at > ''2068-01-01'') and migrate again';
    END IF;
END
$$;

-- whole-second readings first (unique as they were), then the few with a fraction
INSERT INTO readings_s (read_s, meter_id, register_ml, flags, quality)
SELECT nbm_floor_s(read_at), meter_id, register_ml, flags, quality FROM readings
WHERE read_at = date_trunc('second', read_at);

DROP INDEX IF EXISTS readings_meter_time;
-- the idempotency key, and the index every cycle-boundary lookup walks (as 0049, packed)
CREATE UNIQUE INDEX readings_s_meter_time ON readings_s (meter_id, read_s DESC)
    WITH (fillfactor = 100);

INSERT INTO readings_s (read_s, meter_id, register_ml, flags, quality)
SELECT nbm_floor_s(read_at), meter_id, register_ml, flags, quality FROM readings
WHERE read_at <> date_trunc('second', read_at)
ORDER BY meter_id, read_at
ON CONFLICT DO NOTHING;

DROP TABLE readings;
ALTER TABLE readings_s RENAME TO readings;
ALTER INDEX readings_s_meter_time RENAME TO readings_meter_time;

-- as 0049: compression segmented by meter where the license has it; Apache: nothing
DO $$
BEGIN
    IF current_setting('timescaledb.license', true) IS DISTINCT FROM 'timescale' THEN
        RETURN;
    END IF;
    EXECUTE 'ALTER TABLE readings SET (timescaledb.compress,'
        ' timescaledb.compress_segmentby = ''meter_id'','
        ' timescaledb.compress_orderby = ''read_s DESC'')';
    EXECUTE 'SELECT add_compression_policy(''readings'', compress_after => 7 * 86400,'
        ' if_not_exists => true)';
END
$$;

-- nbm_boundary_read as in 0049 over read_s: the same arguments, results and plan (an
-- index scan per chunk, chunks pruned at executor startup). Index conditions turn their
-- bounds into seconds; the per-meter filters (`at`, installation, removal) compare
-- nbm_at(read_s) by subtraction as 0049 compared read_at, so they stay filters.
-- Twin: billing.boundary.
CREATE OR REPLACE FUNCTION nbm_boundary_read(
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
-- conditions compare read_s only with p_bound, a constant of the caller's query, so
-- TimescaleDB prunes chunks once per query (startup exclusion) instead of once per meter;
-- `at` itself (an installation or removal instant inside the cycle, p_edge set) and the
-- installed/removed limits are interval filters on purpose. Scanning from p_bound loses
-- nothing: readings between p_bound and an installation are invalid anyway, and so are
-- readings after a removal.
LEFT JOIN LATERAL (
    SELECT nbm_at(r.read_s) AS read_at, r.register_ml, r.flags, r.quality FROM readings r
    WHERE r.meter_id = p_meter AND r.read_s <= nbm_floor_s(p_bound)
      AND r.read_s > nbm_floor_s(p_bound - least(p_reach, interval '35 days'))
      AND nbm_at(r.read_s) - p_at <= interval '0'
      AND nbm_at(r.read_s) - p_installed >= interval '0'
      AND coalesce(p_removed, 'infinity') - nbm_at(r.read_s) >= interval '0'
      AND r.flags & 4096 = 0
    ORDER BY r.read_s DESC LIMIT 1) p ON true
LEFT JOIN LATERAL (
    SELECT nbm_at(r.read_s) AS read_at, r.register_ml, r.flags, r.quality FROM readings r
    WHERE r.meter_id = p_meter AND r.read_s >= nbm_ceil_s(p_bound)
      AND r.read_s <= nbm_floor_s(p_bound + least(p_reach, interval '35 days'))
      AND nbm_at(r.read_s) - p_at > interval '0'
      AND nbm_at(r.read_s) - p_installed >= interval '0'
      AND coalesce(p_removed, 'infinity') - nbm_at(r.read_s) >= interval '0'
      AND r.flags & 4096 = 0
    ORDER BY r.read_s ASC LIMIT 1) n ON true
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
       AND r.meter_id = p_meter
       AND r.read_s BETWEEN nbm_ceil_s(p_bound - interval '15 days') AND nbm_floor_s(p_bound)
       AND r.read_s BETWEEN nbm_ceil_s(p.read_at - interval '7 days' - p_actual_window)
                        AND nbm_floor_s(p.read_at - interval '7 days' + p_actual_window)
       AND r.read_s >= nbm_ceil_s(p_installed) AND r.flags & 4096 = 0
       AND r.read_s >= nbm_ceil_s(p_bound - p_reach)
     ORDER BY abs(extract(epoch FROM nbm_at(r.read_s) - (p.read_at - interval '7 days'))),
              r.read_s
     LIMIT 1) a,
    (SELECT r.register_ml FROM readings r
     WHERE n.read_at IS NULL AND p.read_at IS NOT NULL AND p_edge IS DISTINCT FROM 'remove'
       AND r.meter_id = p_meter
       AND r.read_s BETWEEN nbm_ceil_s(p_bound - interval '8 days')
                        AND nbm_floor_s(p_bound - interval '6 days')
       AND r.read_s BETWEEN nbm_ceil_s(p_at - interval '7 days' - p_actual_window)
                        AND nbm_floor_s(p_at - interval '7 days' + p_actual_window)
       AND r.read_s >= nbm_ceil_s(p_installed) AND r.flags & 4096 = 0
       AND r.read_s >= nbm_ceil_s(p_bound - p_reach)
     ORDER BY abs(extract(epoch FROM nbm_at(r.read_s) - (p_at - interval '7 days'))), r.read_s
     LIMIT 1) b) ld ON true
LEFT JOIN LATERAL (
    SELECT nbm_at(r.read_s) AS read_at, r.register_ml FROM readings r
    WHERE n.read_at IS NULL AND p.read_at IS NOT NULL AND p_edge IS DISTINCT FROM 'remove'
      AND r.meter_id = p_meter
      AND r.read_s BETWEEN nbm_ceil_s(p_bound - interval '45 days') AND nbm_floor_s(p_bound)
      AND r.read_s >= nbm_ceil_s(p.read_at - interval '30 days')
      AND r.read_s <= nbm_floor_s(p.read_at - interval '1 day')
      AND r.read_s >= nbm_ceil_s(p_installed) AND r.flags & 4096 = 0
      AND r.read_s >= nbm_ceil_s(p_bound - p_reach)
    ORDER BY r.read_s ASC LIMIT 1) base ON true
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
