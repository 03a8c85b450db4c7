-- 0055: announce meters that gain a pending command, so collectors claim only for them.
--
-- Each collector keeps the set of meters that may have a pending command ('queued' or
-- 'sent', storage/command_states.py PENDING) and skips the claim on every other uplink
-- (collector/pending.py). It loads the set once it LISTENs, and afterwards learns of new
-- members from here, on nbmeter_pending_commands when the transaction commits: the
-- payload is meter ids, comma-separated, ascending, at most 300 per notification (a
-- bigint is at most 19 digits: 300 fit pg_notify's 8000 bytes).
--
-- A command becomes pending when it is inserted (`create`, `bulk`: one statement for a
-- whole job, so one statement-level trigger sends a few hundred notifications, not one
-- per command). TRANSITIONS lets no command come back into a pending state; the update
-- trigger announces it anyway should a later transition (or a hand-written UPDATE) do it,
-- or move a pending command to another meter. Its WHEN is evaluated per row without
-- calling the function, so the claims' and answers' updates pay next to nothing.
-- Leaving the set needs no notification: a collector drops a meter at its next full load.

CREATE FUNCTION nbm_notify_commands_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('nbmeter_pending_commands', ids)
    FROM (
        SELECT string_agg(meter_id::text, ',' ORDER BY meter_id) AS ids
        FROM (
            SELECT meter_id, (row_number() OVER (ORDER BY meter_id) - 1) / 300 AS chunk
            FROM (SELECT DISTINCT meter_id FROM inserted
                  WHERE state IN ('queued', 'sent')) AS m
        ) AS numbered
        GROUP BY chunk
    ) AS chunks;
    RETURN NULL;
END $$;

CREATE TRIGGER commands_notify_inserted AFTER INSERT ON commands
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION nbm_notify_commands_inserted();

CREATE FUNCTION nbm_notify_command_pending_again() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('nbmeter_pending_commands', NEW.meter_id::text);
    RETURN NULL;
END $$;

CREATE TRIGGER commands_notify_pending_again AFTER UPDATE OF state, meter_id ON commands
    FOR EACH ROW WHEN (NEW.state IN ('queued', 'sent')
        AND (OLD.state NOT IN ('queued', 'sent') OR OLD.meter_id <> NEW.meter_id))
    EXECUTE FUNCTION nbm_notify_command_pending_again();
