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
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name text NOT NULL UNIQUE,
    type text NOT NULL,
    config jsonb NOT NULL,
    created_at double precision NOT NULL
);
CREATE TABLE alert_rules (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name text NOT NULL UNIQUE,
    kind text NOT NULL,
    match jsonb NOT NULL,
    params jsonb NOT NULL,
    severity text NOT NULL,
    channels jsonb NOT NULL,
    for_s double precision NOT NULL,
    repeat_s double precision,
    muted_until double precision,
    from_file boolean NOT NULL,
    created_at double precision NOT NULL,
    updated_at double precision NOT NULL
);
CREATE TABLE incidents (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    rule_id bigint NOT NULL,
    rule_name text NOT NULL,
    kind text NOT NULL,
    group_key text NOT NULL,
    labels jsonb NOT NULL,
    state text NOT NULL,
    severity text NOT NULL,
    summary text NOT NULL,
    count bigint NOT NULL,
    started_at double precision NOT NULL,
    fired_at double precision,
    resolved_at double precision,
    last_notified_at double precision,
    last_seen_at double precision,
    acked_at double precision,
    acked_by text,
    silenced_until double precision,
    job_ids jsonb NOT NULL
);
CREATE UNIQUE INDEX incidents_open ON incidents (rule_id, group_key) WHERE state <> 'resolved';
CREATE INDEX incidents_by_state ON incidents (state, id);
CREATE TABLE incident_log (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    incident_id bigint NOT NULL,
    at double precision NOT NULL,
    what text NOT NULL,
    detail text NOT NULL
);
CREATE INDEX incident_log_by_incident ON incident_log (incident_id, id);
CREATE TABLE outbox (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    incident_id bigint,
    channel_id bigint NOT NULL,
    event text NOT NULL,
    body jsonb NOT NULL,
    created_at double precision NOT NULL,
    attempts bigint NOT NULL DEFAULT 0,
    next_attempt_at double precision NOT NULL,
    delivered_at double precision,
    gave_up_at double precision
);
CREATE INDEX outbox_due ON outbox (next_attempt_at)
    WHERE delivered_at IS NULL AND gave_up_at IS NULL;
