-- Living beside NoETL's schema (README: Using it from NoETL).
--
-- The enqueue function is the producer's only way into the outbox table: it runs
-- as its owner (sql/roles.sql grants the producer no privilege on the table), with
-- a search_path no caller can plant objects in.
ALTER FUNCTION {enqueue_function}(text, bytea, text, jsonb, integer, text)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- An event's payload: the row as to_jsonb renders it, with every session setting that
-- changes the rendering pinned, so one row gives the same bytes from any producer's
-- session and from a replay (timestamptz in UTC, as NoETL's tailer wrote them).
CREATE FUNCTION {payload_function}(event anyelement) RETURNS bytea
LANGUAGE sql STABLE
SET TimeZone = 'UTC'
SET DateStyle = 'ISO, YMD'
SET IntervalStyle = 'postgres'
SET extra_float_digits = 1
AS $$ SELECT convert_to(to_jsonb(event)::text, 'UTF8') $$;
