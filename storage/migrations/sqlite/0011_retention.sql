-- Retention (issue 20, sluice_core/retention.py): a prune walks each finished state's jobs
-- oldest news first, after a cursor of (updated_at, seq); the rowid (seq) ends every
-- SQLite index, so this one serves the cursor too.
-- Giving the space back needs auto_vacuum = INCREMENTAL, which a database created before
-- it only takes with a VACUUM, and VACUUM cannot run inside this migration's transaction:
-- the backend does it when it opens a small enough file (sluice_storage.sqlite).
CREATE INDEX jobs_state_updated_at ON jobs (state, updated_at);
