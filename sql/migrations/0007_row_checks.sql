-- Every row that reaches the outbox, by any path, is one the relay can send.
--
-- Same rules as outbox_relay/headers.py and outbox_relay/subjects.py, enforced here
-- because CHECK constraints hold for every writer: the SQL function, a plain INSERT,
-- a dead letter retried. The relay still treats any row it cannot send as that row's
-- failure (the last line of defence), but no row gets in that must end that way.

-- Header values are one-line strings, names RFC 7230 tokens, none of the relay's own.
CREATE FUNCTION {headers_valid_function}(headers jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT headers IS NULL OR (
        jsonb_typeof(headers) = 'object'
        AND NOT EXISTS (
            SELECT FROM jsonb_each(headers) AS h(name, value)
            WHERE jsonb_typeof(h.value) <> 'string'
               OR (h.value #>> '{{}}') ~ '[\r\n]'
               OR h.name !~ '^[-!#$%&''*+.^_`|~0-9A-Za-z]+$'
               OR lower(h.name) IN ('nats-msg-id', 'nats-expected-stream',
                                    'outbox-ordering-key', 'outbox-sequence')))
$$;

-- Bytes the server counts against max_payload for this row: the payload and every
-- header the relay sends, with room for the longest stream name (255 bytes) and
-- outbox id (19 digits). Mirrors outbox_relay.headers.header_overhead.
CREATE FUNCTION {wire_size_function}(
    event_id text, headers jsonb, ordering_key text, payload_bytes bigint
) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT payload_bytes
        + length('NATS/1.0' || E'\r\n' || E'\r\n')
        + length('Nats-Msg-Id: ' || E'\r\n') + octet_length(event_id)
        + length('Nats-Expected-Stream: ' || E'\r\n') + 255
        + CASE WHEN ordering_key IS NULL THEN 0
               ELSE length('Outbox-Ordering-Key: ' || E'\r\n') + octet_length(ordering_key)
                    + length('Outbox-Sequence: ' || E'\r\n') + 19 END
        + coalesce((SELECT sum(octet_length(h.name) + 4 + octet_length(h.value #>> '{{}}'))
                    FROM jsonb_each(CASE WHEN jsonb_typeof(headers) = 'object'
                                         THEN headers END) AS h(name, value)), 0)
$$;

-- Rows written before these rules, that the relay could never send, go to the dead
-- letters with the reason, so the constraints below hold for every row.
WITH unsendable AS (
    DELETE FROM {outbox_table} AS o
    WHERE NOT {headers_valid_function}(o.headers)
       OR octet_length(o.subject) > 4000
       OR o.ordering_key ~ '[\r\n]'
       OR {wire_size_function}(o.event_id, o.headers, o.ordering_key, octet_length(o.payload))
          > 67108864
    RETURNING o.id, o.event_id, o.subject, o.payload, o.headers, o.created_at, o.attempts,
              o.ordering_key
)
INSERT INTO {dead_letter_table}
    (id, event_id, subject, payload, headers, created_at, attempts, reason, ordering_key)
SELECT id, event_id, subject, payload, headers, created_at, attempts,
       'unpublishable: headers not one-line strings, subject over 4000 bytes, a '
       || 'multi-line ordering key or over 64 MiB (migration 0007)',
       ordering_key
FROM unsendable;

ALTER TABLE {outbox_table}
    ADD CONSTRAINT event_outbox_headers_valid CHECK ({headers_valid_function}(headers)),
    -- A subject travels in the publish's control line, which nats-server caps at
    -- 4096 bytes and answers by dropping the connection.
    ADD CONSTRAINT event_outbox_subject_length CHECK (octet_length(subject) <= 4000),
    -- The key is sent as a header value.
    ADD CONSTRAINT event_outbox_ordering_key_valid CHECK (ordering_key !~ '[\r\n]'),
    -- 64 MiB is the largest max_payload nats-server accepts; the relay dead-letters
    -- rows over the server's actual max_payload, the producer refuses them.
    ADD CONSTRAINT event_outbox_wire_size CHECK (
        {wire_size_function}(event_id, headers, ordering_key, octet_length(payload))
        <= 67108864);
