-- 0034: the decoder's per-frame notes, archived with the raw uplink.
--
-- A frame whose current register reads is stored even when something else in it was odd
-- (a secondary record with bad digits or a "no data" marker, junk after the last record,
-- an L field a few bytes off, a declared security mode on a payload in clear). What the
-- decoder tolerated or left out is a bit set (decoder.columns.FrameFlag, values stable),
-- kept beside the payload so an operator sees which meters send such frames.
-- NULL: archived before 0034 (or not decoded at all); 0: nothing to note.
-- Nullable without a default: TimescaleDB adds such a column to a compressed hypertable.

ALTER TABLE raw_uplinks ADD COLUMN decode_flags integer;
COMMENT ON COLUMN raw_uplinks.decode_flags IS
    'FrameFlag bits (decoder.columns): what the decoder tolerated or left out of the frame';
