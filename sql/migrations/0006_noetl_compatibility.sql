-- Living beside NoETL's schema (README: Using it from NoETL).
--
-- The enqueue function is the producer's only way into the outbox table: it runs
-- as its owner (sql/roles.sql grants the producer no privilege on the table), with
-- a search_path no caller can plant objects in.
ALTER FUNCTION {enqueue_function}(text, bytea, text, jsonb, integer, text)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
