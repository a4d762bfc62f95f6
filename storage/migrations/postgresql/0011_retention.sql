-- Retention (issue 20, sluice_core/retention.py): a prune walks each finished state's jobs
-- oldest news first, after a cursor of (updated_at, seq). Expiry by batched DELETE for
-- now; dropping time partitions instead is the next step of issue 20.
CREATE INDEX jobs_state_updated_at ON jobs (state, updated_at, seq);
