-- Issue 17: every instance of a holder applies every revocation, and acknowledges it under its own
-- instance id (pod name, INSTANCE_ID, hostname-pid). An ack is unique per (revocation, holder, instance).
ALTER TABLE revocation_acks ADD COLUMN instance_id text NOT NULL DEFAULT '';
ALTER TABLE revocation_acks DROP CONSTRAINT revocation_acks_pkey;
ALTER TABLE revocation_acks ADD PRIMARY KEY (revocation_id, holder_id, instance_id);

-- The instances each holder has run, from their acknowledgements: an instance counts as expected to
-- apply a revocation when it acknowledged something before it and something at or after it.
CREATE TABLE holder_instances (
    holder_id     text NOT NULL,
    instance_id   text NOT NULL,
    first_seen_at timestamptz NOT NULL DEFAULT now(),
    last_seen_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (holder_id, instance_id)
);
CREATE INDEX holder_instances_last_seen ON holder_instances (last_seen_at);
