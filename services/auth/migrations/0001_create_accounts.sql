-- Accounts. `id` (uuid) is the account id on the bus; `num` is the integer id Plex clients expect.
CREATE TABLE accounts (
    id                      uuid PRIMARY KEY,
    num                     bigserial NOT NULL UNIQUE,
    email                   text NOT NULL,
    email_norm              text NOT NULL UNIQUE,
    username                text NOT NULL,
    username_norm           text NOT NULL UNIQUE,
    password_hash           text NOT NULL,
    created_at              timestamptz NOT NULL DEFAULT now(),
    password_changed_at     timestamptz,
    reset_required_at       timestamptz,
    reset_required_reason   text,
    reset_required_incident text
);
CREATE INDEX accounts_created_at ON accounts (created_at);

-- Password reset tokens: only the HMAC is stored; single use; a use invalidates the others.
CREATE TABLE reset_tokens (
    token_hmac     bytea PRIMARY KEY,
    account_id     uuid NOT NULL REFERENCES accounts (id),
    created_at     timestamptz NOT NULL DEFAULT now(),
    expires_at     timestamptz NOT NULL,
    used_at        timestamptz,
    invalidated_at timestamptz,
    incident_id    text
);
CREATE INDEX reset_tokens_outstanding ON reset_tokens (account_id) WHERE used_at IS NULL AND invalidated_at IS NULL;
CREATE INDEX reset_tokens_expires ON reset_tokens (expires_at);
