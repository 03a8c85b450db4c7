-- 0043: analytics computed from interval data (storage.analytics): the per-meter day
-- rollup, the per-meter last uplink, district metered areas, and the alarm kinds the
-- analytics raise through the alarm lifecycle of 0039 (so they reach webhooks and MQTT).
--
-- The analytics kinds have flag_bit 0: no reading flag clears them (storage.alarms.sweep
-- skips them); the analytics run itself marks them cleared when a later day (or uplink)
-- shows the condition gone, and the sweep closes them after auto_close_after_s.
-- threshold / periods are the kind's defaults; a tenant's alarm_rules override them.

ALTER TABLE alarm_kinds
    ADD COLUMN threshold integer,   -- the unit is the kind's (see below)
    ADD COLUMN periods   integer CHECK (periods > 0);
ALTER TABLE alarm_rules
    ADD COLUMN periods   integer CHECK (periods > 0);

INSERT INTO alarm_kinds (kind, flag_bit, severity, auto_close_after_s, threshold, periods) VALUES
    -- water: the smallest hourly volume 02:00-05:00 local >= threshold mL on `periods`
    -- nights running (a leak never stops flowing)
    ('night_flow',        0, 'warning', 86400, 5000, 3),
    -- no uplink for `periods` expected reports of `threshold` seconds each
    ('silent',            0, 'warning', 0,     86400, 3),
    -- district: non-revenue water >= threshold % of the bulk volume on `periods` days
    -- running, counted only on days with every meter of the district covered
    ('district_loss',     0, 'major',   86400, 20, 2),
    -- gas: night use as night_flow (no default threshold: off until a tenant sets one,
    -- as space heating draws gas all night), and a day's volume >= threshold mL
    ('gas_night_use',     0, 'warning', 86400, NULL, 3),
    ('gas_overuse',       0, 'warning', 86400, 10000000, 1),
    -- a day's volume >= threshold mL while a valve_closed alarm was open all day
    ('valve_closed_flow', 0, 'major',   86400, 1000, 1);

-- The newest uplink of each meter (any outcome: an authenticated meter that spoke is not
-- silent), kept by a row trigger on the raw archive: one upsert per uplink, not per
-- reading, so the silent-meter check never scans raw_uplinks.
CREATE TABLE meter_last_seen (
    meter_id       bigint PRIMARY KEY,
    last_uplink_at timestamptz NOT NULL
);
INSERT INTO meter_last_seen (meter_id, last_uplink_at)
    SELECT meter_id, max(received_at) FROM raw_uplinks WHERE meter_id IS NOT NULL
    GROUP BY meter_id;

CREATE FUNCTION nbm_meter_seen() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO meter_last_seen AS s (meter_id, last_uplink_at)
    VALUES (NEW.meter_id, NEW.received_at)
    ON CONFLICT (meter_id) DO UPDATE SET last_uplink_at = EXCLUDED.last_uplink_at
        WHERE s.last_uplink_at < EXCLUDED.last_uplink_at;
    RETURN NULL;
END $$;
CREATE TRIGGER raw_uplinks_seen AFTER INSERT ON raw_uplinks
    FOR EACH ROW WHEN (NEW.meter_id IS NOT NULL) EXECUTE FUNCTION nbm_meter_seen();

-- One row per meter and local day (the tenant's time zone), computed from readings by
-- storage.analytics.rollup. A day's boundary register is the newest reading in the hour
-- up to the boundary (interval meters read on the hour); without one, or when the
-- register dropped (rollover or reverse run), volume_ml is NULL: the day is not covered.
CREATE TABLE meter_days (
    meter_id     bigint NOT NULL,
    day          date   NOT NULL,
    tenant_id    bigint NOT NULL,
    n_readings   integer NOT NULL,   -- readings with read_at in [day start, day end)
    start_ml     bigint,
    end_ml       bigint,
    volume_ml    bigint CHECK (volume_ml >= 0),
    -- the smallest volume of an hour between 02:00 and 05:00 local (readings exactly an
    -- hour apart); NULL: no such pair
    night_min_ml bigint CHECK (night_min_ml >= 0),
    PRIMARY KEY (meter_id, day)
);
CREATE INDEX meter_days_tenant_day ON meter_days (tenant_id, day);

-- The tenant-days rolled up, and when (the collector's run rolls each finished day once).
CREATE TABLE analytics_days (
    tenant_id   bigint NOT NULL REFERENCES tenants ON DELETE CASCADE,
    day         date   NOT NULL,
    computed_at timestamptz NOT NULL DEFAULT now(),
    n_meters    integer NOT NULL,
    PRIMARY KEY (tenant_id, day)
);

-- A district metered area: a bulk meter at its inlet and the customer meters behind it.
-- A customer meter belongs to one district at most.
CREATE TABLE districts (
    district_id   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id     bigint NOT NULL REFERENCES tenants ON DELETE CASCADE,
    name          text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    bulk_meter_id bigint NOT NULL REFERENCES meters,
    created_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, name)
);
CREATE UNIQUE INDEX districts_bulk ON districts (bulk_meter_id);
CREATE TABLE district_meters (
    district_id bigint NOT NULL REFERENCES districts ON DELETE CASCADE,
    meter_id    bigint NOT NULL REFERENCES meters,
    PRIMARY KEY (district_id, meter_id)
);
CREATE UNIQUE INDEX district_meters_one ON district_meters (meter_id);

-- The daily water balance of a tenant's districts over [p_from, p_to]: one definition for
-- the API (storage.districts.balance) and the district_loss rule (storage.analytics).
-- Non-revenue water = bulk_ml - customers_ml; it means what it says only when the bulk
-- meter and every customer meter are covered that day (n_covered = n_customers).
CREATE FUNCTION nbm_district_balance(p_tenant bigint, p_from date, p_to date)
RETURNS TABLE (district_id bigint, bulk_meter_id bigint, day date, bulk_ml bigint,
               n_customers bigint, n_covered bigint, customers_ml bigint)
LANGUAGE sql STABLE AS $$
    SELECT d.district_id, d.bulk_meter_id, g.day::date, bd.volume_ml,
           count(dm.meter_id), count(cd.volume_ml), coalesce(sum(cd.volume_ml), 0)::bigint
    FROM districts d
    CROSS JOIN generate_series(p_from, p_to, interval '1 day') AS g(day)
    LEFT JOIN meter_days bd ON bd.meter_id = d.bulk_meter_id AND bd.day = g.day::date
    LEFT JOIN district_meters dm ON dm.district_id = d.district_id
    LEFT JOIN meter_days cd ON cd.meter_id = dm.meter_id AND cd.day = g.day::date
    WHERE d.tenant_id = p_tenant
    GROUP BY d.district_id, d.bulk_meter_id, g.day, bd.volume_ml
$$;
