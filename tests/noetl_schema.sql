-- A NoETL-shaped schema for the tests, written by us from the facts of NoETL's
-- noetl/database/ddl/postgres/schema_ddl.sql (github noetl/noetl): the objects the
-- relay meets beside its own. {schema} is the test's schema; literal braces doubled.

CREATE SCHEMA {schema};

CREATE TABLE {schema}.resource (
    name varchar PRIMARY KEY,
    meta jsonb
);

CREATE TABLE {schema}.catalog (
    catalog_id bigint PRIMARY KEY,
    path       text NOT NULL,
    version    smallserial NOT NULL,
    kind       varchar NOT NULL REFERENCES {schema}.resource (name),
    content    text,
    layout     jsonb,
    payload    jsonb,
    meta       jsonb,
    created_at timestamp NOT NULL DEFAULT current_timestamp,
    UNIQUE (path, version)
);

-- Ids: (ms since 2024-01-01 << 23) | (shard 1 << 18) | (nextval % 1024).
CREATE SEQUENCE {schema}.snowflake_seq;
CREATE FUNCTION {schema}.snowflake_id() RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    our_epoch bigint := 1704067200000;
    seq_id bigint;
    now_ms bigint;
    shard_id int := 1;
BEGIN
    SELECT nextval({sequence}) % 1024 INTO seq_id;
    now_ms := (extract(epoch FROM clock_timestamp()) * 1000)::bigint;
    RETURN ((now_ms - our_epoch) << 23) | ((shard_id & 31) << 18) | (seq_id & 262143);
END;
$$;
ALTER TABLE {schema}.catalog ALTER COLUMN catalog_id SET DEFAULT {schema}.snowflake_id();

CREATE TABLE {schema}.event (
    execution_id        bigint,
    catalog_id          bigint NOT NULL REFERENCES {schema}.catalog (catalog_id),
    event_id            bigint,
    parent_event_id     bigint,
    parent_execution_id bigint,
    created_at          timestamp NOT NULL DEFAULT current_timestamp,
    event_type          varchar,
    node_id             varchar,
    node_name           varchar,
    node_type           varchar,
    status              varchar,
    duration            double precision,
    context             jsonb,
    result              jsonb,
    meta                jsonb,
    error               text,
    current_index       integer,
    current_item        text,
    worker_id           varchar,
    distributed_state   varchar,
    context_key         varchar,
    context_value       text,
    trace_component     jsonb,
    stack_trace         text,
    CONSTRAINT chk_event_result_shape CHECK (
        result IS NULL
        OR (jsonb_typeof(result) = 'object'
            AND result ? 'status'
            AND jsonb_typeof(result -> 'status') = 'string'
            AND (result - 'status' - 'reference' - 'context') = '{{}}'::jsonb
            AND (NOT (result ? 'reference') OR jsonb_typeof(result -> 'reference') = 'object')
            AND (NOT (result ? 'context') OR jsonb_typeof(result -> 'context') = 'object'))
    ),
    PRIMARY KEY (execution_id, event_id)
) PARTITION BY RANGE (execution_id);

-- The distributed-runtime envelope columns NoETL adds to its event table.
ALTER TABLE {schema}.event
    ADD COLUMN IF NOT EXISTS tenant_id text,
    ADD COLUMN IF NOT EXISTS organization_id text,
    ADD COLUMN IF NOT EXISTS stream_id text,
    ADD COLUMN IF NOT EXISTS stream_version bigint,
    ADD COLUMN IF NOT EXISTS aggregate_id text,
    ADD COLUMN IF NOT EXISTS aggregate_type text,
    ADD COLUMN IF NOT EXISTS schema_name text,
    ADD COLUMN IF NOT EXISTS schema_version text,
    ADD COLUMN IF NOT EXISTS event_time timestamptz,
    ADD COLUMN IF NOT EXISTS ingest_time timestamptz,
    ADD COLUMN IF NOT EXISTS producer text,
    ADD COLUMN IF NOT EXISTS causation_id bigint,
    ADD COLUMN IF NOT EXISTS correlation_id bigint,
    ADD COLUMN IF NOT EXISTS idempotency_key text,
    ADD COLUMN IF NOT EXISTS payload_ref jsonb,
    ADD COLUMN IF NOT EXISTS envelope_checksum text,
    ADD COLUMN IF NOT EXISTS command_id bigint;

CREATE TABLE {schema}.event_pre_2026
    PARTITION OF {schema}.event FOR VALUES FROM (MINVALUE) TO (264905529753600000);
CREATE TABLE {schema}.event_2026_q1
    PARTITION OF {schema}.event FOR VALUES FROM (264905529753600000) TO (297520437657600000);
CREATE TABLE {schema}.event_default PARTITION OF {schema}.event DEFAULT;

CREATE INDEX ON {schema}.event (event_type);
CREATE INDEX ON {schema}.event (created_at);

-- NoETL's own outbox (its Python publisher's), which the relay leaves alone.
CREATE TABLE {schema}.outbox (
    outbox_id     bigserial PRIMARY KEY,
    execution_id  bigint,
    event_id      bigint NOT NULL,
    subject       text,
    payload       jsonb NOT NULL,
    payload_bytes bytea,
    payload_codec text NOT NULL DEFAULT 'arrow-feather',
    status        text NOT NULL DEFAULT 'PENDING'
        CHECK (status IN ('PENDING', 'IN_FLIGHT', 'PUBLISHED', 'FAILED')),
    attempts      integer NOT NULL DEFAULT 0,
    available_at  timestamptz NOT NULL DEFAULT now(),
    locked_at     timestamptz,
    published_at  timestamptz,
    last_error    text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (execution_id, event_id)
);

INSERT INTO {schema}.resource (name) VALUES ('Playbook');
INSERT INTO {schema}.catalog (catalog_id, path, kind) VALUES ({catalog_id}, 'tests/playbook', 'Playbook');
