-- Two-step verification (issue 20). One row per account that has 2FA on or an enrollment pending.
-- The TOTP secret is sealed (AES-GCM, shared.crypto, key id inside the value, context
-- "two-factor:<account id>"); it is never stored in plaintext. ``last_used_step`` is the highest
-- 30-second time step accepted so far: a code is accepted only by a conditional UPDATE raising it,
-- so a code is used once in its step even across replicas.
CREATE TABLE two_factor (
    account_id         uuid PRIMARY KEY REFERENCES accounts (id) ON DELETE CASCADE,
    sealed_secret      text NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT now(),
    enabled_at         timestamptz,
    pending_expires_at timestamptz,
    last_used_step     bigint NOT NULL DEFAULT 0,
    CHECK (enabled_at IS NOT NULL OR pending_expires_at IS NOT NULL)
);
CREATE INDEX two_factor_pending ON two_factor (pending_expires_at) WHERE enabled_at IS NULL;

-- Recovery codes: only their HMAC (TOKEN_HMAC_KEY, purpose "recovery", bound to the account id);
-- redeemed by one conditional UPDATE.
CREATE TABLE recovery_codes (
    account_id uuid NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    code_hmac  bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    used_at    timestamptz,
    PRIMARY KEY (account_id, code_hmac)
);

-- A browser sign-in whose password was right and which now waits for its second factor (web's
-- second step). Only the token's HMAC is stored; single use (used_at), short-lived.
CREATE TABLE pending_signins (
    token_hmac bytea PRIMARY KEY,
    account_id uuid NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    remember   boolean NOT NULL DEFAULT true,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    used_at    timestamptz
);
CREATE INDEX pending_signins_expires ON pending_signins (expires_at);

-- Passkeys (WebAuthn credentials). ``credential_id`` is the authenticator's id (raw bytes).
CREATE TABLE passkeys (
    id            bigserial PRIMARY KEY,
    credential_id bytea NOT NULL UNIQUE,
    account_id    uuid NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    public_key    bytea NOT NULL,
    sign_count    bigint NOT NULL DEFAULT 0,
    name          text NOT NULL,
    transports    text[] NOT NULL DEFAULT '{}',
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_used_at  timestamptz
);
CREATE INDEX passkeys_account ON passkeys (account_id);

-- WebAuthn user handles: one random 32-byte handle per account (never the account id itself).
CREATE TABLE webauthn_users (
    account_id  uuid PRIMARY KEY REFERENCES accounts (id) ON DELETE CASCADE,
    user_handle bytea NOT NULL UNIQUE
);

-- WebAuthn challenges: single use (deleted when redeemed) and expiring; in the database so a
-- challenge issued by one replica is redeemed (once) by any. Stored as an HMAC.
CREATE TABLE webauthn_challenges (
    challenge_hmac bytea PRIMARY KEY,
    purpose        text NOT NULL CHECK (purpose IN ('register', 'authenticate')),
    account_id     uuid REFERENCES accounts (id) ON DELETE CASCADE,
    created_at     timestamptz NOT NULL DEFAULT now(),
    expires_at     timestamptz NOT NULL
);
CREATE INDEX webauthn_challenges_expires ON webauthn_challenges (expires_at);
