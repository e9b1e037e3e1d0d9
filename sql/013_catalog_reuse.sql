-- Catalogs: every distinct image is downloaded, compressed and stored once.
--
-- sources: what was last seen at a source URL (its validators and the SHA-256 of its
-- bytes). outputs: what was made from a source's bytes, under the settings that shape
-- the output, and stored under a key named by the output's own SHA-256. A later image
-- with the same URL asks the origin with the validators; with the same bytes, or with
-- bytes that are one of our outputs, it reuses the stored output instead of making it
-- again. Rows of earlier requests keep their keys and URLs: only new outputs use the
-- content-addressed layout.

CREATE TABLE sources (
    url             text PRIMARY KEY,
    etag            text,
    last_modified   text,
    sha256          text NOT NULL,
    bytes           bigint NOT NULL,
    first_seen_at   timestamptz NOT NULL DEFAULT now(),
    changed_at      timestamptz NOT NULL DEFAULT now(),
    fetched_at      timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE sources IS 'Per source URL (scheme and host lower-cased, default port dropped): its validators and the SHA-256 of the bytes last fetched.';
COMMENT ON COLUMN sources.etag IS 'The strong ETag last sent with these bytes (weak ones are not kept: they do not promise the same bytes).';
COMMENT ON COLUMN sources.changed_at IS 'When the bytes at this URL were last seen to change (or first seen).';
COMMENT ON COLUMN sources.fetched_at IS 'When a body was last downloaded from this URL (a 304 leaves it).';

CREATE TABLE outputs (
    source_sha256   text NOT NULL,
    settings_key    text NOT NULL,
    output_sha256   text NOT NULL,
    output_key      text NOT NULL,
    output_url      text NOT NULL,
    bytes_in        bigint NOT NULL,
    bytes_out       bigint NOT NULL,
    width           integer,
    height          integer,
    format_in       text,
    format_out      text,
    quality_in      integer,
    quality_out     integer,
    kept_original   boolean NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source_sha256, settings_key)
);
CREATE INDEX outputs_output_sha256 ON outputs (output_sha256);
COMMENT ON TABLE outputs IS 'What was made from a source''s bytes (source_sha256) under the settings that shape an output (settings_key), and where it is stored.';
COMMENT ON COLUMN outputs.settings_key IS 'The quality factor, the encoder rules and libvips'' version that made the output: another key is compressed again.';
COMMENT ON COLUMN outputs.output_sha256 IS 'SHA-256 of the stored bytes; a source with these bytes is one of our outputs and is never compressed again.';

ALTER TABLE requests
    ADD COLUMN reprocess boolean NOT NULL DEFAULT false,
    ADD COLUMN reused_count integer NOT NULL DEFAULT 0,
    ADD COLUMN bytes_saved bigint NOT NULL DEFAULT 0;
COMMENT ON COLUMN requests.reprocess IS 'Uploaded with reprocess=true: every image compressed again, no stored result reused.';
COMMENT ON COLUMN requests.reused_count IS 'Done images whose output was reused rather than made again.';
COMMENT ON COLUMN requests.bytes_saved IS 'Bytes not downloaded and not stored thanks to reuse (images.bytes_saved summed).';

ALTER TABLE images
    ADD COLUMN source_url text,
    ADD COLUMN duplicate_of bigint,
    ADD COLUMN reused text CHECK (reused IN ('duplicate', 'not_modified', 'same_content', 'own_output')),
    ADD COLUMN bytes_saved bigint,
    ADD COLUMN source_sha256 text,
    ADD COLUMN output_sha256 text;
COMMENT ON COLUMN images.source_url IS 'input_url with scheme and host lower-cased and the default port dropped: the key of sources and of duplicates within a request.';
COMMENT ON COLUMN images.duplicate_of IS 'The image of the same request with the same source_url that does the work; this one has no job and ends with it.';
COMMENT ON COLUMN images.reused IS 'Why a done image made no new output: duplicate (same URL earlier in the request), not_modified (the origin answered 304), same_content (bytes already compressed), own_output (the source is one of our outputs).';
COMMENT ON COLUMN images.bytes_saved IS 'Bytes not downloaded (duplicate, not_modified) and not stored (every reuse).';
COMMENT ON COLUMN images.source_sha256 IS 'SHA-256 of the source bytes this image was made from.';

CREATE INDEX images_duplicate_of ON images (duplicate_of) WHERE duplicate_of IS NOT NULL;

-- The view gains the reuse counts (new columns go last).
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
       r.cancelled_count::bigint AS cancelled,
       r.reused_count::bigint AS reused,
       (r.done_count - r.reused_count)::bigint AS compressed,
       r.bytes_saved
FROM requests r
CROSS JOIN LATERAL (SELECT count(*) AS processing FROM images i
                    WHERE i.request_id = r.id AND i.status = 'processing') p;
