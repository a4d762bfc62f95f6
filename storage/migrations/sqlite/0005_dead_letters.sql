-- Events storage refused (a value beyond a column, a character the database does not
-- keep). The pipeline splits a batch that fails for its data, stores the rest, and
-- keeps the events at fault here, with the database's reason, for the dashboard's
-- diagnostics page. The event is JSON text escaped to ASCII: whatever it held, this
-- row stores. The newest 10,000 are kept (sluice_core.storage.DEAD_LETTERS_KEPT).

CREATE TABLE dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    event TEXT NOT NULL,
    reason TEXT NOT NULL,
    created_at REAL NOT NULL
);
