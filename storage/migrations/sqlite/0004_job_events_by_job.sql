-- Events clustered by their job's seq. The old table was keyed by the event's
-- random id, with a second index on (job_id, timestamp): every batch wrote into
-- pages all over both, and each commit rewrote most of them (at a million
-- events, commits took a third of ingest). New jobs take the highest seqs, so
-- their events are appended at the end of one tree, and a job's timeline is one
-- range of it. An event's id derives from its job's id: (job_seq, id) is as
-- unique as id was.
CREATE TABLE job_events_by_job (
    job_seq INTEGER NOT NULL,
    id TEXT NOT NULL,
    job_id TEXT NOT NULL,
    framework TEXT NOT NULL,
    type TEXT NOT NULL,
    state TEXT,
    timestamp REAL NOT NULL,
    worker TEXT,
    fields TEXT NOT NULL DEFAULT '{}',
    extra TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (job_seq, id)
) WITHOUT ROWID;

INSERT INTO job_events_by_job
SELECT jobs.seq, e.id, e.job_id, e.framework, e.type, e.state, e.timestamp, e.worker,
       e.fields, e.extra
FROM job_events e JOIN jobs ON jobs.id = e.job_id;

DROP TABLE job_events;

ALTER TABLE job_events_by_job RENAME TO job_events;
