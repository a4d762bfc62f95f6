-- Who reported the events that moved each job (sluice_core.merge.applies_in_order): a job
-- with reports from one source folds new ones directly, one with several is rebuilt
-- from its history, where two reports of one happening become one. NULL for the rows
-- stored before: rebuilt once, on their next event.
ALTER TABLE jobs ADD COLUMN fold_sources TEXT;
