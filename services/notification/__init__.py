"""notification: every account event becomes the right email, exactly once in effect.

Consumes ``auth.events`` (``account.created``, ``password.reset_requested``, ``password.changed``,
``account.reset_required``, ``accounts.reset_required``), ``devicesession.events`` and
``linkcode.events`` (``pin.linked``, ``device_code.approved``, ``server.claimed``). Sends over SMTP
(``SMTP_URL``; aiosmtplib, reused connections, concurrency and rate limits). Publishes dead letters
on ``notification.dead-letters`` (through the outbox). Internal route:
``GET /internal/incidents/{id}/deliveries`` (counts by status, for ``hearth admin incident status``).

Tables: ``recipients`` (account id -> email, from auth events), ``deliveries`` (one row per email:
status queued/sending/sent/failed/dead, attempts, last error, timestamps, priority), plus ``outbox``
and ``processed_events``. Templates: ``templates/<kind>.subject.txt|.txt|.html``, overridable from
``TEMPLATE_DIR``. Delivery guarantees and the SMTP duplicate window: see ``service.py``.
"""
