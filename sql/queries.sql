-- Named queries, loaded once by imgsvc.db. A block starts with "-- name --".

-- insert_request --
-- Nothing is inserted when another request of the same owner ($8) already has this
-- Idempotency-Key.
INSERT INTO requests (id, file_name, webhook_url, product_count, image_count, idempotency_key,
                      csv_sha256, owner, reprocess)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
ON CONFLICT ((coalesce(owner, '')), idempotency_key) DO NOTHING
RETURNING id;

-- get_request_by_idempotency_key --
-- An owner's ($2) request with this Idempotency-Key; another owner's is never found.
SELECT id::text, csv_sha256, product_count, image_count FROM requests
WHERE idempotency_key = $1 AND coalesce(owner, '') = coalesce($2, '');

-- create_upload_rows --
-- The rows of an upload as they are read, before the request exists; dropped at the
-- end of the storing transaction.
CREATE TEMPORARY TABLE upload_rows (
    position        integer NOT NULL,
    line            integer NOT NULL,
    serial          text NOT NULL,
    serial_number   integer NOT NULL,
    name            text NOT NULL,
    urls            text[] NOT NULL,
    sources         text[] NOT NULL
) ON COMMIT DROP;

-- insert_products --
INSERT INTO products (request_id, position, line, serial, serial_number, name)
SELECT $1, position, line, serial, serial_number, name FROM upload_rows ORDER BY position;

-- insert_images --
-- Image ids follow the input order: products by position, then URLs as listed.
INSERT INTO images (request_id, product_id, position, input_url, source_url)
SELECT $1, p.id, u.position, u.url, u.source
FROM upload_rows r
JOIN products p ON p.request_id = $1 AND p.position = r.position
CROSS JOIN LATERAL unnest(r.urls, r.sources) WITH ORDINALITY AS u (url, source, position)
ORDER BY r.position, u.position;

-- mark_duplicates --
-- Images of the request with the same source URL as an earlier one are its duplicates:
-- they get no job of their own, and end when that one does. Run only when the upload
-- saw a URL twice.
UPDATE images i SET duplicate_of = d.first
FROM (SELECT source_url, min(id) AS first FROM images WHERE request_id = $1
      GROUP BY source_url HAVING count(*) > 1) d
WHERE i.request_id = $1 AND i.source_url = d.source_url AND i.id <> d.first;

-- defer_image_jobs --
-- One procrastinate job per batch of at most $4 images, in input order, through
-- procrastinate's own defer function, in the caller's transaction: the request and
-- its jobs commit or vanish together, in one call. Returns how many jobs were queued.
SELECT cardinality(procrastinate_defer_jobs_v1(array_agg(
    ROW($2, $3, 0, NULL, NULL, jsonb_build_object('image_ids', ids), NULL)
    ::procrastinate_job_to_defer_v1 ORDER BY batch)))
FROM (SELECT batch, jsonb_agg(id ORDER BY id) AS ids
      FROM (SELECT id, (row_number() OVER (ORDER BY id) - 1) / $4 AS batch
            FROM images WHERE request_id = $1 AND duplicate_of IS NULL) numbered
      GROUP BY batch) batches;

-- claim_images --
-- A worker starts on a job's images (and on their request, if it was still queued), in
-- one round trip; the images already finished are not returned. While the request is
-- queued, its row is locked before any image, as finishing and cancelling lock them, so
-- a claim and a cancel wait for each other instead of deadlocking. The images are
-- locked in id order, as cancelling locks them, for the same reason once the request
-- is processing and its row is no longer taken. The images are updated by the list of
-- ids locked (= ANY), so that the update reads those rows by index however many the
-- table holds: joined to that list otherwise, the plan read the whole table.
WITH locked AS (
    SELECT r.id FROM requests r
    WHERE r.id IN (SELECT request_id FROM images WHERE id = ANY($1::bigint[])) AND r.status = 'queued'
    FOR UPDATE
), ordered AS (
    SELECT i.id FROM images i
    WHERE i.id = ANY($1::bigint[]) AND i.status IN ('queued', 'processing')
      -- Only there to take the lock above first: PostgreSQL runs an uncorrelated
      -- subquery once, before the rows it filters (not a documented promise; the
      -- claim-and-cancel test in tests/integration/test_database.py checks it).
      AND (SELECT count(*) FROM locked) >= 0
    ORDER BY i.id
    FOR UPDATE OF i
), claimed AS (
    UPDATE images i
    SET status = 'processing', attempts = i.attempts + 1, started_at = coalesce(i.started_at, now())
    FROM ordered o, products p
    WHERE i.id = ANY (ARRAY(SELECT id FROM ordered)) AND i.id = o.id AND p.id = i.product_id
    RETURNING i.id, i.request_id, p.serial_number, i.position, i.input_url, i.attempts, i.source_url
), started AS (
    UPDATE requests r
    SET status = 'processing', started_at = now(), updated_at = now()
    WHERE r.id IN (SELECT request_id FROM claimed) AND r.status = 'queued'
)
SELECT c.id, c.request_id::text, c.serial_number, c.position, c.input_url, c.attempts, c.source_url,
       r.reprocess
FROM claimed c JOIN requests r ON r.id = c.request_id ORDER BY c.id;

-- release_image --
-- A transient failure: back to the queue, with the reason, for the next attempt.
UPDATE images SET status = 'queued', error = $2 WHERE id = $1 AND status = 'processing';

-- lock_request --
SELECT status FROM requests WHERE id = $1 FOR UPDATE;

-- images_outgrown --
-- Whether $1 images are more than the planner's statistics say the images table holds
-- (reltuples is -1 before the table's first ANALYZE).
SELECT reltuples < $1 FROM pg_class WHERE oid = 'images'::regclass;

-- analyze_images --
ANALYZE images, products;

-- record_images --
-- The final states of some of a request's images ($1), and their duplicates' (the
-- images of the request with the same source URL, which end with them), in one round
-- trip and one transaction: lock the request row (first, as cancelling does), record
-- the images, count them on the request, and if they were the request's last open
-- images, give the request its final status and queue procrastinate's finish_request
-- job ($3 queue, $4 task). The counters decide, not a count of the images: this
-- statement's snapshot predates its wait for the lock, but the lock returns the newest
-- committed row, so when the last images finish at once on two workers, exactly one
-- sees the total.
-- $2 is a JSON array with an object per image (the columns of v below): its id, 'done'
-- or 'failed', the error, the output's key and URL, bytes in and out, width, height,
-- formats and qualities in and out, kept_original, why the output was reused (NULL:
-- made now), the bytes that saved, and the SHA-256 of the source and of the output.
-- JSON rather than arrays: the planner's estimate of a JSON set does not depend on its
-- value, so the prepared statement settles on one generic plan; with arrays it was
-- planned anew on every call, and planning was most of its cost.
-- An image that downloaded its source's bytes brings the source's record too (its URL,
-- validators, SHA-256 and size; changed_at moves only when the bytes did), and one whose
-- output was made now brings the output's (under its settings key; two workers that made
-- it at once stored the same key, or two keys that both exist, and the row points at
-- one that does). They are written here, in the
-- transaction that records the image, rather than in two statements and two commits of
-- their own an image. Each is written once a statement, in key order, and only once
-- the request row is locked, so that two statements that write the same records take
-- their locks in the same order.
-- Returns the final status when these images finished the request (else NULL), and
-- for each duplicate that ended, the id of the image it ended with.
-- The ids of the images to record are listed first, once (MATERIALIZED), and the
-- images looked up by them (= ANY): the plan then reads only those rows whatever the
-- planner's statistics say. With a new database's stale statistics, a plan that joined
-- them otherwise ran the duplicates' look-up again for every image of the request.
WITH v AS (
    SELECT * FROM json_to_recordset($2::json)
        AS v(id bigint, status text, error text, output_key text, output_url text,
             bytes_in bigint, bytes_out bigint, width int, height int, format_in text,
             format_out text, quality_in int, quality_out int, kept_original bool, reused text,
             bytes_saved bigint, source_sha256 text, output_sha256 text, source_url text,
             etag text, last_modified text, settings_key text)
), targets AS MATERIALIZED (
    SELECT v.id AS leader, v.id AS target FROM v
    UNION ALL
    SELECT v.id, d.id FROM v JOIN images d ON d.duplicate_of = v.id
), locked AS (
    SELECT id, status, done_count + failed_count + cancelled_count AS ended, image_count
    FROM requests WHERE id = $1 FOR UPDATE
), sourced AS (
    INSERT INTO sources AS s (url, etag, last_modified, sha256, bytes)
    SELECT DISTINCT ON (source_url) source_url, etag, last_modified, source_sha256, bytes_in
    FROM v WHERE source_url IS NOT NULL AND EXISTS (SELECT FROM locked)
    ORDER BY source_url
    ON CONFLICT (url) DO UPDATE
    SET etag = excluded.etag, last_modified = excluded.last_modified, sha256 = excluded.sha256,
        bytes = excluded.bytes, fetched_at = now(),
        changed_at = CASE WHEN s.sha256 = excluded.sha256 THEN s.changed_at ELSE now() END
), made AS (
    INSERT INTO outputs (source_sha256, settings_key, output_sha256, output_key, output_url, bytes_in,
                         bytes_out, width, height, format_in, format_out, quality_in, quality_out,
                         kept_original)
    SELECT DISTINCT ON (source_sha256, settings_key) source_sha256, settings_key, output_sha256,
           output_key, output_url, bytes_in, bytes_out, width, height, format_in, format_out,
           quality_in, quality_out, kept_original
    FROM v WHERE settings_key IS NOT NULL AND EXISTS (SELECT FROM locked)
    ORDER BY source_sha256, settings_key
    ON CONFLICT (source_sha256, settings_key) DO UPDATE
    SET output_sha256 = excluded.output_sha256, output_key = excluded.output_key,
        output_url = excluded.output_url, bytes_out = excluded.bytes_out, width = excluded.width,
        height = excluded.height, format_out = excluded.format_out, quality_in = excluded.quality_in,
        quality_out = excluded.quality_out, kept_original = excluded.kept_original,
        created_at = now(), verified_at = now()
), finished AS (
    UPDATE images i
    SET status = v.status, error = v.error, output_key = v.output_key, output_url = v.output_url,
        bytes_in = coalesce(v.bytes_in, i.bytes_in), bytes_out = v.bytes_out, width = v.width,
        height = v.height, format_in = v.format_in, format_out = v.format_out,
        quality_in = v.quality_in, quality_out = v.quality_out, kept_original = v.kept_original,
        finished_at = now(),
        reused = CASE WHEN i.id = v.id THEN v.reused WHEN v.status = 'done' THEN 'duplicate' END,
        bytes_saved = CASE WHEN i.id = v.id THEN v.bytes_saved
                           WHEN v.status = 'done' THEN coalesce(v.bytes_in, 0) + coalesce(v.bytes_out, 0) END,
        source_sha256 = v.source_sha256, output_sha256 = v.output_sha256
    FROM targets t JOIN v ON v.id = t.leader, locked l
    WHERE i.id = ANY (ARRAY(SELECT target FROM targets)) AND i.id = t.target AND i.request_id = $1
      AND i.status IN ('queued', 'processing')
    RETURNING t.leader, i.id, i.request_id, (i.status = 'done')::int AS done,
              (i.status = 'failed')::int AS failed, (i.reused IS NOT NULL)::int AS reused,
              coalesce(i.bytes_saved, 0) AS saved,
              CASE WHEN i.status = 'done' THEN coalesce(v.bytes_in, 0) ELSE 0 END AS done_in,
              CASE WHEN i.status = 'done' THEN coalesce(v.bytes_out, 0) ELSE 0 END AS done_out,
              l.status IN ('queued', 'processing') AS open, l.ended, l.image_count
), totals AS (
    SELECT request_id, sum(done) AS done, sum(failed) AS failed, sum(reused) AS reused,
           sum(saved) AS saved, sum(done_in) AS done_in, sum(done_out) AS done_out,
           bool_and(open) AND max(ended) + count(*) >= max(image_count) AS closes
    FROM finished GROUP BY request_id
), counted AS (
    UPDATE requests r
    SET done_count = r.done_count + f.done, failed_count = r.failed_count + f.failed,
        reused_count = r.reused_count + f.reused, bytes_saved = r.bytes_saved + f.saved,
        done_bytes_in = r.done_bytes_in + f.done_in, done_bytes_out = r.done_bytes_out + f.done_out,
        status = CASE
            WHEN NOT f.closes THEN r.status
            WHEN r.cancel_requested_at IS NOT NULL THEN 'cancelled'
            WHEN r.failed_count + f.failed = 0 THEN 'completed'
            WHEN r.done_count + f.done = 0 THEN 'failed'
            ELSE 'completed_with_errors' END,
        completed_at = CASE WHEN f.closes THEN now() ELSE r.completed_at END,
        updated_at = now()
    FROM totals f
    WHERE r.id = f.request_id
    RETURNING r.id, r.status, f.closes
), queued AS (
    SELECT procrastinate_defer_jobs_v1(ARRAY[
        ROW($3, $4, 0, NULL, 'finish:' || c.id::text, jsonb_build_object('request_id', c.id::text),
            NULL)::procrastinate_job_to_defer_v1])
    FROM counted c WHERE c.closes
)
SELECT (SELECT c.status FROM counted c WHERE c.closes AND EXISTS (SELECT FROM queued)) AS status,
       ARRAY(SELECT leader FROM finished WHERE id <> leader) AS duplicates_of;

-- final_status_by_count --
-- With the request row locked (after a cancel, or by the maintenance task): counts the
-- images, seeing every other image's committed state, and when none is left to run,
-- gives the request its final status and sets its counters from the count.
UPDATE requests r
SET status = CASE WHEN r.cancel_requested_at IS NOT NULL THEN 'cancelled'
                  WHEN c.failed = 0 THEN 'completed'
                  WHEN c.done = 0 THEN 'failed'
                  ELSE 'completed_with_errors' END,
    done_count = c.done, failed_count = c.failed, cancelled_count = c.cancelled,
    done_bytes_in = c.bytes_in, done_bytes_out = c.bytes_out,
    reused_count = c.reused, bytes_saved = c.saved,
    completed_at = now(), updated_at = now()
FROM (SELECT count(*) FILTER (WHERE status = 'done') AS done,
             count(*) FILTER (WHERE status = 'failed') AS failed,
             count(*) FILTER (WHERE status = 'cancelled') AS cancelled,
             count(*) FILTER (WHERE status NOT IN ('done', 'failed', 'cancelled')) AS open,
             coalesce(sum(bytes_in) FILTER (WHERE status = 'done'), 0) AS bytes_in,
             coalesce(sum(bytes_out) FILTER (WHERE status = 'done'), 0) AS bytes_out,
             count(*) FILTER (WHERE status = 'done' AND reused IS NOT NULL) AS reused,
             coalesce(sum(bytes_saved) FILTER (WHERE status = 'done'), 0) AS saved
      FROM images WHERE request_id = $1) c
WHERE r.id = $1 AND r.status IN ('queued', 'processing') AND c.open = 0
RETURNING r.status;

-- get_request --
SELECT pr.request_id, pr.status, pr.total, pr.queued, pr.processing, pr.done, pr.failed,
       pr.cancelled, pr.percent, pr.bytes_in, pr.bytes_out, pr.created_at, pr.updated_at,
       pr.completed_at, r.file_name, r.product_count, r.started_at, r.output_csv_key, r.output_csv_url,
       r.owner, pr.compressed, pr.reused, pr.bytes_saved, r.reprocess
FROM request_progress pr JOIN requests r ON r.id = pr.request_id
WHERE pr.request_id = $1 AND ($2::text IS NULL OR r.owner = $2);

-- list_requests --
-- Newest first, optionally of one status ($1) and of one owner ($4); the total is in
-- every row.
SELECT pr.request_id::text, pr.status, r.file_name, pr.total, pr.queued, pr.processing, pr.done,
       pr.failed, pr.cancelled, pr.percent, pr.created_at, pr.completed_at, r.owner,
       count(*) OVER () AS matching
FROM requests r JOIN request_progress pr ON pr.request_id = r.id
WHERE ($1::text IS NULL OR r.status = $1) AND ($4::text IS NULL OR r.owner = $4)
ORDER BY r.created_at DESC, r.id
LIMIT $2 OFFSET $3;

-- cancel_images --
-- The images are locked in id order, as a claim locks them: a claim and a cancel of a
-- request that is processing then wait for each other instead of deadlocking.
WITH ordered AS (
    SELECT id FROM images WHERE request_id = $1 AND status = 'queued' ORDER BY id FOR UPDATE
)
UPDATE images i SET status = 'cancelled', error = 'cancelled before it was processed', finished_at = now()
FROM ordered o
WHERE i.id = o.id;

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
SELECT product_id, position, input_url, status, output_key, output_url, error, bytes_in, bytes_out,
       width, height, format_in, format_out, quality_in, quality_out, kept_original, attempts,
       reused, bytes_saved
FROM images WHERE product_id = ANY($1::bigint[]) ORDER BY product_id, position;

-- defer_job --
-- One procrastinate job, in the caller's transaction; $4 its queueing lock (no second
-- such job waiting), $5 its lock (no two such jobs running at once, oldest first).
SELECT (procrastinate_defer_jobs_v1(ARRAY[
    ROW($1, $2, 0, $5, $4, $3::jsonb, NULL)::procrastinate_job_to_defer_v1]))[1];

-- get_output_rows --
-- A page of the output CSV's rows, the $3 products after position $2: input order,
-- URLs in input order, empty slots for failures; the output keys beside the URLs that
-- were stored with them, which the links are made from.
SELECT p.position, p.serial, p.name,
       array_agg(i.input_url ORDER BY i.position) AS input_urls,
       array_agg(CASE WHEN i.status = 'done' THEN i.output_key END ORDER BY i.position) AS output_keys,
       array_agg(CASE WHEN i.status = 'done' THEN i.output_url END ORDER BY i.position) AS output_urls
FROM (SELECT id, position, serial, name FROM products
      WHERE request_id = $1 AND position > $2 ORDER BY position LIMIT $3) p
JOIN images i ON i.product_id = p.id
GROUP BY p.id, p.position, p.serial, p.name
ORDER BY p.position;

-- get_request_summary --
-- Of any owner when $2 is NULL, else only of that owner.
SELECT r.status, r.webhook_url, r.completed_at, pr.total, pr.queued, pr.processing, pr.done,
       pr.failed, pr.cancelled, r.owner
FROM requests r JOIN request_progress pr ON pr.request_id = r.id
WHERE r.id = $1 AND ($2::text IS NULL OR r.owner = $2);

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
-- Never over a final state: a late attempt cannot undo 'delivered' or 'failed'.
UPDATE webhook_deliveries
SET state = $2, last_status = $3, last_error = $4, updated_at = now(),
    delivered_at = CASE WHEN $2 = 'delivered' THEN now() END
WHERE id = $1 AND state IN ('pending', 'retrying');

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
-- Unfinished images with no live job: re-queued by the maintenance task. A duplicate
-- has no job while the image it follows is open; it has one of its own only if it
-- was left open after that one ended.
SELECT i.id FROM images i
WHERE i.status IN ('queued', 'processing')
  AND (i.duplicate_of IS NULL
       OR NOT EXISTS (SELECT 1 FROM images f
                      WHERE f.id = i.duplicate_of AND f.status IN ('queued', 'processing')))
  AND NOT EXISTS (SELECT 1 FROM procrastinate_jobs j
                  WHERE j.status IN ('todo', 'doing') AND j.task_name = $1
                    AND j.args->'image_ids' @> to_jsonb(i.id))
LIMIT $2;

-- unfinished_requests --
-- Requests still open with no image left to run: none, while the counters on the
-- request row agree with its images (the maintenance task finishes any it finds).
SELECT r.id FROM requests r
WHERE r.status IN ('queued', 'processing')
  AND NOT EXISTS (SELECT 1 FROM images i
                  WHERE i.request_id = r.id AND i.status IN ('queued', 'processing'))
LIMIT $1;

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

-- get_source --
-- What was last seen at a URL, with the output made from those bytes under the
-- settings $2, if there is one, and whether it was known to be stored less than $3
-- seconds ago: the one round trip before a conditional request.
SELECT s.etag, s.last_modified, s.sha256, s.bytes, o.output_key, o.output_url, o.bytes_out, o.width,
       o.height, o.format_in, o.format_out, o.quality_in, o.quality_out, o.kept_original,
       o.output_sha256, o.verified_at > now() - make_interval(secs => $3) AS trusted
FROM sources s
LEFT JOIN outputs o ON o.source_sha256 = s.sha256 AND o.settings_key = $2
WHERE s.url = $1;

-- get_sources --
-- get_source for a job's URLs ($1), in one round trip.
SELECT s.url, s.etag, s.last_modified, s.sha256, s.bytes, o.output_key, o.output_url, o.bytes_out,
       o.width, o.height, o.format_in, o.format_out, o.quality_in, o.quality_out, o.kept_original,
       o.output_sha256, o.verified_at > now() - make_interval(secs => $3) AS trusted
FROM sources s
LEFT JOIN outputs o ON o.source_sha256 = s.sha256 AND o.settings_key = $2
WHERE s.url = ANY($1::text[]);

-- find_outputs --
-- Stored outputs for some source bytes (their SHA-256s, $1, a JSON array), one row for
-- each that has one (looked_up): made from them under these settings ($2; looked for
-- if $3), or the bytes are themselves one of our outputs (own = true). The first is
-- preferred: an output kept as the original has the source's own SHA-256. A JSON array
-- for the same reason as record_images': one generic plan, whatever the count.
SELECT s.sha256 AS looked_up, f.*
FROM json_array_elements_text($1::json) AS s (sha256)
CROSS JOIN LATERAL (
    (SELECT false AS own, output_key, output_url, bytes_in, bytes_out, width, height, format_in,
            format_out, quality_in, quality_out, kept_original, output_sha256,
            verified_at > now() - make_interval(secs => $4) AS trusted
     FROM outputs WHERE $3 AND source_sha256 = s.sha256 AND settings_key = $2)
    UNION ALL
    (SELECT true, output_key, output_url, bytes_out, bytes_out, width, height, format_out,
            format_out, quality_out, quality_out, true, output_sha256,
            verified_at > now() - make_interval(secs => $4)
     FROM outputs WHERE output_sha256 = s.sha256 ORDER BY created_at LIMIT 1)
    LIMIT 1
) f;

-- output_verified --
-- A HEAD found the object of an output: trusted again for IMGSVC_REUSE_CHECK_SECONDS.
UPDATE outputs SET verified_at = now() WHERE output_key = $1;

-- forget_output --
-- The stored object of an output is gone: the next image makes it again.
DELETE FROM outputs WHERE output_key = $1;
