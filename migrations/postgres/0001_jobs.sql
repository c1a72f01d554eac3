-- PostgreSQL dialect of ../0001_jobs.sql: the same tables, columns and meaning.
-- Times are milliseconds since the Unix epoch (BIGINT), as in the SQLite store.
CREATE TABLE jobs (
    seq              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- arrival order
    id               TEXT NOT NULL UNIQUE,
    batch_id         TEXT,
    status           TEXT NOT NULL CHECK (status IN
                         ('queued', 'processing', 'completed', 'failed', 'retrying', 'cancelled')),
    priority         INTEGER NOT NULL DEFAULT 0,
    attempts         INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL,
    run_at           BIGINT NOT NULL,
    created_at       BIGINT NOT NULL,
    started_at       BIGINT,
    completed_at     BIGINT,
    lease_owner      TEXT,                 -- node id holding a processing job
    lease_expires_at BIGINT,
    input_path       TEXT NOT NULL,
    original_name    TEXT NOT NULL,
    input_size       BIGINT NOT NULL,
    input_format     TEXT,
    options          JSONB NOT NULL DEFAULT '{}',
    result           JSONB,
    output_path      TEXT,
    error_code       TEXT,
    error            TEXT
);

-- Claim order: highest priority, then oldest; only claimable rows are indexed.
CREATE INDEX jobs_claim ON jobs (priority DESC, seq) WHERE status IN ('queued', 'retrying');
CREATE INDEX jobs_status ON jobs (status, completed_at);
CREATE INDEX jobs_batch ON jobs (batch_id) WHERE batch_id IS NOT NULL;
CREATE INDEX jobs_lease ON jobs (lease_expires_at) WHERE status = 'processing';

-- One row per supervisor process: heartbeat and state the API shows.
CREATE TABLE supervisors (
    id           TEXT PRIMARY KEY,
    hostname     TEXT NOT NULL,
    pid          INTEGER NOT NULL,
    started_at   BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL,
    state        JSONB NOT NULL DEFAULT '{}'
);

CREATE TABLE counters (
    name  TEXT PRIMARY KEY,
    value BIGINT NOT NULL DEFAULT 0
);
INSERT INTO counters (name, value) VALUES ('jobs_total', 0), ('jobs_completed', 0), ('jobs_failed', 0);
