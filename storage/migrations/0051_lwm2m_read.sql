-- 0051: the LwM2M Read through the mailbox (decoder.commands, collector.lwm2m).
--
-- A `read` command names an LwM2M path (args {"path": "/3/0/9"}); the collector sends it
-- to the client as a server-initiated GET in its Queue Mode window, and the client's
-- answer (its content decoded where the format allows) becomes the command's result.
-- Only LwM2M clients take one: storage.mailbox refuses a meter that never registered.
ALTER TABLE commands DROP CONSTRAINT commands_kind_check;
ALTER TABLE commands ADD CONSTRAINT commands_kind_check
    CHECK (kind IN ('valve', 'clock', 'reporting', 'rotate_key', 'read'));

-- "is this meter an LwM2M client": any registration, open or closed
CREATE INDEX lwm2m_registrations_meter ON lwm2m_registrations (meter_id);
