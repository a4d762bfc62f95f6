-- Events storage refused (a value beyond a column, a character the database does not
-- keep). The pipeline splits a batch that fails for its data, stores the rest, and
-- keeps the events at fault here, with the database's reason, for the dashboard's
-- diagnostics page. The event is JSON text escaped to ASCII, not jsonb: jsonb refuses
-- the \u0000 such an event may hold. The newest 10,000 are kept
-- (sluice_core.storage.DEAD_LETTERS_KEPT).

CREATE TABLE dead_letters (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind text NOT NULL,
    event text NOT NULL,
    reason text NOT NULL,
    created_at double precision NOT NULL
);
