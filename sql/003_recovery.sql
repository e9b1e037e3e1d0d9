-- Recovery: find unfinished work that has no live job, so that nothing is lost.

-- Unfinished images are few next to finished ones; this finds them without a scan.
CREATE INDEX images_unfinished ON images (id) WHERE status IN ('queued', 'processing');

-- Live imgsvc jobs by the row they work on. They are on procrastinate's table, which
-- has no index on job arguments; they serve only the maintenance task's look-ups.
CREATE INDEX procrastinate_jobs_live_image ON procrastinate_jobs ((args->>'image_id'))
    WHERE status IN ('todo', 'doing');
CREATE INDEX procrastinate_jobs_live_request ON procrastinate_jobs ((args->>'request_id'))
    WHERE status IN ('todo', 'doing');
CREATE INDEX procrastinate_jobs_live_delivery ON procrastinate_jobs ((args->>'delivery_id'))
    WHERE status IN ('todo', 'doing');
