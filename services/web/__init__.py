"""web: the account pages on the edge origin.

Pages: ``/signup``, ``/signin``, ``/signout``, ``/forgot``, ``/reset`` (from the emailed link),
``/account`` (devices, remove, sign out others, change password with "Sign out connected devices
after password change"), ``/link`` (4-character PIN, strong code or RFC 8628 user code; ``?code=``
prefills), ``/claim`` (claim token with countdown, copy button and the ``PLEX_CLAIM`` Docker line),
``/auth`` and ``/auth/`` (the auth app of "Sign in with Plex" popups, ``services/web/authapp.py``).

A browser session is an ordinary devicesession session of kind ``browser`` (minted through auth's
sign-in), kept in the HttpOnly, SameSite=Lax ``hearth_session`` cookie (Secure over HTTPS). web is
a session holder (holder kit, holder "web"): a revoked browser session is refused on its next
request. Every form carries a CSRF token bound to the browser's ``hearth_csrf`` cookie.

No database: web keeps no state of its own. Calls auth, devicesession and linkcode over HTTP.

Layout: no ``service.py``, ``store.py``, ``events.py``, ``errors.py`` or ``migrations/``. web has
no domain logic and no tables (each page calls the service that owns the data), consumes nothing
but ``sessions.revoked`` through the holder kit (which needs no handler here), and raises the
shared error types, rendered as pages by ``shared.app.HTML_ERRORS``. Its modules are ``routes.py``
(the pages), ``authapp.py`` (the auth app) and ``two_factor_pages.py`` (two-step and passkeys).
"""
