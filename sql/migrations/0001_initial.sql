-- outbox-relay schema, version 1.
--
-- Placeholders in braces are identifiers and literals filled in with psycopg.sql,
-- so the schema name is configurable and always quoted; literal braces are doubled.

CREATE SCHEMA IF NOT EXISTS {schema};

-- NoETL's own event table is used as it is when present. Otherwise create one with
-- the same shape: partitioned by execution_id, primary key (execution_id, event_id).
CREATE TABLE IF NOT EXISTS {event_table} (
    execution_id        bigint NOT NULL,
    event_id            bigint NOT NULL,
    parent_event_id     bigint,
    parent_execution_id bigint,
    catalog_id          bigint,
    event_type          varchar NOT NULL,
    node_id             varchar,
    node_name           varchar,
    node_type           varchar,
    status              varchar,
    duration            double precision,
    context             jsonb,
    result              jsonb,
    meta                jsonb,
    error               text,
    created_at          timestamp DEFAULT current_timestamp,
    PRIMARY KEY (execution_id, event_id)
) PARTITION BY RANGE (execution_id);

DO $$
BEGIN
    -- Only for a partitioned table without partitions, i.e. the one just created:
    -- NoETL manages the partitions of its own table.
    IF (SELECT relkind FROM pg_class WHERE oid = {event_table_literal}::regclass) = 'p'
       AND NOT EXISTS (SELECT FROM pg_inherits WHERE inhparent = {event_table_literal}::regclass)
    THEN
        EXECUTE format('CREATE TABLE %s PARTITION OF %s DEFAULT',
                       {event_default_partition_literal}, {event_table_literal});
    END IF;
END
$$;

-- One row per message still to publish. Published rows are deleted, so the table
-- stays as small as the backlog.
CREATE TABLE {outbox_table} (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The Nats-Msg-Id: the event id for NoETL events, any unique string otherwise.
    event_id        text NOT NULL
        CONSTRAINT event_outbox_event_id_valid
        CHECK (event_id <> '' AND event_id !~ '[[:cntrl:]]'),
    subject         text NOT NULL
        -- Same rule as outbox_relay.subjects: dot-separated non-empty tokens,
        -- no white space, no control characters, no wildcards.
        CONSTRAINT event_outbox_subject_valid
        CHECK (subject ~ '^[^[:space:][:cntrl:].*>]+(\.[^[:space:][:cntrl:].*>]+)*$'),
    payload         bytea NOT NULL,
    headers         jsonb
        CONSTRAINT event_outbox_headers_object
        CHECK (headers IS NULL OR jsonb_typeof(headers) = 'object'),
    created_at      timestamptz NOT NULL DEFAULT now(),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text
);

-- Producers without a configured shard id lease an id-generator instance number
-- from here once per process (see outbox_relay/ids.py).
CREATE SEQUENCE {instance_sequence} AS bigint;

-- Rows that failed max_attempts times, kept with the reason for an operator.
CREATE TABLE {dead_letter_table} (
    id               bigint PRIMARY KEY,
    event_id         text NOT NULL,
    subject          text NOT NULL,
    payload          bytea NOT NULL,
    headers          jsonb,
    created_at       timestamptz NOT NULL,
    attempts         integer NOT NULL,
    reason           text NOT NULL,
    dead_lettered_at timestamptz NOT NULL DEFAULT now()
);

CREATE VIEW {lag_view} AS
SELECT
    (SELECT count(*) FROM {outbox_table}) AS pending,
    coalesce(
        extract(epoch FROM now() - (SELECT min(created_at) FROM {outbox_table})), 0
    )::double precision AS oldest_age_seconds,
    (SELECT count(*) FROM {dead_letter_table}) AS dead_letters;

-- The one way into the outbox, for producers in any language, inside their own
-- transaction. max_payload guards the relay from rows the server would refuse.
CREATE FUNCTION {enqueue_function}(
    subject text,
    payload bytea,
    event_id text,
    headers jsonb DEFAULT NULL,
    max_payload integer DEFAULT NULL
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
    INSERT INTO {outbox_table} AS o (event_id, subject, payload, headers)
    VALUES (event_id, subject, payload, headers)
    RETURNING o.id INTO queued_id;
    RETURN queued_id;
END
$$;

-- Wake the relay once per inserting statement, however the row got in.
CREATE FUNCTION {notify_function}() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify({channel_literal}, '');
    RETURN NULL;
END
$$;

CREATE TRIGGER event_outbox_notify
AFTER INSERT ON {outbox_table}
FOR EACH STATEMENT EXECUTE FUNCTION {notify_function}();
