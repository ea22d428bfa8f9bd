-- When the last attempt was reserved in a scope: reservations older than a minute are taken to be
-- attempts whose process died before settling them (shared.throttle.STALE_PENDING), so a killed
-- replica cannot leave a scope short of places for good.
ALTER TABLE throttles ADD COLUMN pending_at timestamptz;
