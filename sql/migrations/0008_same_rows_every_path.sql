-- The SQL function and a plain INSERT accept exactly the rows the producer API does,
-- and every row accepted goes out byte for byte.
--
-- NATS clients strip blanks around a header value (nats-py with str.strip(), and so
-- the relay's frames), so a msg id 'inv-42 ' would be deduplicated as 'inv-42' and an
-- ordering key ' 42' delivered as '42': such values are refused, not altered. Blanks
-- are the characters Python's str.isspace() calls blanks, spelled out so that the
-- rule does not depend on the database's locale (C.UTF-8 does not call U+00A0 one).
-- Mirrors outbox_relay/headers.py and outbox_relay/subjects.py.
CREATE FUNCTION {unpadded_function}(value text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT value !~ '^[\t\n\u000b\f\r\u001c-\u0020\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]'
       AND value !~ '[\t\n\u000b\f\r\u001c-\u0020\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]$'
$$;

-- Header names in the Nats- namespace belong to the server and to the relay: a
-- producer's Nats-Required-Api-Level made the server leave whole batches unanswered,
-- and Nats-Expected-* or Nats-Batch-* ones fight the relay's own. Values unpadded.
CREATE OR REPLACE FUNCTION {headers_valid_function}(headers jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT headers IS NULL OR (
        jsonb_typeof(headers) = 'object'
        AND NOT EXISTS (
            SELECT FROM jsonb_each(headers) AS h(name, value)
            WHERE jsonb_typeof(h.value) <> 'string'
               OR (h.value #>> '{{}}') ~ '[\r\n]'
               OR NOT {unpadded_function}(h.value #>> '{{}}')
               OR h.name !~ '^[-!#$%&''*+.^_`|~0-9A-Za-z]+$'
               OR lower(h.name) LIKE 'nats-%'
               OR lower(h.name) IN ('outbox-ordering-key', 'outbox-sequence')))
$$;

-- Rows already written that these rules refuse go to the dead letters with the
-- reason, so that the constraints below hold for every row; producers wait meanwhile,
-- or a row committed between the move and the constraints would fail the migration.
LOCK TABLE {outbox_table} IN SHARE ROW EXCLUSIVE MODE;
WITH refused AS (
    DELETE FROM {outbox_table} AS o
    WHERE NOT {headers_valid_function}(o.headers)
       OR o.event_id = '' OR NOT {unpadded_function}(o.event_id)
       OR o.event_id ~ '[\u0001-\u001f\u007f]'
       OR NOT {unpadded_function}(o.ordering_key)
       OR o.subject !~ '^[^.*>\u0001-\u0020\u007f\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+(\.[^.*>\u0001-\u0020\u007f\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+)*$'
    RETURNING o.id, o.event_id, o.subject, o.payload, o.headers, o.created_at, o.attempts,
              o.ordering_key
)
INSERT INTO {dead_letter_table}
    (id, event_id, subject, payload, headers, created_at, attempts, reason, ordering_key)
SELECT id, event_id, subject, payload, headers, created_at, attempts,
       'unpublishable as written: a Nats- header, a blank around a msg id, header value '
       || 'or ordering key, a control character in the msg id, or a subject NATS refuses '
       || '(migration 0008)',
       ordering_key
FROM refused;

ALTER TABLE {outbox_table}
    ADD CONSTRAINT event_outbox_msg_id_valid CHECK (
        event_id <> '' AND {unpadded_function}(event_id)
        AND event_id !~ '[\u0001-\u001f\u007f]'),
    ADD CONSTRAINT event_outbox_ordering_key_unpadded CHECK ({unpadded_function}(ordering_key)),
    -- Tokens of anything but dots, wildcards, blanks and control characters: 0001's
    -- rule, in [:space:] and [:cntrl:], read differently under different locales.
    DROP CONSTRAINT event_outbox_subject_valid,
    ADD CONSTRAINT event_outbox_subject_valid CHECK (
        subject ~ '^[^.*>\u0001-\u0020\u007f\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+(\.[^.*>\u0001-\u0020\u007f\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+)*$');
