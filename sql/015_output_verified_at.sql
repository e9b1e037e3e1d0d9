-- When a stored output was last known to be in the store, so that a reuse trusts a
-- recent record instead of asking the store with a HEAD every time. IF NOT EXISTS: a
-- database made by a development build of 013 has the column already.
ALTER TABLE outputs ADD COLUMN IF NOT EXISTS verified_at timestamptz NOT NULL DEFAULT now();
COMMENT ON COLUMN outputs.verified_at IS 'When the object was last known to be in the store: stored, or found by a HEAD. Older than IMGSVC_REUSE_CHECK_SECONDS, it is checked again before a reuse.';
