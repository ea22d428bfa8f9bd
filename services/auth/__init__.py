"""auth: accounts and credentials, where the revocation chain starts.

Endpoints (Plex-compatible, XML by default, JSON on request): ``POST /api/v2/users`` (sign up),
``POST /api/v2/users/signin``, ``GET /api/v2/user``, ``DELETE /api/v2/users/signout``,
``GET /api/v2/ping``, ``GET /api/users/``, ``POST /api/v2/users/password/reset`` (always 204),
``PUT /api/v2/users/password`` (reset with token), ``PUT /api/v2/user/password`` (change while signed
in); the older routes browser sign-in apps use (``services/auth/legacy.py``): ``GET /users/account``
(``.json``/``.xml``), ``POST /users/sign_in`` (``.json``/``.xml``), ``GET /api/users`` (always XML),
``GET /api/servers/{id}/shared_servers``. Internal: ``GET /internal/accounts/{id}``, ``GET /internal/accounts?login=``,
``POST /internal/accounts/{id}/reset-required`` (docs/INTERNAL-API.md). Two-step verification and
passkeys: ``/api/v2/user/two-factor`` (+ ``/recovery-codes``) and their internal routes (modules
``two_factor``, ``two_factor_routes``, ``passkeys``; README, "Two-step verification and passkeys").

Topics out (outbox): ``auth.events``: ``account.created``, ``password.changed``,
``password.reset_requested`` (token sealed for notification), ``account.reset_required``,
``two_factor.enabled``, ``two_factor.disabled``, ``two_factor.recovery_code_used``, and the
breach command's batch forms. Consumes ``sessions.revoked`` through the holder kit (holder "auth").

Tables: ``accounts``, ``reset_tokens`` (HMACs only), ``throttles``, ``two_factor`` (sealed secrets),
``recovery_codes`` and ``pending_signins`` (HMACs only), ``passkeys``, ``webauthn_users``,
``webauthn_challenges`` (HMACs, single use), plus ``outbox`` and
``processed_events``.

Plex error codes added by Hearth (same ``errors`` shape): 1110 password reset required (403),
1111 too many attempts (429, ``Retry-After``), 1112 weak password (400, message names the rule),
1113 invalid, expired or used reset token (400), 1114 email taken (409), 1115 username taken (409),
1116 invalid field (400).

Passwords: argon2id, default 19 MiB / 2 passes / parallelism 1 (OWASP's minimum for argon2id:
strong enough against GPU cracking while a 2-core server still verifies tens per second), computed in
a thread pool off the event loop, at most ARGON2_CONCURRENCY at once; optional pepper with key id.
"""
