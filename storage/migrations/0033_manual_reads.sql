-- 0033: manual reads and historical imports: the quality a reading was entered with, who
-- entered it and how; nbm_boundary_read serves an entered reading's own quality.
--
-- A manual read (a meter reader's visit, a customer's photo) or an imported historical
-- read is a row of `readings` like any other (transport 4, import/api), so boundary reads,
-- interval reads, exports and VEE use it with no second lookup. It carries its ESPI
-- QualityOfReading in `readings.quality` (7 manually edited for manual reads; an import
-- states its own); a device reading has NULL there and its quality still comes from its
-- flags (0 valid, 10 questionable). The column is nullable without a default or CHECK, the
-- form TimescaleDB adds to a compressed hypertable; storage.manual_reads checks the codes.
-- Who entered it, when, from what source and with which note live in `manual_reads`, one
-- row per entered reading, keyed as the reading. `readings_meter_time` stays the only key:
-- an entered read never replaces a stored reading of the same instant (the API refuses it
-- with 409), and a device reading arriving later for that exact instant is a duplicate
-- (its frame stays in raw_uplinks).

ALTER TABLE readings ADD COLUMN quality smallint;

-- One row per accepted import: the body's sha256 makes re-posting the same file a no-op.
CREATE TABLE read_imports (
    import_id   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id   bigint NOT NULL REFERENCES tenants ON DELETE CASCADE,
    body_sha256 bytea NOT NULL CHECK (length(body_sha256) = 32),
    entered_by  text NOT NULL CHECK (length(entered_by) BETWEEN 1 AND 128),
    imported_at timestamptz NOT NULL DEFAULT now(),
    n_rows      integer NOT NULL CHECK (n_rows >= 0),
    n_stored    integer NOT NULL CHECK (n_stored >= 0),
    UNIQUE (tenant_id, body_sha256)
);

CREATE TABLE manual_reads (
    meter_id   bigint NOT NULL REFERENCES meters ON DELETE CASCADE,
    read_at    timestamptz NOT NULL,
    source     text NOT NULL CHECK (source IN ('visit', 'customer_photo', 'other', 'import')),
    quality    smallint NOT NULL CHECK (quality BETWEEN 0 AND 19),
    note       text CHECK (length(note) <= 500),
    -- 'key:<api key id>' for the API, 'cli:<name>' for the command line
    entered_by text NOT NULL CHECK (length(entered_by) BETWEEN 1 AND 128),
    entered_at timestamptz NOT NULL DEFAULT now(),
    import_id  bigint REFERENCES read_imports ON DELETE SET NULL,
    PRIMARY KEY (meter_id, read_at)
);
CREATE INDEX manual_reads_import ON manual_reads (import_id) WHERE import_id IS NOT NULL;

-- nbm_boundary_read as in 0021, but an actual read's quality is the reading's own when it
-- was entered with one (readings.quality), else from its flags as before. Same signature
-- and result: replaced in place. Twin: storage/boundary.py (_read).

-- The register of one meter at one instant, and how it was obtained. An inlinable SQL
-- set-returning function (STABLE, one SELECT, not STRICT) so the planner folds it into the
-- caller's query: bulk export stays one set-wise plan walking readings_meter_time.
--
-- bound: the boundary as a query constant (equal to `at` when edge is NULL).
-- edge: 'install' when `at` is the installation instant (the initial register wins),
--       'remove' when it is the removal instant (the final register wins), else NULL.
-- Readings are used only when read_at is within [installed, removed] and not dated after
-- received_at + future_tolerance (a meter clock in the future is excluded, never used).
-- method / basis / quality (ESPI QualityOfReading):
--   actual        the nearest reading within +-actual_window (ties: the earlier)     0
--                 (10 questionable when it carries tamper/meter-error/clock-missing;
--                 an entered reading's own quality, e.g. 7 for a manual read)
--   interpolated  linear between the readings around `at`, exact integer arithmetic,
--                 rounded half up to the register's smallest unit (10^scale m3)      9
--   estimated     no reading after `at`: reference_day = the same span one week
--                 earlier, when the last reading is at most 7 days old (8);
--                 average_daily_use = the rate over up to 30 days before the last reading,
--                 within 45 days of the boundary (12, projected); last_read = no such
--                 history, the last register as is (10)
--   installation / removal   the meter's initial / final register                     0
--   missing       no usable reading at all                                           NULL
-- A drop between the readings around `at` is a rollover at 10^digits units when the
-- implied flow is at most max_flow_ml_h (millilitres per hour); otherwise it is interpolated as is (reverse).
CREATE OR REPLACE FUNCTION nbm_boundary_read(
    p_meter bigint, p_at timestamptz, p_edge text, p_bound timestamptz,
    p_installed timestamptz, p_removed timestamptz, p_initial_ml bigint, p_final_ml bigint,
    p_scale integer, p_digits integer, p_max_flow_ml_h numeric,
    p_actual_window interval, p_future_tolerance interval,
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
      AND r.read_at <= r.received_at + p_future_tolerance
    ORDER BY r.read_at DESC LIMIT 1) p ON true
LEFT JOIN LATERAL (
    SELECT r.read_at, r.register_ml, r.flags, r.quality FROM readings r
    WHERE r.meter_id = p_meter AND r.read_at >= p_bound
      AND r.read_at <= p_bound + least(p_reach, interval '35 days')
      AND r.read_at - p_at > interval '0'
      AND r.read_at - p_installed >= interval '0'
      AND coalesce(p_removed, 'infinity') - r.read_at >= interval '0'
      AND r.read_at <= r.received_at + p_future_tolerance
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
       AND r.read_at >= p_installed AND r.read_at <= r.received_at + p_future_tolerance
       AND r.read_at >= p_bound - p_reach
     ORDER BY abs(extract(epoch FROM r.read_at - (p.read_at - interval '7 days'))), r.read_at
     LIMIT 1) a,
    (SELECT r.register_ml FROM readings r
     WHERE n.read_at IS NULL AND p.read_at IS NOT NULL AND p_edge IS DISTINCT FROM 'remove'
       AND r.meter_id = p_meter
       AND r.read_at BETWEEN p_bound - interval '8 days' AND p_bound - interval '6 days'
       AND r.read_at BETWEEN p_at - interval '7 days' - p_actual_window
                         AND p_at - interval '7 days' + p_actual_window
       AND r.read_at >= p_installed AND r.read_at <= r.received_at + p_future_tolerance
       AND r.read_at >= p_bound - p_reach
     ORDER BY abs(extract(epoch FROM r.read_at - (p_at - interval '7 days'))), r.read_at
     LIMIT 1) b) ld ON true
LEFT JOIN LATERAL (
    SELECT r.read_at, r.register_ml FROM readings r
    WHERE n.read_at IS NULL AND p.read_at IS NOT NULL AND p_edge IS DISTINCT FROM 'remove'
      AND r.meter_id = p_meter AND r.read_at BETWEEN p_bound - interval '45 days' AND p_bound
      AND r.read_at >= p.read_at - interval '30 days' AND r.read_at <= p.read_at - interval '1 day'
      AND r.read_at >= p_installed AND r.read_at <= r.received_at + p_future_tolerance
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
