-- Ordered delivery without producer locks (README: Ordering).
--
-- Producers no longer lock their keys: a transaction writing several keys, in any
-- order, waits for no other producer. Each key's rows are published in the order
-- they became visible to the relay (rows that became visible together: insert
-- order), which is causal: an event written after its transaction saw another
-- event's commit was drawn a larger id, and is visible only once that one is.
DROP FUNCTION {enqueue_function}(text, bytea, text, jsonb, integer, text);
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
    INSERT INTO {outbox_table} AS o (event_id, subject, payload, headers, ordering_key)
    VALUES (event_id, subject, payload, headers, ordering_key)
    RETURNING o.id INTO queued_id;
    RETURN queued_id;
END
$$;

-- The previous release's claim names this column: dropping it stops those relays at
-- their next claim instead of letting them publish keyed rows they cannot order.
-- The claim hashes the key itself.
ALTER TABLE {outbox_table} DROP COLUMN key_partition;

-- One value per claim: Outbox-Sequence is (claim << 20) + place in the claim, so a
-- key's messages carry increasing sequences in the order they were published.
-- Started above every outbox id, the sequence of the previous release.
CREATE SEQUENCE {claim_sequence} AS bigint;
SELECT setval({claim_sequence_literal}::regclass,
              coalesce(pg_sequence_last_value(
                  pg_get_serial_sequence({outbox_table_literal}, 'id')::regclass), 0) / 1048576 + 1);

-- Every claim passes through this fence: once a later migration has run, a relay of
-- this release stops with a clear line rather than claim rows under rules it does
-- not know.
CREATE FUNCTION {claim_fence_function}(relay_version integer) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
DECLARE
    schema_version integer;
BEGIN
    SELECT max(m.version) INTO schema_version FROM {migrations_table} AS m;
    IF schema_version IS DISTINCT FROM relay_version THEN
        RAISE EXCEPTION 'the outbox schema % is at version %, this relay speaks version %',
            {schema_literal}, schema_version, relay_version
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'run a relay of the release that migrated the schema';
    END IF;
    RETURN true;
END
$$;
