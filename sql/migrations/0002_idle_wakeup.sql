-- Producers notify only while a relay is idle.
--
-- NOTIFY takes a database-wide lock at commit, which serialises committing
-- producers. A relay about to sleep takes the session-level advisory lock
-- {idle_lock} exclusively, then polls once more. Each producer statement tries the
-- same lock shared, for the rest of its transaction:
--
-- * it fails while a relay holds it: that relay sleeps, so the producer notifies;
-- * it succeeds otherwise (every relay is busy and will poll again), and the shared
--   lock, held until the producer commits, keeps any relay from taking the exclusive
--   lock, and so from its last poll before sleeping, until this row is visible.
--
-- So no committed row waits for the poll interval while a relay sleeps.
CREATE OR REPLACE FUNCTION {notify_function}() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT pg_try_advisory_xact_lock_shared({idle_lock}) THEN
        PERFORM pg_notify({channel_literal}, '');
    END IF;
    RETURN NULL;
END
$$;
