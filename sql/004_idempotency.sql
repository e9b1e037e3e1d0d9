-- Idempotent uploads: the same Idempotency-Key gives the same request, once.

ALTER TABLE requests
    ADD COLUMN idempotency_key text UNIQUE,
    ADD COLUMN csv_sha256 text;
COMMENT ON COLUMN requests.idempotency_key IS 'The Idempotency-Key header of the upload, if it had one: a second upload with it gets this request back.';
COMMENT ON COLUMN requests.csv_sha256 IS 'SHA-256 of the uploaded file, to refuse a key reused for a different file.';
