-- API keys for the ingest endpoints (SDK, remote agents). Only a SHA-256 hash of
-- each key is kept: the key itself is shown once, by `sluice keys create`.

CREATE TABLE api_keys (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL,
    revoked_at REAL,
    last_used_at REAL
);

-- A name designates one active key (`sluice keys revoke NAME`); revoked names may be reused.
CREATE UNIQUE INDEX api_keys_active_name ON api_keys (name) WHERE revoked_at IS NULL;
