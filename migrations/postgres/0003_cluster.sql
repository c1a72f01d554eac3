-- Cluster-wide state of several nodes sharing this database (PostgreSQL only).

-- The per-client rate limit, shared by every API node: one row per client
-- key and fixed window, updated under its row lock. UNLOGGED: not written
-- to the WAL (fast); a crash of the server empties it, which only starts
-- every client's window afresh.
CREATE UNLOGGED TABLE rate_limits (
    key          TEXT PRIMARY KEY,
    window_start BIGINT NOT NULL,     -- ms since the epoch, by the database's clock
    count        INTEGER NOT NULL
);

-- Nodes: every supervisor and every API process registers here with a
-- heartbeat (the supervisors table keeps its name; `kind` says which).
ALTER TABLE supervisors ADD COLUMN kind TEXT NOT NULL DEFAULT 'supervisor'
    CHECK (kind IN ('supervisor', 'api'));
