-- Named queries. Each starts with a line "-- name: <query_name>"; the text up to the
-- next such line is the query. Braces hold identifiers filled in with psycopg.sql.

-- name: create_migrations_table
CREATE SCHEMA IF NOT EXISTS {schema};
CREATE TABLE IF NOT EXISTS {migrations_table} (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- name: lock_migrations
-- Serialises concurrent `migrate` runs; released at commit.
SELECT pg_advisory_xact_lock(hashtextextended(%(lock_key)s, 0));

-- name: applied_migrations
SELECT version FROM {migrations_table} ORDER BY version;

-- name: record_migration
INSERT INTO {migrations_table} (version, name) VALUES (%(version)s, %(name)s);

-- name: table_exists
SELECT to_regclass(%(table)s) IS NOT NULL;

-- name: schema_version
SELECT coalesce(max(version), 0) FROM {migrations_table};

-- name: claim_batch
-- Row locks are the claim: they last until the batch's transaction ends, so a relay
-- that dies (or whose session is killed) releases its rows to the others at once.
--
-- Ordered mode (sql/migrations/0005_causal_ordering.sql): a keyed row is claimed
-- only by the relay owning its key's partition, and only when no earlier row of its
-- key waits for a retry (a failed row: attempts > 0) or, with the hold policy, sits
-- in the dead letters. Each claim draws one claim number for Outbox-Sequence, and
-- passes the fence that stops a relay older than the schema.
--
-- The batch is bounded by rows and by payload bytes: of the rows locked, the relay
-- gets those that start below the byte budget (always at least one). The others
-- stay locked until the batch ends and go out in the next one, still in id order;
-- in ordered mode the relay claims nothing else meanwhile, or that claim would skip
-- them and take later rows of their keys.
WITH claimed AS MATERIALIZED (
    -- Ordered mode: the claim holds each partition it may take rows of in share
    -- mode until it ends, as its row locks last. A relay that takes a partition over
    -- probes this lock (contested_partitions): while an old owner's session still
    -- holds rows of it, the newcomer leaves the partition alone. Taken before the
    -- owner check below, so a hand-off between the two is seen by one or the other.
    SELECT coalesce(bit_or(1::bigint << p), 0) AS mask
    FROM unnest(%(partitions)s::int[]) AS p
    WHERE %(ordered)s AND pg_try_advisory_xact_lock_shared({claimed_lock_class} + p, {lock_object})
), claimable AS MATERIALIZED (
    -- Partitions as bits of one bigint (64 partitions): one test per row. Read from
    -- claimed's row, so its locks are taken before the owner check looks.
    SELECT CASE WHEN %(owner_pid)s::int IS NULL THEN c.mask
           -- Claimed on a relay's second session: only partitions its first session
           -- still holds (that one may have died meanwhile).
                ELSE c.mask
                  & (SELECT coalesce(bit_or(1::bigint << (l.classid::bigint
                                               - {partition_lock_class})::int), 0)
                        FROM pg_locks AS l
                        WHERE l.locktype = 'advisory' AND l.granted
                          AND l.pid = %(owner_pid)s AND l.objsubid = 2
                          AND l.objid = {lock_object}
                          -- Not the session's other locks (membership, idle):
                          -- shifted, they would stand for partitions.
                          AND l.classid::bigint BETWEEN {partition_lock_class}
                                                    AND {partition_lock_class} + 63) END AS mask
    FROM claimed AS c
)
SELECT s.id, s.event_id, s.subject, s.payload, s.headers, s.ordering_key,
       (SELECT nextval({claim_sequence_literal}::regclass)) AS claim
FROM (
    SELECT c.*, sum(octet_length(c.payload)) OVER (ORDER BY c.id ROWS UNBOUNDED PRECEDING)
                - octet_length(c.payload) AS bytes_before
    FROM (
        SELECT o.id, o.event_id, o.subject, o.payload, o.headers, o.ordering_key
        FROM {outbox_table} AS o
        WHERE {claim_fence_function}(%(schema_version)s)
          AND o.next_attempt_at <= now()
          AND (o.ordering_key IS NULL
               OR NOT %(ordered)s
               OR (((SELECT mask FROM claimable) >> (hashtext(o.ordering_key) & 63)) & 1 = 1
                   -- Each probe first asks, once per claim, whether any keyed row has
                   -- failed at all (the failed-row index's first entry); only then are
                   -- rows probed one by one.
                   AND ((SELECT f.id FROM {outbox_table} AS f
                         WHERE f.ordering_key IS NOT NULL AND f.attempts > 0
                         ORDER BY f.ordering_key, f.id LIMIT 1) IS NULL
                        OR NOT EXISTS (
                            SELECT FROM {outbox_table} AS b
                            WHERE b.ordering_key = o.ordering_key AND b.id < o.id
                              AND b.attempts > 0 AND b.next_attempt_at > now()))
                   AND NOT (%(hold)s
                            AND (SELECT e.id FROM {dead_letter_table} AS e
                                 WHERE e.ordering_key IS NOT NULL
                                 ORDER BY e.ordering_key, e.id LIMIT 1) IS NOT NULL
                            AND EXISTS (
                                SELECT FROM {dead_letter_table} AS d
                                WHERE d.ordering_key = o.ordering_key AND d.id < o.id))))
        ORDER BY o.id
        LIMIT %(limit)s
        FOR UPDATE OF o SKIP LOCKED
    ) AS c
) AS s
WHERE s.bytes_before < %(max_bytes)s
ORDER BY s.id;

-- name: delete_published
DELETE FROM {outbox_table} WHERE id = ANY(%(ids)s::bigint[]);

-- name: record_failures
-- Row-specific publish failures: back off with jitter, or move to the dead letters
-- once max_attempts is reached. Returns how many rows went each way.
WITH failed AS (
    SELECT f.id, f.error
    FROM unnest(%(ids)s::bigint[], %(errors)s::text[]) AS f(id, error)
), buried AS (
    DELETE FROM {outbox_table} AS o
    USING failed AS f
    WHERE o.id = f.id AND o.attempts + 1 >= %(max_attempts)s
    RETURNING o.id, o.event_id, o.subject, o.payload, o.headers, o.created_at,
              o.attempts + 1 AS attempts, f.error, o.ordering_key
), dead AS (
    INSERT INTO {dead_letter_table}
        (id, event_id, subject, payload, headers, created_at, attempts, reason, ordering_key)
    SELECT * FROM buried
    RETURNING id
), retried AS (
    UPDATE {outbox_table} AS o
    SET attempts = o.attempts + 1,
        last_error = f.error,
        next_attempt_at = now() + make_interval(secs =>
            least(%(backoff_max)s, %(backoff)s * power(2, o.attempts))
            * (0.5 + random() / 2))
    FROM failed AS f
    WHERE o.id = f.id AND o.attempts + 1 < %(max_attempts)s
    RETURNING o.id
)
SELECT (SELECT count(*) FROM retried) AS retried, (SELECT count(*) FROM dead) AS dead_lettered;

-- name: lag
SELECT pending, oldest_age_seconds, dead_letters, held FROM {lag_view};

-- name: lease_instance
SELECT nextval(%(sequence)s::regclass) %% %(instances)s;

-- name: enqueue
SELECT {enqueue_function}(%(subject)s, %(payload)s, %(event_id)s, %(headers)s, %(max_payload)s,
                          %(ordering_key)s);

-- name: emit_event
-- The event row and its outbox row in one statement; the payload is the row exactly
-- as to_jsonb() renders it, defaults included, whatever the session's settings.
WITH event AS (
    INSERT INTO {event_table} ({columns}) VALUES ({values})
    RETURNING *
)
SELECT event.event_id,
       {enqueue_function}(
           %(subject)s,
           {payload_function}(event),
           event.event_id::text,
           %(headers)s,
           -- The budget left by the relay's headers, less the key's own bytes.
           %(max_payload)s - coalesce(octet_length({ordering_key}), 0),
           {ordering_key})
FROM event;

-- name: no_jit
-- Every session outbox-relay opens itself (relay, CLI): a stock server compiles any
-- plan whose estimate crosses jit_above_cost, and an ordered claim's estimate does,
-- paying half a second of compilation for a 10 ms claim. Producers' sessions are the
-- application's and keep its settings.
SELECT set_config('jit', 'off', false);

-- name: configure_session
-- A frozen relay must not hold its claimed rows' locks for ever: PostgreSQL ends a
-- session that sits idle inside a transaction, and the rows go back to the others.
-- A batch's commit (its deletes, its dead letters) need not wait for the WAL flush:
-- one lost in a crash brings its rows back, published again and deduplicated.
SELECT set_config('idle_in_transaction_session_timeout', %(idle_in_transaction)s, false),
       set_config('statement_timeout', %(statement_timeout)s, false),
       set_config('synchronous_commit', 'off', false);

-- name: listen
LISTEN {channel};

-- name: verify_committed
-- Events committed in the window (bounds inclusive, NULL for open), in event id
-- order: verify keeps them in sorted arrays and looks messages up by bisection.
SELECT execution_id, event_id FROM {event_table}
WHERE (%(from_id)s::bigint IS NULL OR event_id >= %(from_id)s)
  AND (%(to_id)s::bigint IS NULL OR event_id <= %(to_id)s)
ORDER BY event_id, execution_id;

-- name: timeline
-- The server's timeline: 1 on a server never promoted nor restored to a point in time,
-- which therefore cannot have thrown acknowledged commits away. A primary's current
-- WAL file names it at once; the last checkpoint may still show the old one.
SELECT CASE WHEN pg_is_in_recovery() THEN (SELECT timeline_id FROM pg_control_checkpoint())
            ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END;

-- name: verify_exists
SELECT execution_id, event_id FROM {event_table} WHERE event_id = ANY(%(ids)s::bigint[]);

-- name: verify_pending
-- Event ids still waiting in the outbox or parked in the dead letters, in order.
SELECT event_id::bigint FROM (
    SELECT event_id FROM {outbox_table}
    UNION ALL
    SELECT event_id FROM {dead_letter_table}
) AS waiting
WHERE event_id ~ '^-?[0-9]{{1,19}}$'
  AND (%(from_id)s::bigint IS NULL OR event_id::numeric >= %(from_id)s)
  AND (%(to_id)s::bigint IS NULL OR event_id::numeric <= %(to_id)s)
ORDER BY 1;

-- name: dead_letter_filter
-- Shared WHERE clause of the dead-letter commands; every filter is optional.
(%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s::bigint[]))
AND (%(from_id)s::bigint IS NULL OR id >= %(from_id)s)
AND (%(to_id)s::bigint IS NULL OR id <= %(to_id)s)
AND (%(reason)s::text IS NULL OR reason ILIKE '%%' || %(reason)s || '%%')
AND (%(older_than)s::float8 IS NULL
     OR dead_lettered_at < now() - make_interval(secs => %(older_than)s::float8))

-- name: dead_letters_list
SELECT id, event_id, subject, octet_length(payload) AS payload_bytes, attempts, reason,
       created_at, dead_lettered_at
FROM {dead_letter_table}
WHERE {filter}
ORDER BY id
LIMIT %(limit)s;

-- name: dead_letters_retry
-- Back into the outbox with a fresh attempt count; the msg id is unchanged, so a
-- copy JetStream already holds inside its duplicate window is collapsed. The row
-- keeps its id, and so its place before the rows of its key held behind it.
WITH moved AS (
    DELETE FROM {dead_letter_table} WHERE {filter}
    RETURNING id, event_id, subject, payload, headers, created_at, ordering_key
)
INSERT INTO {outbox_table} (id, event_id, subject, payload, headers, created_at, ordering_key)
OVERRIDING SYSTEM VALUE
SELECT id, event_id, subject, payload, headers, created_at, ordering_key FROM moved;

-- name: dead_letters_show
SELECT id, event_id, subject, headers, payload, attempts, reason, created_at,
       dead_lettered_at
FROM {dead_letter_table}
WHERE id = %(id)s;

-- name: dead_letters_purge
DELETE FROM {dead_letter_table} WHERE {filter};

-- name: take_idle_lock
-- A relay about to sleep: see sql/migrations/0002_idle_wakeup.sql.
SELECT pg_try_advisory_lock({idle_lock});

-- name: idle_lock_held_elsewhere
-- Another relay of this database and schema already sleeps holding the idle lock,
-- so producers notify.
SELECT EXISTS (
    SELECT FROM pg_locks
    WHERE locktype = 'advisory' AND mode = 'ExclusiveLock' AND granted
      AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND classid::bigint = {idle_lock_class} AND objid::bigint = {lock_object}
      AND pid <> pg_backend_pid()
);

-- name: wait_for_producers
-- Queue for the idle lock until the producers in flight (holding it shared) have
-- committed. While this waits, later producers cannot take it shared, so they
-- notify. Transaction-level: released at once by the caller's commit.
SELECT pg_advisory_xact_lock({idle_lock})
FROM (SELECT set_config('lock_timeout', %(lock_timeout)s, true)) AS bounded;

-- name: release_idle_lock
SELECT pg_advisory_unlock({idle_lock});

-- name: role_exists
SELECT EXISTS (SELECT FROM pg_roles WHERE rolname = %(role)s);

-- name: create_role
CREATE ROLE {role} NOLOGIN;

-- name: replay_filter
-- Which events a replay re-enqueues; every filter is optional. A time span reads the
-- event's created_at (a timestamp NoETL writes in UTC), not the time bits of its id:
-- NoETL's servers do not all put them in the same place.
(%(execution_ids)s::bigint[] IS NULL OR e.execution_id = ANY(%(execution_ids)s::bigint[]))
AND (%(from_id)s::bigint IS NULL OR e.event_id >= %(from_id)s)
AND (%(to_id)s::bigint IS NULL OR e.event_id <= %(to_id)s)
AND (%(since)s::timestamptz IS NULL OR e.created_at >= (%(since)s::timestamptz AT TIME ZONE 'UTC'))
AND (%(until)s::timestamptz IS NULL OR e.created_at <= (%(until)s::timestamptz AT TIME ZONE 'UTC'))

-- name: replay_count
SELECT count(*) FROM {event_table} AS e WHERE {filter};

-- name: replay_events
-- The payload is rendered as emit_event renders it, so a replayed message carries the
-- same bytes, the same msg id and the same ordering key as the original. NoETL
-- allows a NULL event type; its tailer published those as 'unknown'. One statement,
-- so all of it becomes visible at once and each key's events go out in event id order.
INSERT INTO {outbox_table} (event_id, subject, payload, ordering_key)
SELECT e.event_id::text, %(subject_prefix)s || '.' || coalesce(e.event_type, 'unknown'),
       {payload_function}(e), {ordering_key}
FROM {event_table} AS e
WHERE {filter}
ORDER BY {ordering_key}, e.event_id;

-- name: table_health
-- Live and dead rows, size and last vacuum of the outbox table, for the bloat check.
SELECT s.n_live_tup, s.n_dead_tup, pg_total_relation_size(s.relid),
       extract(epoch FROM now() - greatest(s.last_autovacuum, s.last_vacuum))
FROM pg_stat_user_tables AS s
WHERE s.relid = {outbox_table_literal}::regclass;

-- name: configure_idle_session
-- PostgreSQL >= 14: a relay frozen between batches loses its session, and with it
-- the partitions it owns, after this long (it claims at least once a poll interval).
SELECT set_config('idle_session_timeout', %(idle_session)s, false);

-- name: join_relays
-- Every running relay of the schema holds this lock shared; counting the holders
-- tells each relay its fair share of the key partitions.
SELECT pg_advisory_lock_shared({member_lock});

-- name: leave_relays
SELECT pg_advisory_unlock_shared({member_lock});

-- name: relay_session
-- Shared condition: session {pid} is a relay of this schema. Any role can take the
-- membership lock, so holding it is not enough: the session's role must also be able
-- to delete outbox rows, as a relay must (a producer's role cannot).
-- Parenthesised, as it is spliced into other conditions (NOT ...).
(EXISTS (
     SELECT FROM pg_locks AS m
     WHERE m.pid = {pid} AND m.locktype = 'advisory' AND m.granted AND m.objsubid = 2
       AND m.database = (SELECT oid FROM pg_database WHERE datname = current_database())
       AND m.classid::bigint = {member_lock_class} AND m.objid::bigint = {lock_object})
 AND coalesce((SELECT has_table_privilege(s.usesysid, {outbox_table_literal}::regclass, 'DELETE')
               FROM pg_stat_activity AS s WHERE s.pid = {pid}), false))

-- name: count_relays
-- Every running relay holds the membership lock shared; counting the relays among
-- its holders tells each its fair share of the key partitions. Advisory locks are
-- per database, but pg_locks shows the whole server's.
SELECT count(*) FROM pg_locks AS r
WHERE r.locktype = 'advisory' AND r.granted AND r.objsubid = 2
  AND r.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND r.classid::bigint = {member_lock_class} AND r.objid::bigint = {lock_object}
  AND {is_relay};

-- name: partition_squatters
-- Sessions holding key partitions without being relays: the keyed rows of those
-- partitions wait until they let go.
SELECT p.pid, coalesce(a.usename, ''), coalesce(a.application_name, ''),
       coalesce(host(a.client_addr), 'local'), count(*) AS partitions
FROM pg_locks AS p
LEFT JOIN pg_stat_activity AS a ON a.pid = p.pid
WHERE p.locktype = 'advisory' AND p.granted AND p.objsubid = 2
  AND p.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND p.classid::bigint BETWEEN {partition_lock_class} AND {partition_lock_class} + 63
  AND p.objid::bigint = {lock_object}
  AND NOT {is_relay}
GROUP BY p.pid, a.usename, a.application_name, a.client_addr
ORDER BY p.pid;

-- name: announce_partitions
-- A relay that gave its partitions back wakes the others to take them.
SELECT pg_notify({channel_literal}, '');

-- name: take_partitions
-- Try the candidates in order; stop after the wanted number are held.
SELECT c.p FROM unnest(%(candidates)s::int[]) AS c(p)
WHERE pg_try_advisory_lock({partition_lock_class} + c.p, {lock_object})
LIMIT %(wanted)s;

-- name: contested_partitions
-- Of partitions just taken, those an old owner's session still holds claimed rows of
-- (see claim_batch): each is tried exclusively for an instant, and let go at once.
SELECT p FROM unnest(%(partitions)s::int[]) AS p
WHERE CASE WHEN pg_try_advisory_lock({claimed_lock_class} + p, {lock_object})
           THEN NOT pg_advisory_unlock({claimed_lock_class} + p, {lock_object})
           ELSE true END;

-- name: release_partitions
SELECT pg_advisory_unlock({partition_lock_class} + p, {lock_object})
FROM unnest(%(partitions)s::int[]) AS p;

-- name: count_pending_ids
-- How many of these msg ids still wait in the outbox (the demo's own events).
SELECT count(*) FROM {outbox_table} WHERE event_id = ANY(%(ids)s::text[]);

-- name: ping
SELECT true;

-- name: wal_position
-- WAL flushed so far. A row committed with synchronous_commit on (the default) is
-- visible only once its commit is flushed, so every row a claim saw lies below it.
-- Not the insert position: that includes the claim's own row locks, which no standby
-- receives before this transaction ends.
SELECT pg_current_wal_flush_lsn()::text;

-- name: standby_has
-- Whether a streaming standby has flushed the WAL up to a position. The LSN columns
-- are NULL for roles that are neither superusers nor in pg_monitor: false then.
SELECT coalesce(max(flush_lsn) >= %(lsn)s::pg_lsn, false) FROM pg_stat_replication;

-- name: read_only
-- A standby (in recovery) or a server whose sessions default to read-only: the relay
-- can claim nothing there, so it waits for a primary instead.
SELECT pg_is_in_recovery() OR current_setting('transaction_read_only')::boolean;
