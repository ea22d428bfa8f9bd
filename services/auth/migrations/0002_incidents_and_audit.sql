-- Breach response: one row per incident (its selection, options, progress cursor and counters), one
-- row per account it selected (the idempotency key: an account is flagged, revoked and emailed once
-- per incident), and the audit trail of every admin action.
CREATE TABLE incidents (
    id          text PRIMARY KEY,
    selector    jsonb NOT NULL,
    sign_out    boolean NOT NULL,
    notify      boolean NOT NULL,
    reason      text NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    cursor_id   uuid,
    batches     integer NOT NULL DEFAULT 0,
    flagged     bigint NOT NULL DEFAULT 0,
    revocation_events integer NOT NULL DEFAULT 0
);

CREATE TABLE incident_accounts (
    incident_id text NOT NULL REFERENCES incidents (id),
    account_id  uuid NOT NULL,
    flagged_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (incident_id, account_id)
);

CREATE TABLE admin_audit (
    id          bigserial PRIMARY KEY,
    actor       text NOT NULL,
    action      text NOT NULL,
    args        jsonb NOT NULL,
    affected    bigint,
    outcome     text NOT NULL DEFAULT 'started',
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);
