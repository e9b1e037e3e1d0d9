-- Named queries, loaded once by imgsvc.db. A block starts with "-- name --".

-- insert_request --
-- Nothing is inserted when another request already has this Idempotency-Key.
INSERT INTO requests (id, file_name, webhook_url, product_count, image_count, idempotency_key,
                      csv_sha256)
VALUES ($1, $2, $3, $4, $5, $6, $7)
ON CONFLICT (idempotency_key) DO NOTHING
RETURNING id;

-- get_request_by_idempotency_key --
SELECT id::text, csv_sha256, product_count, image_count FROM requests WHERE idempotency_key = $1;

-- create_upload_rows --
-- The rows of an upload as they are read, before the request exists; dropped at the
-- end of the storing transaction.
CREATE TEMPORARY TABLE upload_rows (
    position        integer NOT NULL,
    line            integer NOT NULL,
    serial          text NOT NULL,
    serial_number   integer NOT NULL,
    name            text NOT NULL,
    urls            text[] NOT NULL
) ON COMMIT DROP;

-- insert_products --
INSERT INTO products (request_id, position, line, serial, serial_number, name)
SELECT $1, position, line, serial, serial_number, name FROM upload_rows ORDER BY position;

-- insert_images --
-- Image ids follow the input order: products by position, then URLs as listed.
INSERT INTO images (request_id, product_id, position, input_url)
SELECT $1, p.id, u.position, u.url
FROM upload_rows r
JOIN products p ON p.request_id = $1 AND p.position = r.position
CROSS JOIN LATERAL unnest(r.urls) WITH ORDINALITY AS u (url, position)
ORDER BY r.position, u.position;

-- defer_image_jobs --
-- One procrastinate job per batch of at most $4 images, in input order, through
-- procrastinate's own defer function, in the caller's transaction: the request and
-- its jobs commit or vanish together, in one call. Returns how many jobs were queued.
SELECT cardinality(procrastinate_defer_jobs_v1(array_agg(
    ROW($2, $3, 0, NULL, NULL, jsonb_build_object('image_ids', ids), NULL)
    ::procrastinate_job_to_defer_v1 ORDER BY batch)))
FROM (SELECT batch, jsonb_agg(id ORDER BY id) AS ids
      FROM (SELECT id, (row_number() OVER (ORDER BY id) - 1) / $4 AS batch
            FROM images WHERE request_id = $1) numbered
      GROUP BY batch) batches;

-- claim_image --
-- A worker starts on an image (and on its request, if it was still queued), in one
-- round trip; nothing is returned when the image is already finished.
WITH claimed AS (
    UPDATE images i
    SET status = 'processing', attempts = i.attempts + 1, started_at = coalesce(i.started_at, now())
    FROM products p
    WHERE i.id = $1 AND p.id = i.product_id AND i.status IN ('queued', 'processing')
    RETURNING i.id, i.request_id, p.serial_number, i.position, i.input_url, i.attempts
), started AS (
    UPDATE requests r
    SET status = 'processing', started_at = now(), updated_at = now()
    FROM claimed c
    WHERE r.id = c.request_id AND r.status = 'queued'
)
SELECT id, request_id::text, serial_number, position, input_url, attempts FROM claimed;

-- release_image --
-- A transient failure: back to the queue, with the reason, for the next attempt.
UPDATE images SET status = 'queued', error = $2 WHERE id = $1 AND status = 'processing';

-- lock_request --
SELECT status FROM requests WHERE id = $1 FOR UPDATE;

-- finish_image_done --
-- Run with the request row locked. One round trip: record the image, touch the
-- request, and say whether any other image of it still waits or runs (an index
-- look-up: finishing an image costs the same in a request of 10 or 100,000).
WITH finished AS (
    UPDATE images
    SET status = 'done', error = NULL, output_key = $3, output_url = $4, bytes_in = $5,
        bytes_out = $6, width = $7, height = $8, format_in = $9, format_out = $10,
        quality_in = $11, quality_out = $12, kept_original = $13, finished_at = now()
    WHERE id = $1 AND status IN ('queued', 'processing')
    RETURNING request_id
), touched AS (
    UPDATE requests
    SET updated_at = now(), done_count = done_count + 1,
        done_bytes_in = done_bytes_in + coalesce($5, 0), done_bytes_out = done_bytes_out + $6
    WHERE id = (SELECT request_id FROM finished)
)
SELECT EXISTS (SELECT 1 FROM finished) AS finished,
       EXISTS (SELECT 1 FROM images WHERE request_id = $2 AND id <> $1
               AND status IN ('queued', 'processing')) AS open;

-- finish_image_failed --
-- As finish_image_done, for an image that failed.
WITH finished AS (
    UPDATE images
    SET status = 'failed', error = $3, bytes_in = coalesce($4, bytes_in), finished_at = now()
    WHERE id = $1 AND status IN ('queued', 'processing')
    RETURNING request_id
), touched AS (
    UPDATE requests SET updated_at = now(), failed_count = failed_count + 1
    WHERE id = (SELECT request_id FROM finished)
)
SELECT EXISTS (SELECT 1 FROM finished) AS finished,
       EXISTS (SELECT 1 FROM images WHERE request_id = $2 AND id <> $1
               AND status IN ('queued', 'processing')) AS open;

-- finish_request_if_done --
-- Run with the request row locked: the statement sees every other image's
-- committed state, so exactly one caller moves the request to its final status.
UPDATE requests r
SET status = CASE WHEN r.cancel_requested_at IS NOT NULL THEN 'cancelled'
                  WHEN c.failed = 0 THEN 'completed'
                  WHEN c.done = 0 THEN 'failed'
                  ELSE 'completed_with_errors' END,
    completed_at = now(), updated_at = now()
FROM (SELECT count(*) FILTER (WHERE status = 'done') AS done,
             count(*) FILTER (WHERE status = 'failed') AS failed,
             count(*) FILTER (WHERE status NOT IN ('done', 'failed', 'cancelled')) AS open
      FROM images WHERE request_id = $1) c
WHERE r.id = $1 AND r.status IN ('queued', 'processing') AND c.open = 0
RETURNING r.status;

-- get_request --
SELECT pr.request_id, pr.status, pr.total, pr.queued, pr.processing, pr.done, pr.failed,
       pr.cancelled, pr.percent, pr.bytes_in, pr.bytes_out, pr.created_at, pr.updated_at,
       pr.completed_at, r.file_name, r.product_count, r.started_at, r.output_csv_url
FROM request_progress pr JOIN requests r ON r.id = pr.request_id
WHERE pr.request_id = $1;

-- list_requests --
-- Newest first, optionally of one status; the total is in every row.
SELECT pr.request_id::text, pr.status, r.file_name, pr.total, pr.queued, pr.processing, pr.done,
       pr.failed, pr.cancelled, pr.percent, pr.created_at, pr.completed_at,
       count(*) OVER () AS matching
FROM requests r JOIN request_progress pr ON pr.request_id = r.id
WHERE $1::text IS NULL OR r.status = $1
ORDER BY r.created_at DESC, r.id
LIMIT $2 OFFSET $3;

-- cancel_images --
UPDATE images SET status = 'cancelled', error = 'cancelled before it was processed', finished_at = now()
WHERE request_id = $1 AND status = 'queued';

-- mark_cancel_requested --
-- After cancel_images, with how many it cancelled.
UPDATE requests
SET cancel_requested_at = coalesce(cancel_requested_at, now()), updated_at = now(),
    cancelled_count = cancelled_count + $2
WHERE id = $1;

-- job_counts --
SELECT queue_name, status::text, count(*) FROM procrastinate_jobs GROUP BY 1, 2;

-- get_products_page --
SELECT p.id, p.position, p.serial, p.name
FROM products p WHERE p.request_id = $1 ORDER BY p.position LIMIT $2 OFFSET $3;

-- get_images_of_products --
SELECT product_id, position, input_url, status, output_url, error, bytes_in, bytes_out,
       width, height, format_in, format_out, quality_in, quality_out, kept_original, attempts
FROM images WHERE product_id = ANY($1::bigint[]) ORDER BY product_id, position;

-- defer_job --
-- One procrastinate job, in the caller's transaction.
SELECT (procrastinate_defer_jobs_v1(ARRAY[
    ROW($1, $2, 0, NULL, $4, $3::jsonb, NULL)::procrastinate_job_to_defer_v1]))[1];

-- get_output_rows --
-- The output CSV's rows: input order, URLs in input order, empty slots for failures.
SELECT p.serial, p.name,
       array_agg(i.input_url ORDER BY i.position) AS input_urls,
       array_agg(CASE WHEN i.status = 'done' THEN i.output_url END ORDER BY i.position) AS output_urls
FROM products p JOIN images i ON i.product_id = p.id
WHERE p.request_id = $1
GROUP BY p.id, p.position, p.serial, p.name
ORDER BY p.position;

-- get_request_for_finish --
SELECT r.status, r.webhook_url, r.completed_at, pr.total, pr.queued, pr.processing, pr.done,
       pr.failed, pr.cancelled
FROM requests r JOIN request_progress pr ON pr.request_id = r.id
WHERE r.id = $1;

-- set_output_csv --
UPDATE requests SET output_csv_key = $2, output_csv_url = $3, updated_at = now() WHERE id = $1;

-- insert_delivery --
-- At most one event a request: a second finishing run finds it there and adds nothing.
INSERT INTO webhook_deliveries (request_id, event_id, url, payload)
VALUES ($1, $2, $3, $4)
ON CONFLICT (request_id) DO NOTHING
RETURNING id;

-- claim_delivery --
UPDATE webhook_deliveries SET attempts = attempts + 1, updated_at = now()
WHERE id = $1 AND state IN ('pending', 'retrying')
RETURNING event_id, url, payload, attempts;

-- record_attempt --
INSERT INTO webhook_attempts (delivery_id, attempt, started_at, duration_ms, http_status, error)
VALUES ($1, $2, $3, $4, $5, $6);

-- update_delivery --
UPDATE webhook_deliveries
SET state = $2, last_status = $3, last_error = $4, updated_at = now(),
    delivered_at = CASE WHEN $2 = 'delivered' THEN now() END
WHERE id = $1;

-- get_delivery_of_request --
SELECT event_id, state, attempts, last_status, last_error, delivered_at
FROM webhook_deliveries WHERE request_id = $1;

-- requeue_image --
-- An interrupted image goes back to the queue with a job of its own (the job that
-- was running it ends aborted and is not retried).
UPDATE images SET status = 'queued', error = $2
WHERE id = $1 AND status IN ('queued', 'processing')
RETURNING id;

-- orphaned_images --
-- Unfinished images with no live job: re-queued by the maintenance task.
SELECT i.id FROM images i
WHERE i.status IN ('queued', 'processing')
  AND NOT EXISTS (SELECT 1 FROM procrastinate_jobs j
                  WHERE j.status IN ('todo', 'doing') AND j.task_name = $1
                    AND j.args->'image_ids' @> to_jsonb(i.id))
LIMIT $2;

-- orphaned_requests --
-- Final requests whose output CSV was never written, with no live finishing job.
SELECT r.id::text FROM requests r
WHERE r.completed_at IS NOT NULL AND r.output_csv_url IS NULL
  AND NOT EXISTS (SELECT 1 FROM procrastinate_jobs j
                  WHERE j.status IN ('todo', 'doing') AND j.task_name = $1
                    AND j.args->>'request_id' = r.id::text)
LIMIT $2;

-- orphaned_deliveries --
SELECT d.id FROM webhook_deliveries d
WHERE d.state IN ('pending', 'retrying')
  AND NOT EXISTS (SELECT 1 FROM procrastinate_jobs j
                  WHERE j.status IN ('todo', 'doing') AND j.task_name = $1
                    AND j.args->>'delivery_id' = d.id::text)
LIMIT $2;
