-- A request belongs to the API key that made it: keys with the user role see only
-- their own requests. The owner is the key's name from IMGSVC_API_KEYS, never the key.
-- An Idempotency-Key is now one owner's: the same key from two owners makes two
-- requests, and no owner gets another's request back by replaying its key.
ALTER TABLE requests ADD COLUMN owner text;
COMMENT ON COLUMN requests.owner IS 'The name of the API key that uploaded the request (IMGSVC_API_KEYS); NULL when the service ran without keys, or for requests made before owners were kept: only admin keys see those.';

ALTER TABLE requests DROP CONSTRAINT requests_idempotency_key_key;
CREATE UNIQUE INDEX requests_owner_idempotency_key ON requests ((coalesce(owner, '')), idempotency_key);
CREATE INDEX requests_owner_created_at ON requests (owner, created_at DESC) WHERE owner IS NOT NULL;
