-- Bulk revocation (the breach command's batches, `hearth admin revoke-sessions --all`) records one
-- cutoff per account instead of updating every session row: a session is live only while it was
-- created after its account's cutoff. A batch of 1,000 accounts writes 1,000 narrow rows rather than
-- ~3,000 new session versions and their index entries (an update that changes revoked_at cannot be
-- HOT: the partial indexes' predicate reads it). Per-session revocations still set revoked_at.
CREATE TABLE account_cutoffs (
    account_id     uuid PRIMARY KEY,
    revoked_before timestamptz NOT NULL,
    reason         text NOT NULL
);
