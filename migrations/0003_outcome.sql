-- A job's outcome as columns (was a JSON copy of the public answer in `result`).
-- The API builds the public JSON from these; SQL reads them directly.
ALTER TABLE jobs ADD COLUMN processing_ms INTEGER;   -- set once completed
ALTER TABLE jobs ADD COLUMN input_width INTEGER;     -- as displayed (after EXIF orientation)
ALTER TABLE jobs ADD COLUMN input_height INTEGER;
ALTER TABLE jobs ADD COLUMN output_format TEXT;
ALTER TABLE jobs ADD COLUMN output_size INTEGER;
ALTER TABLE jobs ADD COLUMN output_width INTEGER;
ALTER TABLE jobs ADD COLUMN output_height INTEGER;
ALTER TABLE jobs ADD COLUMN frames_in INTEGER;
ALTER TABLE jobs ADD COLUMN frames_out INTEGER;
ALTER TABLE jobs ADD COLUMN animated INTEGER;        -- 0/1
ALTER TABLE jobs ADD COLUMN kept_original INTEGER;   -- 0/1: the input re-emitted without metadata

UPDATE jobs SET
    processing_ms = json_extract(result, '$.processingTime'),
    input_format  = coalesce(json_extract(result, '$.originalFile.format'), input_format),
    input_size    = coalesce(json_extract(result, '$.originalFile.size'), input_size),
    input_width   = json_extract(result, '$.originalFile.dimensions.width'),
    input_height  = json_extract(result, '$.originalFile.dimensions.height'),
    output_format = json_extract(result, '$.processedFile.format'),
    output_size   = json_extract(result, '$.processedFile.size'),
    output_width  = json_extract(result, '$.processedFile.dimensions.width'),
    output_height = json_extract(result, '$.processedFile.dimensions.height'),
    frames_in     = coalesce(json_extract(result, '$.framesIn'), 1),
    frames_out    = coalesce(json_extract(result, '$.framesOut'), 1),
    animated      = coalesce(json_extract(result, '$.animated'), 0),
    kept_original = coalesce(json_extract(result, '$.optimization.keptOriginalEncoding'), 0)
WHERE result IS NOT NULL AND json_extract(result, '$.processingTime') IS NOT NULL;

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
       strftime('%Y-%m-%d %H:%M:%f', created_at / 1000.0, 'unixepoch') AS created,
       strftime('%Y-%m-%d %H:%M:%f', started_at / 1000.0, 'unixepoch') AS started,
       strftime('%Y-%m-%d %H:%M:%f', completed_at / 1000.0, 'unixepoch') AS completed,
       CASE WHEN status = 'retrying'
            THEN strftime('%Y-%m-%d %H:%M:%f', run_at / 1000.0, 'unixepoch') END AS next_retry,
       processing_ms,
       error_code,
       error
FROM jobs;
