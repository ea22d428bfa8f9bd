-- Bulk revocations of a breach response are grouped by incident, for `hearth admin incident status`.
ALTER TABLE revocations ADD COLUMN incident_id text;
CREATE INDEX revocations_incident ON revocations (incident_id) WHERE incident_id IS NOT NULL;
CREATE INDEX revocation_acks_holder ON revocation_acks (holder_id);
