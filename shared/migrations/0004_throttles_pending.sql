-- Attempts reserved and not yet settled (a password being hashed, a code being looked up): counted
-- with the failures, so parallel attempts are held to the budget (shared.throttle.reserve).
ALTER TABLE throttles ADD COLUMN pending integer NOT NULL DEFAULT 0;
