-- Consumer idempotency: one row per (consumer group, event id) applied. The handler's effects and
-- this row commit in one transaction, so a redelivered event is recognised and skipped.
CREATE TABLE processed_events (
    consumer     text NOT NULL,
    event_id     uuid NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);
CREATE INDEX processed_events_processed_at ON processed_events (processed_at);
