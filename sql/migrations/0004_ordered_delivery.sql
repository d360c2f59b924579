-- Ordered delivery per key (README: Ordering).
--
-- A row may carry an ordering key (NoETL events: their execution id). Rows of one
-- key are published by one relay at a time, in outbox id order, and a failed row
-- holds back the later rows of its key. Keys hash into 64 partitions; a relay owns
-- a partition by holding a session-level advisory lock on it.
--
-- Id order is commit order per key: the enqueue function takes a transaction-level
-- lock on the key before it inserts, so a second transaction writing the same key
-- waits until the first has committed (or rolled back) and only then draws its id.
ALTER TABLE {outbox_table}
    ADD COLUMN ordering_key text,
    ADD COLUMN key_partition smallint GENERATED ALWAYS AS (hashtext(ordering_key) & 63) STORED;
-- A keyed row waits while an earlier row of its key waits for a retry. Only failed
-- rows (attempts > 0) can be waiting, so the claim checks them through this small
-- index instead of every earlier row of the key.
CREATE INDEX event_outbox_failed_by_key ON {outbox_table} (ordering_key, id)
    WHERE ordering_key IS NOT NULL AND attempts > 0;

ALTER TABLE {dead_letter_table} ADD COLUMN ordering_key text;
CREATE INDEX event_outbox_dead_letter_ordering_key ON {dead_letter_table} (ordering_key, id)
    WHERE ordering_key IS NOT NULL;

DROP FUNCTION {enqueue_function}(text, bytea, text, jsonb, integer);
CREATE FUNCTION {enqueue_function}(
    subject text,
    payload bytea,
    event_id text,
    headers jsonb DEFAULT NULL,
    max_payload integer DEFAULT NULL,
    ordering_key text DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    queued_id bigint;
BEGIN
    IF max_payload IS NOT NULL AND octet_length(payload) > max_payload THEN
        RAISE EXCEPTION 'payload of % bytes exceeds the maximum of % bytes (subject %)',
            octet_length(payload), max_payload, subject
            USING ERRCODE = 'program_limit_exceeded';
    END IF;
    IF ordering_key IS NOT NULL THEN
        -- Held to commit: same-key writers commit in the order they draw ids.
        PERFORM pg_advisory_xact_lock({key_lock_class}, hashtext({schema_literal} || '/' || ordering_key));
    END IF;
    INSERT INTO {outbox_table} AS o (event_id, subject, payload, headers, ordering_key)
    VALUES (event_id, subject, payload, headers, ordering_key)
    RETURNING o.id INTO queued_id;
    RETURN queued_id;
END
$$;

-- held: rows waiting behind a dead-lettered row of their key (hold policy).
CREATE OR REPLACE VIEW {lag_view} AS
SELECT
    (SELECT count(*) FROM {outbox_table}) AS pending,
    coalesce(
        extract(epoch FROM now() - (SELECT min(created_at) FROM {outbox_table})), 0
    )::double precision AS oldest_age_seconds,
    (SELECT count(*) FROM {dead_letter_table}) AS dead_letters,
    (SELECT count(*) FROM {outbox_table} AS o
     WHERE o.ordering_key IS NOT NULL
       AND EXISTS (SELECT FROM {dead_letter_table} AS d
                   WHERE d.ordering_key = o.ordering_key AND d.id < o.id)) AS held;
