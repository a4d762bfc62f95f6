-- Gaps: times a source (a broker) was not heard, so events may have been missed: Sluice
-- stopped (from the last "listening until" mark to the next start), a source reconnecting,
-- events dropped by full buffers. Each is reconciled once it ends (sluice_core/reconcile.py);
-- ``summary`` says what that learnt. ``listening`` holds, per source, the last moment a
-- process sharing this database heard it: the next start's gap begins there.

CREATE TABLE gaps (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source text NOT NULL,
    cause text NOT NULL,
    started_at double precision NOT NULL,
    ended_at double precision NOT NULL,
    reconciled_at double precision,
    summary text
);
CREATE INDEX gaps_by_end ON gaps (ended_at);

CREATE TABLE listening (
    source text PRIMARY KEY,
    heard_until double precision NOT NULL
);
