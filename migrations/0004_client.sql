-- The client that submitted each job (its address, or its IPv6 /64, after
-- TRUST_PROXY handling), so that the claim shares the pool between clients at
-- the same priority instead of serving one client's backlog first.
ALTER TABLE jobs ADD COLUMN client TEXT NOT NULL DEFAULT '';
-- each client's oldest claimable job per priority, read without the table
CREATE INDEX jobs_fair ON jobs (priority, client, seq, run_at) WHERE status IN ('queued', 'retrying');
-- running jobs per client
CREATE INDEX jobs_running ON jobs (client) WHERE status = 'processing';
