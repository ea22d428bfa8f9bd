-- Devices: one per (account, X-Plex-Client-Identifier). `id` is the integer Plex clients see.
CREATE TABLE devices (
    id                bigserial PRIMARY KEY,
    uuid              uuid NOT NULL UNIQUE DEFAULT gen_random_uuid(),
    account_id        uuid NOT NULL,
    client_identifier text NOT NULL,
    kind              text NOT NULL DEFAULT 'player',
    product           text NOT NULL DEFAULT '',
    version           text NOT NULL DEFAULT '',
    platform          text NOT NULL DEFAULT '',
    platform_version  text NOT NULL DEFAULT '',
    device            text NOT NULL DEFAULT '',
    device_name       text NOT NULL DEFAULT '',
    model             text NOT NULL DEFAULT '',
    vendor            text NOT NULL DEFAULT '',
    provides          text NOT NULL DEFAULT '',
    public_address    text NOT NULL DEFAULT '',
    connections       jsonb NOT NULL DEFAULT '[]',
    created_at        timestamptz NOT NULL DEFAULT now(),
    last_seen_at      timestamptz NOT NULL DEFAULT now(),
    removed_at        timestamptz,
    UNIQUE (account_id, client_identifier)
);
CREATE INDEX devices_account ON devices (account_id) WHERE removed_at IS NULL;

-- Sessions: only the token's HMAC is stored.
CREATE TABLE sessions (
    id             uuid PRIMARY KEY,
    token_hmac     bytea NOT NULL UNIQUE,
    account_id     uuid NOT NULL,
    device_id      bigint NOT NULL REFERENCES devices (id),
    created_at     timestamptz NOT NULL DEFAULT now(),
    last_used_at   timestamptz NOT NULL DEFAULT now(),
    expires_at     timestamptz,
    revoked_at     timestamptz,
    revoked_reason text
);
CREATE INDEX sessions_account_active ON sessions (account_id) WHERE revoked_at IS NULL;
CREATE INDEX sessions_device_active ON sessions (device_id) WHERE revoked_at IS NULL;

-- One row per published revocation; causing_event_id makes the password.changed consumer
-- idempotent on its cause even across consumer groups.
CREATE TABLE revocations (
    id               uuid PRIMARY KEY,
    account_id       uuid,
    causing_event_id uuid UNIQUE,
    cause            text NOT NULL,
    revoked          integer NOT NULL,
    cutoff           timestamptz NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now()
);

-- Holders seen (introspection or acknowledgements) and their acknowledgements of revocations:
-- the fan-out view ("which holders applied which revocation, how fast").
CREATE TABLE holders (
    id            text PRIMARY KEY,
    first_seen_at timestamptz NOT NULL DEFAULT now(),
    last_seen_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE revocation_acks (
    revocation_id uuid NOT NULL,
    holder_id     text NOT NULL,
    applied_at    timestamptz NOT NULL,
    received_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (revocation_id, holder_id)
);
