-- Alert channels as code (issue 19; docs/alerting.md): the TOML file's [[alerts.channels]]
-- are stored like the API's, marked ``from_file``: read-only in the API (a test
-- notification, not a delete), upserted by name at each start, removed once gone from
-- the file.
ALTER TABLE alert_channels ADD COLUMN from_file INTEGER NOT NULL DEFAULT 0;
