-- Who to write to: a projection of accounts from auth.events (linkcode events carry only ids).
CREATE TABLE recipients (
    account_id uuid PRIMARY KEY,
    email      text NOT NULL,
    username   text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- One row per email to send, keyed by the event (and the position in a batch event): a redelivered
-- event inserts nothing new. Template context is stored without secrets; a reset token stays sealed
-- until the moment of rendering.
CREATE TABLE deliveries (
    id              bigserial PRIMARY KEY,
    event_id        uuid NOT NULL,
    part            integer NOT NULL DEFAULT 0,
    kind            text NOT NULL,
    priority        smallint NOT NULL,
    account_id      uuid,
    email           text,
    context         jsonb NOT NULL,
    incident_id     text,
    status          text NOT NULL DEFAULT 'queued'
                    CHECK (status IN ('queued', 'sending', 'sent', 'failed', 'dead')),
    attempts        integer NOT NULL DEFAULT 0,
    last_error      text,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    claimed_at      timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    sent_at         timestamptz,
    UNIQUE (event_id, part)
);
CREATE INDEX deliveries_due ON deliveries (priority, id) WHERE status IN ('queued', 'failed');
CREATE INDEX deliveries_sending ON deliveries (claimed_at) WHERE status = 'sending';
CREATE INDEX deliveries_incident ON deliveries (incident_id) WHERE incident_id IS NOT NULL;

CREATE FUNCTION deliveries_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('deliveries', '');
    RETURN NULL;
END $$;
CREATE TRIGGER deliveries_notify AFTER INSERT ON deliveries
    FOR EACH STATEMENT EXECUTE FUNCTION deliveries_notify();
