-- The core tables: a request, its products, their images. These are a public
-- interface: operators query them with psql, so names are plain and documented.

CREATE TABLE requests (
    id              uuid PRIMARY KEY,
    status          text NOT NULL DEFAULT 'queued'
                    CHECK (status IN ('queued', 'processing', 'completed',
                                      'completed_with_errors', 'failed')),
    file_name       text,
    webhook_url     text,
    product_count   integer NOT NULL CHECK (product_count > 0),
    image_count     integer NOT NULL CHECK (image_count > 0),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    completed_at    timestamptz,
    CHECK ((completed_at IS NOT NULL) = (status IN ('completed', 'completed_with_errors', 'failed')))
);
CREATE INDEX requests_created_at ON requests (created_at DESC);
COMMENT ON TABLE requests IS 'One uploaded CSV. status ends as completed (all images done), completed_with_errors or failed (no image done).';

CREATE TABLE products (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    request_id      uuid NOT NULL REFERENCES requests (id) ON DELETE CASCADE,
    position        integer NOT NULL CHECK (position > 0),
    line            integer NOT NULL CHECK (line > 0),
    serial          text NOT NULL,
    serial_number   integer NOT NULL,
    name            text NOT NULL,
    UNIQUE (request_id, position),
    UNIQUE (request_id, serial_number)
);
COMMENT ON TABLE products IS 'One CSV row. position is the row order (1 = first product), line the line in the file; serial and name as sent.';

CREATE TABLE images (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    request_id      uuid NOT NULL REFERENCES requests (id) ON DELETE CASCADE,
    product_id      bigint NOT NULL REFERENCES products (id) ON DELETE CASCADE,
    position        integer NOT NULL CHECK (position > 0),
    input_url       text NOT NULL,
    status          text NOT NULL DEFAULT 'queued'
                    CHECK (status IN ('queued', 'processing', 'done', 'failed')),
    attempts        integer NOT NULL DEFAULT 0,
    error           text,
    output_key      text,
    output_url      text,
    bytes_in        bigint,
    bytes_out       bigint,
    width           integer,
    height          integer,
    format_in       text,
    format_out      text,
    quality_in      integer,
    quality_out     integer,
    kept_original   boolean,
    created_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    finished_at     timestamptz,
    UNIQUE (product_id, position),
    CHECK ((status = 'done') = (output_url IS NOT NULL)),
    CHECK (status <> 'failed' OR error IS NOT NULL)
);
CREATE INDEX images_request_status ON images (request_id, status);
COMMENT ON TABLE images IS 'One source image URL. status: queued, processing, done (output_url set) or failed (error says why, in words).';
COMMENT ON COLUMN images.position IS 'Place of the URL within its product''s "Input Image Urls" cell, from 1.';
COMMENT ON COLUMN images.attempts IS 'How many times a worker started on this image.';
COMMENT ON COLUMN images.quality_in IS 'Estimated quality of the source (JPEG: from its quantization tables; WebP, AVIF: nominal).';
COMMENT ON COLUMN images.kept_original IS 'True when re-encoding did not make the file smaller, so the source bytes were stored as they were.';

CREATE VIEW request_progress AS
SELECT r.id AS request_id,
       r.status,
       r.image_count AS total,
       count(*) FILTER (WHERE i.status = 'queued') AS queued,
       count(*) FILTER (WHERE i.status = 'processing') AS processing,
       count(*) FILTER (WHERE i.status = 'done') AS done,
       count(*) FILTER (WHERE i.status = 'failed') AS failed,
       round(100.0 * count(*) FILTER (WHERE i.status IN ('done', 'failed'))
             / r.image_count, 1)::float8 AS percent,
       coalesce(sum(i.bytes_in) FILTER (WHERE i.status = 'done'), 0)::bigint AS bytes_in,
       coalesce(sum(i.bytes_out) FILTER (WHERE i.status = 'done'), 0)::bigint AS bytes_out,
       r.created_at,
       r.updated_at,
       r.completed_at
FROM requests r
LEFT JOIN images i ON i.request_id = r.id
GROUP BY r.id;
COMMENT ON VIEW request_progress IS 'Per request: image counts by status, percent finished, bytes in and out of the done images.';
