-- Image jobs carry a batch of image ids ({"image_ids": [...]}) instead of one; the
-- maintenance task's look-up of live jobs by image follows.
DROP INDEX procrastinate_jobs_live_image;
CREATE INDEX procrastinate_jobs_live_images ON procrastinate_jobs USING gin ((args->'image_ids') jsonb_path_ops)
    WHERE status IN ('todo', 'doing');
