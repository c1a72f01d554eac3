-- The durable priority queue. Times are milliseconds since the Unix epoch.
CREATE TABLE jobs (
    seq              INTEGER PRIMARY KEY,          -- arrival order (FIFO within a priority)
    id               TEXT NOT NULL UNIQUE,         -- public job id (random uuid4)
    batch_id         TEXT,
    status           TEXT NOT NULL CHECK (status IN
                         ('queued', 'processing', 'completed', 'failed', 'retrying', 'cancelled')),
    priority         INTEGER NOT NULL DEFAULT 0,
    attempts         INTEGER NOT NULL DEFAULT 0,   -- claims so far
    max_attempts     INTEGER NOT NULL,
    run_at           INTEGER NOT NULL,             -- not claimed before this time
    created_at       INTEGER NOT NULL,
    started_at       INTEGER,
    completed_at     INTEGER,
    lease_owner      TEXT,                         -- supervisor id holding a processing job
    lease_expires_at INTEGER,
    input_path       TEXT NOT NULL,
    original_name    TEXT NOT NULL,
    input_size       INTEGER NOT NULL,
    input_format     TEXT,
    options          TEXT NOT NULL DEFAULT '{}',   -- JSON: format, quality, maxWidth, maxHeight
    result           TEXT,                         -- JSON, as GET /api/job/:id shows it
    output_path      TEXT,
    error_code       TEXT,
    error            TEXT
);

-- Claim order: highest priority, then oldest; only claimable rows are indexed.
CREATE INDEX jobs_claim ON jobs (priority DESC, seq) WHERE status IN ('queued', 'retrying');
CREATE INDEX jobs_status ON jobs (status, completed_at);
CREATE INDEX jobs_batch ON jobs (batch_id) WHERE batch_id IS NOT NULL;

-- One row per supervisor process: heartbeat and state the API shows.
CREATE TABLE supervisors (
    id           TEXT PRIMARY KEY,
    hostname     TEXT NOT NULL,
    pid          INTEGER NOT NULL,
    started_at   INTEGER NOT NULL,
    heartbeat_at INTEGER NOT NULL,
    state        TEXT NOT NULL DEFAULT '{}'        -- JSON: paused, pauseReason, workers, memory
);

-- Totals that survive cleanup: jobs ever accepted, and finished rows deleted by cleanup.
CREATE TABLE counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL DEFAULT 0
);
INSERT INTO counters (name, value) VALUES ('jobs_total', 0), ('jobs_completed', 0), ('jobs_failed', 0);
