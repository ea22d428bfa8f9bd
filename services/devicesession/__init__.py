"""devicesession: devices, sessions and tokens, and the start of the revocation fan-out.

Endpoints (public on the edge): ``GET /devices.xml`` (``.json``), ``DELETE /devices/{id}.xml``,
``PUT /devices/{clientIdentifier}`` (a server publishes its connections), ``GET /api/v2/resources``
and ``GET /api/resources`` (``services/devicesession/resources.py``), ``POST /oauth/introspect``
(RFC 7662, holder credentials).
Internal (``/internal/*``, bearer INTERNAL_API_SECRET): mint a session, revoke sessions, list and
remove an account's devices, apply a ``password.changed`` handed over by auth (ahead of its copy on
Kafka, under the consumer's processed-events marker), revocation outcome by causing event,
acknowledgements of a revocation (docs/INTERNAL-API.md).

Topics in: ``auth.events`` (``password.changed``, ``passwords.changed``), ``revocations.applied``.
Topics out (through the outbox): ``sessions.revoked`` (the fan-out every holder consumes),
``devicesession.events`` (``device.removed``).

Tables: ``devices``, ``sessions`` (token HMACs only), ``account_cutoffs`` (bulk revocation: a
session is live only if created after its account's cutoff), ``revocations``, ``holders``,
``revocation_acks``, plus the shared ``outbox`` and ``processed_events``.
"""
