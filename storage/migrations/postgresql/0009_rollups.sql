-- Counts the overview reads (issue 18), kept by ingest inside its transaction from the
-- before and after of each job row it writes (sluice_storage.common.Rollup), so the
-- overview costs what its window holds, not what the database holds. Each key is split
-- over a few shards (PostgreSQL: by the writing connection) so two writers adding to
-- one count do not wait for each other; a reader sums the shards. A count may hold a
-- negative shard (a job counted by one connection, moved by another): only sums mean.
--   job_states: every job by its state now.
--   job_finished: completed and failed jobs by the minute of finished_at.
--   job_failures: failed jobs by the minute of finished_at and their name.
-- A minute is floor(finished_at / 60); a finished_at that is not finite or beyond
-- 2^53 seconds is not counted by minute.
CREATE TABLE job_states (
    state text NOT NULL,
    shard bigint NOT NULL,
    jobs bigint NOT NULL,
    PRIMARY KEY (state, shard)
);
CREATE TABLE job_finished (
    minute bigint NOT NULL,
    state text NOT NULL,
    shard bigint NOT NULL,
    jobs bigint NOT NULL,
    PRIMARY KEY (minute, state, shard)
);
CREATE TABLE job_failures (
    minute bigint NOT NULL,
    name text NOT NULL,
    shard bigint NOT NULL,
    jobs bigint NOT NULL,
    PRIMARY KEY (minute, name, shard)
);
-- The jobs stored before: the same counts from scratch (sluice_storage.common.ROLLUPS_FROM_JOBS).
INSERT INTO job_states (state, shard, jobs) SELECT state, 0, count(*) FROM jobs GROUP BY state;
INSERT INTO job_finished (minute, state, shard, jobs)
    SELECT CAST(floor(finished_at / 60) AS bigint), state, 0, count(*) FROM jobs
    WHERE state IN ('completed', 'failed') AND abs(finished_at) < 9007199254740992
    GROUP BY 1, 2;
INSERT INTO job_failures (minute, name, shard, jobs)
    SELECT CAST(floor(finished_at / 60) AS bigint), name, 0, count(*) FROM jobs
    WHERE state = 'failed' AND name IS NOT NULL AND abs(finished_at) < 9007199254740992
    GROUP BY 1, 2;
