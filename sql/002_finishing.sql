-- Finishing a request: its output CSV, and the webhook that announces it.

ALTER TABLE requests
    ADD COLUMN output_csv_key text,
    ADD COLUMN output_csv_url text;
COMMENT ON COLUMN requests.output_csv_url IS 'The output CSV (input columns plus "Output Image Urls"), written once the request is final.';

CREATE TABLE webhook_deliveries (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    request_id      uuid NOT NULL UNIQUE REFERENCES requests (id) ON DELETE CASCADE,
    event_id        text NOT NULL UNIQUE,
    event_type      text NOT NULL DEFAULT 'request.completed',
    url             text NOT NULL,
    payload         text NOT NULL,
    state           text NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'retrying', 'delivered', 'failed')),
    attempts        integer NOT NULL DEFAULT 0,
    last_status     integer,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz
);
COMMENT ON TABLE webhook_deliveries IS 'One event a finished request, sent to its webhook URL. event_id is the webhook-id header of every attempt; payload is the exact body signed and sent.';
COMMENT ON COLUMN webhook_deliveries.state IS 'pending (not tried yet), retrying (a retryable failure; another attempt is scheduled), delivered (a 2xx answer) or failed (gave up; last_error says why).';

CREATE TABLE webhook_attempts (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    delivery_id     bigint NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    attempt         integer NOT NULL,
    started_at      timestamptz NOT NULL,
    duration_ms     integer NOT NULL,
    http_status     integer,
    error           text,
    UNIQUE (delivery_id, attempt)
);
COMMENT ON TABLE webhook_attempts IS 'Every attempt at a webhook delivery: when, how long, and the HTTP status or the error.';
