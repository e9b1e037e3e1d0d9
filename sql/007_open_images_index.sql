-- "Is any image of this request still open?" is asked each time an image finishes,
-- under the request's row lock. A partial index keeps it an index look-up whatever
-- the table statistics say (with stale ones, the plan could scan the whole table).
CREATE INDEX images_open_by_request ON images (request_id) WHERE status IN ('queued', 'processing');
