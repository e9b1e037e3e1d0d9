-- images_unfinished (id) and images_open_by_request (request_id) index the same rows,
-- the images still queued or processing. The maintenance task's scan for orphaned
-- images, the one query that used the first, takes the second as well, and an upload
-- no longer maintains both for every image it inserts (about a tenth of a
-- 20,000-image insert).
DROP INDEX images_unfinished;
