-- Alerting (issue 19; docs/alerting.md). Channels hold their secrets in the clear in
-- ``config`` (JSON): this table is the one place they live. A rule's match, params and
-- channel ids are JSON; ``from_file`` marks the rules of the TOML file (read-only in the
-- API). An incident is one rule's condition in one group (``group_key``): at most one
-- open (pending or firing) per rule and group; resolved ones stay as history, with their
-- rule's name and kind copied so that deleting the rule keeps them readable.
-- ``incident_log`` is an incident's timeline: state changes, notifications queued, each
-- delivery attempt with its outcome. ``outbox`` is the durable queue of notifications
-- the delivery worker claims (sluice_core/alerting/outbox.py): due when
-- ``next_attempt_at`` has come and neither delivered nor given up.
CREATE TABLE alert_channels (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    type TEXT NOT NULL,
    config TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE alert_rules (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    match TEXT NOT NULL,
    params TEXT NOT NULL,
    severity TEXT NOT NULL,
    channels TEXT NOT NULL,
    for_s REAL NOT NULL,
    repeat_s REAL,
    muted_until REAL,
    from_file INTEGER NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE incidents (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    rule_id INTEGER NOT NULL,
    rule_name TEXT NOT NULL,
    kind TEXT NOT NULL,
    group_key TEXT NOT NULL,
    labels TEXT NOT NULL,
    state TEXT NOT NULL,
    severity TEXT NOT NULL,
    summary TEXT NOT NULL,
    count INTEGER NOT NULL,
    started_at REAL NOT NULL,
    fired_at REAL,
    resolved_at REAL,
    last_notified_at REAL,
    last_seen_at REAL,
    acked_at REAL,
    acked_by TEXT,
    silenced_until REAL,
    job_ids TEXT NOT NULL
);
CREATE UNIQUE INDEX incidents_open ON incidents (rule_id, group_key) WHERE state <> 'resolved';
CREATE INDEX incidents_by_state ON incidents (state, id);
CREATE TABLE incident_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    incident_id INTEGER NOT NULL,
    at REAL NOT NULL,
    what TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX incident_log_by_incident ON incident_log (incident_id, id);
CREATE TABLE outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    incident_id INTEGER,
    channel_id INTEGER NOT NULL,
    event TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    delivered_at REAL,
    gave_up_at REAL
);
CREATE INDEX outbox_due ON outbox (next_attempt_at)
    WHERE delivered_at IS NULL AND gave_up_at IS NULL;
