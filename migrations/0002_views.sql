-- Views for operators using the sqlite3 CLI: readable times, counts, failures.
CREATE VIEW job_summary AS
SELECT id,
       status,
       priority,
       attempts || '/' || max_attempts AS attempts,
       original_name,
       input_size,
       strftime('%Y-%m-%d %H:%M:%f', created_at / 1000.0, 'unixepoch') AS created,
       strftime('%Y-%m-%d %H:%M:%f', started_at / 1000.0, 'unixepoch') AS started,
       strftime('%Y-%m-%d %H:%M:%f', completed_at / 1000.0, 'unixepoch') AS completed,
       CASE WHEN status = 'retrying'
            THEN strftime('%Y-%m-%d %H:%M:%f', run_at / 1000.0, 'unixepoch') END AS next_retry,
       json_extract(result, '$.processingTime') AS processing_ms,
       error_code,
       error
FROM jobs;

CREATE VIEW status_counts AS
SELECT status, count(*) AS jobs, min(strftime('%Y-%m-%d %H:%M:%S', created_at / 1000, 'unixepoch')) AS oldest
FROM jobs GROUP BY status;

CREATE VIEW recent_failures AS
SELECT id, original_name, attempts, error_code, error,
       strftime('%Y-%m-%d %H:%M:%S', completed_at / 1000, 'unixepoch') AS failed_at
FROM jobs WHERE status = 'failed'
ORDER BY completed_at DESC LIMIT 50;
