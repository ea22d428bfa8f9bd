-- A claim token is a credential derived from the session that asked for it: it records that
-- session (and keeps its token sealed until the exchange checks it), so that a revocation covering
-- the session voids the claim too.
ALTER TABLE claim_tokens ADD COLUMN session_id uuid;
ALTER TABLE claim_tokens ADD COLUMN sealed_session text;
ALTER TABLE claim_tokens ADD COLUMN revoked_at timestamptz;
CREATE INDEX claim_tokens_session ON claim_tokens (session_id) WHERE used_at IS NULL AND revoked_at IS NULL;
CREATE INDEX claim_tokens_account ON claim_tokens (account_id) WHERE used_at IS NULL AND revoked_at IS NULL;
