-- Issue 17: SMTP_RATE is the provider's limit for the whole deployment, not per replica. Each
-- replica takes its sends from a per-second budget shared in this table.
CREATE TABLE send_budget (
    second bigint PRIMARY KEY,  -- unix time of the database clock, whole seconds
    used   integer NOT NULL,
    last_grant integer NOT NULL  -- what the latest upsert granted (its RETURNING value)
);
