-- Closed readings chunks whose indexes were rebuilt packed (storage.compaction): each is
-- done once. Ingest leaves the open day's unique index about 70 % full (random meters
-- split its pages half and half, ~40 B per reading); rebuilt whole with fillfactor 100
-- (0049) it is 28.6 B. A row outlives its chunk harmlessly (retention never drops
-- readings; a chunk's name is never reused).
CREATE TABLE compacted_chunks (
    chunk text PRIMARY KEY,
    compacted_at timestamptz NOT NULL DEFAULT now(),
    index_bytes_before bigint NOT NULL,
    index_bytes_after bigint NOT NULL
);
