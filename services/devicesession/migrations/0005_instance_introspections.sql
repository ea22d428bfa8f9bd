-- When each holder instance last asked about an active token: an instance that did so within its
-- cache lifetime may still answer from its cache, so a sign-out waits for its acknowledgement.
ALTER TABLE holder_instances ADD COLUMN last_introspected_at timestamptz;
CREATE INDEX holder_instances_introspected ON holder_instances (last_introspected_at)
    WHERE last_introspected_at IS NOT NULL;
