-- PostgreSQL dialect of ../0003_outcome.sql (0004 here: 0003 is PostgreSQL's cluster state):
-- a job's outcome as columns (was a JSONB copy of the public answer in `result`); the API builds the JSON.
ALTER TABLE jobs ADD COLUMN processing_ms BIGINT;
ALTER TABLE jobs ADD COLUMN input_width INTEGER;
ALTER TABLE jobs ADD COLUMN input_height INTEGER;
ALTER TABLE jobs ADD COLUMN output_format TEXT;
ALTER TABLE jobs ADD COLUMN output_size BIGINT;
ALTER TABLE jobs ADD COLUMN output_width INTEGER;
ALTER TABLE jobs ADD COLUMN output_height INTEGER;
ALTER TABLE jobs ADD COLUMN frames_in INTEGER;
ALTER TABLE jobs ADD COLUMN frames_out INTEGER;
ALTER TABLE jobs ADD COLUMN animated BOOLEAN;
ALTER TABLE jobs ADD COLUMN kept_original BOOLEAN;

UPDATE jobs SET
    processing_ms = (result ->> 'processingTime')::bigint,
    input_format  = coalesce(result #>> '{originalFile,format}', input_format),
    input_size    = coalesce((result #>> '{originalFile,size}')::bigint, input_size),
    input_width   = (result #>> '{originalFile,dimensions,width}')::integer,
    input_height  = (result #>> '{originalFile,dimensions,height}')::integer,
    output_format = result #>> '{processedFile,format}',
    output_size   = (result #>> '{processedFile,size}')::bigint,
    output_width  = (result #>> '{processedFile,dimensions,width}')::integer,
    output_height = (result #>> '{processedFile,dimensions,height}')::integer,
    frames_in     = coalesce((result ->> 'framesIn')::integer, 1),
    frames_out    = coalesce((result ->> 'framesOut')::integer, 1),
    animated      = coalesce((result ->> 'animated')::boolean, false),
    kept_original = coalesce((result #>> '{optimization,keptOriginalEncoding}')::boolean, false)
WHERE result IS NOT NULL AND result ? 'processingTime';

DROP VIEW job_summary;
ALTER TABLE jobs DROP COLUMN result;

CREATE VIEW job_summary AS
SELECT id,
       status,
       priority,
       attempts || '/' || max_attempts AS attempts,
       original_name,
       input_size,
       output_size,
       output_format,
       to_char(to_timestamp(created_at / 1000.0) AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.MS') AS created,
       to_char(to_timestamp(started_at / 1000.0) AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.MS') AS started,
       to_char(to_timestamp(completed_at / 1000.0) AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.MS') AS completed,
       CASE WHEN status = 'retrying'
            THEN to_char(to_timestamp(run_at / 1000.0) AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.MS') END AS next_retry,
       processing_ms,
       error_code,
       error
FROM jobs;
