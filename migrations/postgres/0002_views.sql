-- PostgreSQL dialect of ../0002_views.sql: the same views for operators using psql.
CREATE VIEW job_summary AS
SELECT id,
       status,
       priority,
       attempts || '/' || max_attempts AS attempts,
       original_name,
       input_size,
       to_char(to_timestamp(created_at / 1000.0) AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.MS') AS created,
       to_char(to_timestamp(started_at / 1000.0) AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.MS') AS started,
       to_char(to_timestamp(completed_at / 1000.0) AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.MS') AS completed,
       CASE WHEN status = 'retrying'
            THEN to_char(to_timestamp(run_at / 1000.0) AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.MS') END AS next_retry,
       (result ->> 'processingTime')::bigint AS processing_ms,
       error_code,
       error
FROM jobs;

CREATE VIEW status_counts AS
SELECT status, count(*) AS jobs,
       to_char(to_timestamp(min(created_at) / 1000) AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') AS oldest
FROM jobs GROUP BY status;

CREATE VIEW recent_failures AS
SELECT id, original_name, attempts, error_code, error,
       to_char(to_timestamp(completed_at / 1000) AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') AS failed_at
FROM jobs WHERE status = 'failed'
ORDER BY completed_at DESC LIMIT 50;
