-- API keys for the ingest endpoints (SDK, remote agents). Only a SHA-256 hash of
-- each key is kept: the key itself is shown once, by `sluice keys create`.

CREATE TABLE api_keys (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name text NOT NULL,
    hash text NOT NULL UNIQUE,
    created_at double precision NOT NULL,
    revoked_at double precision,
    last_used_at double precision
);

-- A name designates one active key (`sluice keys revoke NAME`); revoked names may be reused.
CREATE UNIQUE INDEX api_keys_active_name ON api_keys (name) WHERE revoked_at IS NULL;
