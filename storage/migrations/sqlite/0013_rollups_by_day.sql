-- The overview's counts carry the day partition their jobs are stored in (PostgreSQL's
-- migration 0013: a dropped day takes its counts with it). SQLite has no partitions:
-- every count is day 0, the one table.
ALTER TABLE job_states RENAME TO job_states_0009;
CREATE TABLE job_states (
    state TEXT NOT NULL,
    day INTEGER NOT NULL DEFAULT 0,
    shard INTEGER NOT NULL,
    jobs INTEGER NOT NULL,
    PRIMARY KEY (state, day, shard)
);
INSERT INTO job_states (state, shard, jobs) SELECT state, shard, jobs FROM job_states_0009;
DROP TABLE job_states_0009;
ALTER TABLE job_finished RENAME TO job_finished_0009;
CREATE TABLE job_finished (
    minute INTEGER NOT NULL,
    state TEXT NOT NULL,
    day INTEGER NOT NULL DEFAULT 0,
    shard INTEGER NOT NULL,
    jobs INTEGER NOT NULL,
    PRIMARY KEY (minute, state, day, shard)
);
INSERT INTO job_finished (minute, state, shard, jobs)
    SELECT minute, state, shard, jobs FROM job_finished_0009;
DROP TABLE job_finished_0009;
ALTER TABLE job_failures RENAME TO job_failures_0009;
CREATE TABLE job_failures (
    minute INTEGER NOT NULL,
    name TEXT NOT NULL,
    day INTEGER NOT NULL DEFAULT 0,
    shard INTEGER NOT NULL,
    jobs INTEGER NOT NULL,
    PRIMARY KEY (minute, name, day, shard)
);
INSERT INTO job_failures (minute, name, shard, jobs)
    SELECT minute, name, shard, jobs FROM job_failures_0009;
DROP TABLE job_failures_0009;
