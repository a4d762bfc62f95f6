-- A time window's jobs are read from this index alone (seq is in it), in the
-- window's order, and the newest of them taken: sluice_storage.postgres._window_first.
CREATE INDEX jobs_created_at_seq ON jobs (created_at, seq);
DROP INDEX jobs_created_at;
