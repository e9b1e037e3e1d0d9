-- images_unfinished (id) and images_open_by_request (request_id) index the same rows,
-- the images still queued or processing. The maintenance task's scan for orphaned
-- images, the one query that used the first, takes the second as well (which also
-- serves the look-up of requests with no open image left), and an upload no longer
-- maintains both for every image it inserts (about 20 ms of a 10,000-row upload).
DROP INDEX images_unfinished;
