"""linkcode: Plex PIN linking, the OAuth device flow (RFC 8628) and server claim tokens.

Endpoints: ``POST /api/v2/pins`` (4-character code, or a long one with ``strong=true``),
``GET /api/v2/pins/{id}`` (pending, then the token once; 404 code 1020 when expired, unknown or
done), ``PUT /api/v2/pins/link`` (a PIN or an RFC 8628 user code; 204), ``POST /oauth/device/code``,
``POST /oauth/token`` (device_code grant), ``GET /.well-known/oauth-authorization-server``
(RFC 8414), ``GET /api/claim/token(.json)``, ``POST /api/claim/exchange?token=``. Internal (web's
link page): ``GET /internal/codes/{code}?account_id=``, ``POST /internal/codes/{code}/approve``.

Topics out (outbox): ``linkcode.events`` (``pin.linked``, ``device_code.approved``,
``server.claimed``). Holder of sessions: consumes ``sessions.revoked`` through the holder kit
(holder "linkcode") and erases linked-but-uncollected tokens that a revocation covers.

Tables: ``pins``, ``device_codes``, ``claim_tokens`` (codes and tokens as HMACs, pending session
tokens sealed), ``throttles``, ``outbox``, ``processed_events``. Expired rows are purged every
CLEANUP_INTERVAL seconds.

Plex error codes added: 1120 too many wrong codes (429), 1121 too many codes requested (429),
1122 every 4-character code is in use (503), 1123 invalid claim token (400).
"""
