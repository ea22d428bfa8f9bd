-- Throttling counters (sign-in failures, reset requests, code entries, creation limits...):
-- a fixed window per scope; `blocked_until` grows with repeated hits past the free allowance.
CREATE TABLE throttles (
    scope         text PRIMARY KEY,
    hits          integer NOT NULL,
    window_start  timestamptz NOT NULL,
    blocked_until timestamptz
);
