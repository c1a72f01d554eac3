-- PostgreSQL dialect of ../0004_client.sql: the client that submitted each
-- job, so that the claim shares the pool between clients at one priority.
ALTER TABLE jobs ADD COLUMN client TEXT NOT NULL DEFAULT '';
CREATE INDEX jobs_running ON jobs (client) WHERE status = 'processing';
