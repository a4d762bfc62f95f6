-- Sluice schema, PostgreSQL. Times are epoch seconds (UTC) as double precision.

CREATE EXTENSION IF NOT EXISTS pg_trgm;

CREATE TABLE jobs (
    id text PRIMARY KEY,
    -- Assigned once, when the job is first stored: the list's order and its cursor.
    seq bigint GENERATED ALWAYS AS IDENTITY,
    framework text NOT NULL,
    state text NOT NULL,
    name text,
    queue text,
    worker text,
    args text,
    kwargs text,
    result text,
    exception text,
    traceback text,
    retries integer NOT NULL DEFAULT 0,
    parent_id text,
    root_id text,
    eta text,
    expires text,
    sent_at double precision,
    received_at double precision,
    started_at double precision,
    finished_at double precision,
    runtime double precision,
    created_at double precision,
    updated_at double precision,
    retry_of text,
    retried_as text,
    extra jsonb NOT NULL DEFAULT '{}',
    -- The fold's position (sluice_core.merge), so in-order events skip the history.
    fold_ts double precision NOT NULL,
    fold_event text NOT NULL,
    fold_attempt integer NOT NULL,
    fold_rank_attempt integer NOT NULL,
    fold_rank_state integer NOT NULL
);
CREATE UNIQUE INDEX jobs_seq ON jobs (seq);
-- The list filters, each ordered like the list (newest first by seq).
CREATE INDEX jobs_state_seq ON jobs (state, seq);
CREATE INDEX jobs_name_seq ON jobs (name, seq);
CREATE INDEX jobs_queue_seq ON jobs (queue, seq);
CREATE INDEX jobs_worker_seq ON jobs (worker, seq);
CREATE INDEX jobs_created_at ON jobs (created_at);
-- Queue rates look at jobs that moved in the last minutes.
CREATE INDEX jobs_updated_at ON jobs (updated_at);
-- Free text: an id prefix, and a substring of name/args/kwargs/exception, without a scan.
-- The expression must stay identical to the one sluice_storage.postgres queries.
CREATE INDEX jobs_id_prefix ON jobs (id text_pattern_ops);
CREATE INDEX jobs_text_trgm ON jobs USING gin (
    (coalesce(name, '') || ' ' || coalesce(args, '') || ' ' || coalesce(kwargs, '')
        || ' ' || coalesce(exception, '')) gin_trgm_ops
);

CREATE TABLE job_events (
    id text PRIMARY KEY,
    job_id text NOT NULL,
    framework text NOT NULL,
    type text NOT NULL,
    state text,
    timestamp double precision NOT NULL,
    worker text,
    fields jsonb NOT NULL DEFAULT '{}',
    extra jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX job_events_job_timestamp ON job_events (job_id, timestamp);

CREATE TABLE workers (
    hostname text PRIMARY KEY,
    framework text NOT NULL,
    status text NOT NULL,
    last_heartbeat double precision,
    freq double precision,
    active integer,
    processed bigint,
    loadavg jsonb,
    pid integer,
    sw_ver text,
    queues jsonb,
    concurrency integer,
    updated_at double precision,
    extra jsonb NOT NULL DEFAULT '{}'
);

CREATE TABLE queue_samples (
    name text NOT NULL,
    framework text NOT NULL,
    broker text NOT NULL,
    timestamp double precision NOT NULL,
    depth integer,
    reserved integer,
    consumers integer
);
CREATE INDEX queue_samples_name_timestamp ON queue_samples (name, broker, timestamp);

-- The latest sample of each queue, so listing queues does not scan the time series.
CREATE TABLE queues (
    name text NOT NULL,
    broker text NOT NULL,
    framework text NOT NULL,
    timestamp double precision NOT NULL,
    depth integer,
    reserved integer,
    consumers integer,
    PRIMARY KEY (name, broker)
);
