-- Plex PINs (4-character link codes and long "strong" codes). The code and the pending session
-- token are never stored in plaintext: the code as an HMAC, the token sealed until collected.
CREATE TABLE pins (
    id                bigserial PRIMARY KEY,
    strong            boolean NOT NULL,
    code_hmac         bytea NOT NULL UNIQUE,
    client_identifier text NOT NULL,
    device            jsonb NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    expires_at        timestamptz NOT NULL,
    account_id        uuid,
    linked_at         timestamptz,
    session_id        uuid,
    sealed_token      text,
    collected_at      timestamptz,
    revoked_at        timestamptz
);
CREATE INDEX pins_expires ON pins (expires_at);
CREATE INDEX pins_session ON pins (session_id) WHERE sealed_token IS NOT NULL;
CREATE INDEX pins_account ON pins (account_id) WHERE sealed_token IS NOT NULL;

-- RFC 8628 device authorization: device code and user code stored as HMACs.
CREATE TABLE device_codes (
    id               bigserial PRIMARY KEY,
    device_code_hmac bytea NOT NULL UNIQUE,
    user_code_hmac   bytea NOT NULL UNIQUE,
    client_id        text NOT NULL,
    scope            text NOT NULL DEFAULT '',
    poll_interval    integer NOT NULL,
    last_poll_at     timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz NOT NULL,
    status           text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'approved', 'denied', 'done')),
    account_id       uuid,
    approved_at      timestamptz,
    session_id       uuid,
    sealed_token     text
);
CREATE INDEX device_codes_expires ON device_codes (expires_at);
CREATE INDEX device_codes_session ON device_codes (session_id) WHERE sealed_token IS NOT NULL;

-- Server claim tokens ("claim-..."): HMAC only, single use, short-lived.
CREATE TABLE claim_tokens (
    token_hmac bytea PRIMARY KEY,
    account_id uuid NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    used_at    timestamptz
);
CREATE INDEX claim_tokens_expires ON claim_tokens (expires_at);
