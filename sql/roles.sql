-- Least-privilege group roles for the outbox (applied by `outbox-relay roles`).
-- Names are filled in as identifiers; the roles themselves are created first if
-- missing (NOLOGIN: grant them to your login roles). Re-running is harmless.
--
-- The schema may be NoETL's: only outbox-relay's own objects are revoked from
-- PUBLIC, and the only grants on an object of NoETL's are those on the event table.
--
-- producer: writes events, and outbox rows through the enqueue function only (it
--           runs as its owner), so it cannot choose a row's id, attempts or
--           next_attempt_at. RETURNING in emit_event reads back the event row it
--           inserted, hence SELECT on the event table.
-- relay:    claims, deletes and reschedules outbox rows, writes dead letters, reads
--           the lag view and the schema version. No access to the event table.
-- operator: the CLI's lag, dead-letters, verify and replay.

REVOKE ALL ON {outbox_table}, {dead_letter_table}, {lag_view}, {migrations_table} FROM PUBLIC;
REVOKE ALL ON SEQUENCE {instance_sequence}, {claim_sequence} FROM PUBLIC;
REVOKE ALL ON FUNCTION {enqueue_function}(text, bytea, text, jsonb, integer, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION {notify_function}() FROM PUBLIC;
REVOKE ALL ON FUNCTION {claim_fence_function}(integer) FROM PUBLIC;
-- Earlier versions let the producer insert into the outbox table.
REVOKE ALL ON {outbox_table} FROM {producer_role};

GRANT USAGE ON SCHEMA {schema} TO {producer_role}, {relay_role}, {operator_role};
GRANT SELECT ON {migrations_table} TO {producer_role}, {relay_role}, {operator_role};

GRANT INSERT, SELECT ON {event_table} TO {producer_role};
GRANT USAGE ON SEQUENCE {instance_sequence} TO {producer_role};
GRANT EXECUTE ON FUNCTION {enqueue_function}(text, bytea, text, jsonb, integer, text) TO {producer_role};

GRANT SELECT, UPDATE, DELETE ON {outbox_table} TO {relay_role};
GRANT SELECT, INSERT ON {dead_letter_table} TO {relay_role};
GRANT SELECT ON {lag_view} TO {relay_role}, {operator_role};
GRANT USAGE ON SEQUENCE {claim_sequence} TO {relay_role};
GRANT EXECUTE ON FUNCTION {claim_fence_function}(integer) TO {relay_role};

GRANT SELECT ON {event_table} TO {operator_role};
GRANT SELECT, INSERT ON {outbox_table} TO {operator_role};
GRANT SELECT, DELETE ON {dead_letter_table} TO {operator_role};
GRANT EXECUTE ON FUNCTION {enqueue_function}(text, bytea, text, jsonb, integer, text) TO {operator_role};

-- The outbox table's CHECK constraints call these on every insert and update.
GRANT EXECUTE ON FUNCTION {headers_valid_function}(jsonb), {wire_size_function}(text, jsonb, text, bigint),
                          {unpadded_function}(text)
    TO {producer_role}, {relay_role}, {operator_role};
