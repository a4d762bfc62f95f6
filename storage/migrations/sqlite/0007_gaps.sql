-- Gaps: times a source (a broker) was not heard, so events may have been missed: Sluice
-- stopped (from the last "listening until" mark to the next start), a source reconnecting,
-- events dropped by full buffers. Each is reconciled once it ends (sluice_core/reconcile.py);
-- ``summary`` says what that learnt. ``listening`` holds, per source, the last moment a
-- process sharing this database heard it: the next start's gap begins there.

CREATE TABLE gaps (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    source TEXT NOT NULL,
    cause TEXT NOT NULL,
    started_at REAL NOT NULL,
    ended_at REAL NOT NULL,
    reconciled_at REAL,
    summary TEXT
);
CREATE INDEX gaps_by_end ON gaps (ended_at);

CREATE TABLE listening (
    source TEXT PRIMARY KEY,
    heard_until REAL NOT NULL
);
