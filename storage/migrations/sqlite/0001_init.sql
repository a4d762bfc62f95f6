-- Sluice schema, SQLite. Times are epoch seconds (UTC); JSON columns hold JSON text.

CREATE TABLE jobs (
    -- Assigned once, when the job is first stored: the list's order and its cursor.
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    framework TEXT NOT NULL,
    state TEXT NOT NULL,
    name TEXT,
    queue TEXT,
    worker TEXT,
    args TEXT,
    kwargs TEXT,
    result TEXT,
    exception TEXT,
    traceback TEXT,
    retries INTEGER NOT NULL DEFAULT 0,
    parent_id TEXT,
    root_id TEXT,
    eta TEXT,
    expires TEXT,
    sent_at REAL,
    received_at REAL,
    started_at REAL,
    finished_at REAL,
    runtime REAL,
    created_at REAL,
    updated_at REAL,
    retry_of TEXT,
    retried_as TEXT,
    extra TEXT NOT NULL DEFAULT '{}',
    -- The fold's position (sluice_core.merge), so in-order events skip the history.
    fold_ts REAL NOT NULL,
    fold_event TEXT NOT NULL,
    fold_attempt INTEGER NOT NULL,
    fold_rank_attempt INTEGER NOT NULL,
    fold_rank_state INTEGER NOT NULL
);
-- The list filters, each ordered like the list (newest first by seq).
CREATE INDEX jobs_state_seq ON jobs (state, seq);
CREATE INDEX jobs_name_seq ON jobs (name, seq);
CREATE INDEX jobs_queue_seq ON jobs (queue, seq);
CREATE INDEX jobs_worker_seq ON jobs (worker, seq);
CREATE INDEX jobs_created_at ON jobs (created_at);
-- Queue rates look at jobs that moved in the last minutes.
CREATE INDEX jobs_updated_at ON jobs (updated_at);

CREATE TABLE job_events (
    id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    framework TEXT NOT NULL,
    type TEXT NOT NULL,
    state TEXT,
    timestamp REAL NOT NULL,
    worker TEXT,
    fields TEXT NOT NULL DEFAULT '{}',
    extra TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX job_events_job_timestamp ON job_events (job_id, timestamp);

CREATE TABLE workers (
    hostname TEXT PRIMARY KEY,
    framework TEXT NOT NULL,
    status TEXT NOT NULL,
    last_heartbeat REAL,
    freq REAL,
    active INTEGER,
    processed INTEGER,
    loadavg TEXT,
    pid INTEGER,
    sw_ver TEXT,
    queues TEXT,
    concurrency INTEGER,
    updated_at REAL,
    extra TEXT NOT NULL DEFAULT '{}'
);

CREATE TABLE queue_samples (
    name TEXT NOT NULL,
    framework TEXT NOT NULL,
    broker TEXT NOT NULL,
    timestamp REAL NOT NULL,
    depth INTEGER,
    reserved INTEGER,
    consumers INTEGER
);
CREATE INDEX queue_samples_name_timestamp ON queue_samples (name, broker, timestamp);

-- The latest sample of each queue, so listing queues does not scan the time series.
CREATE TABLE queues (
    name TEXT NOT NULL,
    broker TEXT NOT NULL,
    framework TEXT NOT NULL,
    timestamp REAL NOT NULL,
    depth INTEGER,
    reserved INTEGER,
    consumers INTEGER,
    PRIMARY KEY (name, broker)
);
