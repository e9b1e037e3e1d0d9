-- Cancelling a request: its queued images are cancelled, and it ends 'cancelled'.

ALTER TABLE requests ADD COLUMN cancel_requested_at timestamptz;
COMMENT ON COLUMN requests.cancel_requested_at IS 'When POST /requests/{id}/cancel was called; images being processed then still finish.';

ALTER TABLE requests DROP CONSTRAINT requests_status_check;
ALTER TABLE requests ADD CONSTRAINT requests_status_check
    CHECK (status IN ('queued', 'processing', 'completed', 'completed_with_errors', 'failed', 'cancelled'));
ALTER TABLE requests DROP CONSTRAINT requests_check;
ALTER TABLE requests ADD CONSTRAINT requests_completed_at_check
    CHECK ((completed_at IS NOT NULL) = (status IN ('completed', 'completed_with_errors', 'failed', 'cancelled')));

ALTER TABLE images DROP CONSTRAINT images_status_check;
ALTER TABLE images ADD CONSTRAINT images_status_check
    CHECK (status IN ('queued', 'processing', 'done', 'failed', 'cancelled'));

CREATE INDEX requests_status_created_at ON requests (status, created_at DESC);

-- The view gains the count of cancelled images (new columns go last).
CREATE OR REPLACE VIEW request_progress AS
SELECT r.id AS request_id,
       r.status,
       r.image_count AS total,
       count(*) FILTER (WHERE i.status = 'queued') AS queued,
       count(*) FILTER (WHERE i.status = 'processing') AS processing,
       count(*) FILTER (WHERE i.status = 'done') AS done,
       count(*) FILTER (WHERE i.status = 'failed') AS failed,
       round(100.0 * count(*) FILTER (WHERE i.status IN ('done', 'failed', 'cancelled'))
             / r.image_count, 1)::float8 AS percent,
       coalesce(sum(i.bytes_in) FILTER (WHERE i.status = 'done'), 0)::bigint AS bytes_in,
       coalesce(sum(i.bytes_out) FILTER (WHERE i.status = 'done'), 0)::bigint AS bytes_out,
       r.created_at,
       r.updated_at,
       r.completed_at,
       count(*) FILTER (WHERE i.status = 'cancelled') AS cancelled
FROM requests r
LEFT JOIN images i ON i.request_id = r.id
GROUP BY r.id;
