-- Time partitions (issue 20; docs/architecture.md, Retention): jobs and job_events are
-- partitioned by `day`, the UTC day (days since 1970-01-01) a job was first stored, its
-- events beside it in the same day. Expiry drops a day's two partitions once the day is
-- past --retain-days, after moving the jobs the policy still keeps (open, failed, a
-- longer rule) and their events into day 0, `jobs_kept`/`job_events_kept`, where a
-- chunked DELETE takes them when their own time comes.
--
-- The tables stored so far become day 0 as they are, with no row copied: their day
-- column is added with a constant default (no rewrite), and attached as the day-0
-- partition, which scans each table once to check the constraint that lets the attach
-- skip a second scan. Their rows then leave by the chunked DELETE as they expire.
--
-- Uniqueness is per partition (a partitioned table's unique index must hold its key):
-- every day partition gets its own unique (id) and (job_id, id), created with it
-- (sluice_storage.postgres.Partitions). A job is stored in one day only: ingest finds
-- its row in any day before it inserts, and near midnight, when two writers could pick
-- two days for one new job, they take turns (sluice_storage.postgres._Transaction).

-- seq was an identity column, which a partitioned table cannot have here (PostgreSQL 15):
-- a sequence of its own instead, continuing where the identity was.
ALTER TABLE jobs ALTER COLUMN seq DROP IDENTITY;
CREATE SEQUENCE jobs_seq_seq AS bigint;
SELECT setval('jobs_seq_seq', coalesce(max(seq), 0) + 1, false) FROM jobs;

ALTER TABLE jobs RENAME TO jobs_kept;
ALTER TABLE jobs_kept RENAME CONSTRAINT jobs_pkey TO jobs_kept_pkey;
ALTER INDEX jobs_seq RENAME TO jobs_kept_seq;
ALTER INDEX jobs_state_seq RENAME TO jobs_kept_state_seq;
ALTER INDEX jobs_name_seq RENAME TO jobs_kept_name_seq;
ALTER INDEX jobs_queue_seq RENAME TO jobs_kept_queue_seq;
ALTER INDEX jobs_worker_seq RENAME TO jobs_kept_worker_seq;
ALTER INDEX jobs_created_at_seq RENAME TO jobs_kept_created_at_seq;
ALTER INDEX jobs_updated_at RENAME TO jobs_kept_updated_at;
ALTER INDEX jobs_state_updated_at RENAME TO jobs_kept_state_updated_at;
ALTER INDEX jobs_text_trgm RENAME TO jobs_kept_text_trgm;
ALTER TABLE jobs_kept ADD COLUMN day integer NOT NULL DEFAULT 0;
ALTER TABLE jobs_kept ADD CONSTRAINT jobs_kept_day CHECK (day >= 0 AND day < 1);

CREATE TABLE jobs (LIKE jobs_kept INCLUDING DEFAULTS) PARTITION BY RANGE (day);
ALTER TABLE jobs ALTER COLUMN day DROP DEFAULT;
ALTER TABLE jobs ALTER COLUMN seq SET DEFAULT nextval('jobs_seq_seq');
ALTER SEQUENCE jobs_seq_seq OWNED BY jobs.seq;
ALTER TABLE jobs ATTACH PARTITION jobs_kept FOR VALUES FROM (0) TO (1);
-- The same indexes, now partitioned: each attaches the kept table's own (same columns)
-- instead of building another. Not seq's: the kept table's is unique, and a unique index
-- of a partitioned table must hold `day`; each day partition has its own.
CREATE INDEX jobs_state_seq ON jobs (state, seq);
CREATE INDEX jobs_name_seq ON jobs (name, seq);
CREATE INDEX jobs_queue_seq ON jobs (queue, seq);
CREATE INDEX jobs_worker_seq ON jobs (worker, seq);
CREATE INDEX jobs_created_at_seq ON jobs (created_at, seq);
CREATE INDEX jobs_updated_at ON jobs (updated_at);
CREATE INDEX jobs_state_updated_at ON jobs (state, updated_at, seq);
CREATE INDEX jobs_text_trgm ON jobs USING gin (
    (coalesce(name, '') || ' ' || coalesce(args, '') || ' ' || coalesce(kwargs, '')
        || ' ' || coalesce(exception, '')) gin_trgm_ops
);

ALTER TABLE job_events RENAME TO job_events_kept;
ALTER INDEX job_events_job_id RENAME TO job_events_kept_job_id;
ALTER TABLE job_events_kept ADD COLUMN day integer NOT NULL DEFAULT 0;
ALTER TABLE job_events_kept ADD CONSTRAINT job_events_kept_day CHECK (day >= 0 AND day < 1);
CREATE TABLE job_events (LIKE job_events_kept INCLUDING DEFAULTS) PARTITION BY RANGE (day);
ALTER TABLE job_events ALTER COLUMN day DROP DEFAULT;
ALTER TABLE job_events ATTACH PARTITION job_events_kept FOR VALUES FROM (0) TO (1);

-- The overview's counts (migration 0009) by day too: a dropped day takes its counts with
-- it in one statement, instead of a count over the rows it drops.
ALTER TABLE job_states ADD COLUMN day integer NOT NULL DEFAULT 0;
ALTER TABLE job_states DROP CONSTRAINT job_states_pkey;
ALTER TABLE job_states ADD PRIMARY KEY (state, day, shard);
ALTER TABLE job_finished ADD COLUMN day integer NOT NULL DEFAULT 0;
ALTER TABLE job_finished DROP CONSTRAINT job_finished_pkey;
ALTER TABLE job_finished ADD PRIMARY KEY (minute, state, day, shard);
ALTER TABLE job_failures ADD COLUMN day integer NOT NULL DEFAULT 0;
ALTER TABLE job_failures DROP CONSTRAINT job_failures_pkey;
ALTER TABLE job_failures ADD PRIMARY KEY (minute, name, day, shard);

-- What each expiry dropped, for /metrics and the dashboard.
CREATE TABLE dropped_partitions (
    day integer PRIMARY KEY,
    dropped_at double precision NOT NULL,
    jobs bigint NOT NULL,
    kept bigint NOT NULL
);
