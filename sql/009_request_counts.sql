-- GET /status and GET /requests counted each request's images by status on every
-- call: 120 ms for a request of 500,000 images. A request now keeps the counts of its
-- finished images and their bytes, changed by the statements that finish or cancel
-- them (under the request's row lock, like the rest of finishing), and the images
-- being processed are counted through an index of only those: the view costs the same
-- for 10 images or 500,000.
ALTER TABLE requests
    ADD COLUMN done_count integer NOT NULL DEFAULT 0,
    ADD COLUMN failed_count integer NOT NULL DEFAULT 0,
    ADD COLUMN cancelled_count integer NOT NULL DEFAULT 0,
    ADD COLUMN done_bytes_in bigint NOT NULL DEFAULT 0,
    ADD COLUMN done_bytes_out bigint NOT NULL DEFAULT 0;

UPDATE requests r
SET done_count = c.done, failed_count = c.failed, cancelled_count = c.cancelled,
    done_bytes_in = c.bytes_in, done_bytes_out = c.bytes_out
FROM (SELECT request_id,
             count(*) FILTER (WHERE status = 'done') AS done,
             count(*) FILTER (WHERE status = 'failed') AS failed,
             count(*) FILTER (WHERE status = 'cancelled') AS cancelled,
             coalesce(sum(bytes_in) FILTER (WHERE status = 'done'), 0) AS bytes_in,
             coalesce(sum(bytes_out) FILTER (WHERE status = 'done'), 0) AS bytes_out
      FROM images GROUP BY request_id) c
WHERE c.request_id = r.id;

COMMENT ON COLUMN requests.done_count IS 'Images done, kept by the statements that finish them.';
COMMENT ON COLUMN requests.failed_count IS 'Images failed, kept by the statements that finish them.';
COMMENT ON COLUMN requests.cancelled_count IS 'Images cancelled, kept by the statement that cancels them.';
COMMENT ON COLUMN requests.done_bytes_in IS 'Source bytes of the done images.';
COMMENT ON COLUMN requests.done_bytes_out IS 'Stored bytes of the done images.';

CREATE INDEX images_processing_by_request ON images (request_id) WHERE status = 'processing';

CREATE OR REPLACE VIEW request_progress AS
SELECT r.id AS request_id,
       r.status,
       r.image_count AS total,
       r.image_count - r.done_count - r.failed_count - r.cancelled_count - p.processing AS queued,
       p.processing,
       r.done_count::bigint AS done,
       r.failed_count::bigint AS failed,
       round(100.0 * (r.done_count + r.failed_count + r.cancelled_count) / r.image_count, 1)::float8
           AS percent,
       r.done_bytes_in AS bytes_in,
       r.done_bytes_out AS bytes_out,
       r.created_at,
       r.updated_at,
       r.completed_at,
       r.cancelled_count::bigint AS cancelled
FROM requests r
CROSS JOIN LATERAL (SELECT count(*) AS processing FROM images i
                    WHERE i.request_id = r.id AND i.status = 'processing') p;
