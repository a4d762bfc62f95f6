-- Free-text search (GET /api/jobs?q=) without reading the whole jobs table.
-- A trigram index answers LIKE '%text%' for text of three characters or more;
-- its rowid is the job's seq. Ingest rewrites a job's entry only when the
-- searched text changed (a new job, a failure's exception).

-- The searched text of a job, defined once for the backfill and for ingest.
CREATE VIEW job_search_text AS
SELECT seq, id,
       coalesce(name, '') || char(10) || coalesce(args, '') || char(10) ||
       coalesce(kwargs, '') || char(10) || coalesce(exception, '') AS text
FROM jobs;

-- detail=none keeps no positions: LIKE needs none, and ingest indexes half again faster.
CREATE VIRTUAL TABLE job_search USING fts5(text, tokenize = 'trigram', detail = 'none');

INSERT INTO job_search (rowid, text) SELECT seq, text FROM job_search_text;
