-- The outbox is a queue: every row is inserted, deleted within moments, and never
-- updated in between (except a failed row's retry bookkeeping). The default
-- autovacuum triggers (20% of the table dead) are tuned for tables that mostly
-- keep their rows; on a queue they let dead tuples pile up between runs, and a
-- claim then walks over them. Vacuum after a fixed number of dead rows instead,
-- without throttling, and keep statistics fresh the same way.
ALTER TABLE {outbox_table} SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 10000,
    autovacuum_vacuum_insert_scale_factor = 0,
    autovacuum_vacuum_insert_threshold = 100000,
    autovacuum_analyze_scale_factor = 0,
    autovacuum_analyze_threshold = 10000,
    autovacuum_vacuum_cost_delay = 0
);
