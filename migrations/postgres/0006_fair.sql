-- The fair claim's index (as ../0004_client.sql's jobs_fair): each
-- client's oldest claimable jobs per priority, and the distinct clients of a
-- priority by a loose index scan, without reading the backlog.
CREATE INDEX jobs_fair ON jobs (priority, client, seq) INCLUDE (run_at) WHERE status IN ('queued', 'retrying');
