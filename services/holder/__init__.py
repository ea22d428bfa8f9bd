"""The sample holder: a minimal media server built on the holder kit.

``hearth holder --name NAME --port PORT``: ``GET /library`` answers 200 for a valid
``X-Plex-Token`` (header or query) and 401 otherwise, and so does ``GET /`` (the server identity
python-plexapi's ``PlexServer`` and ``MyPlexResource.connect()`` read first); ``/healthz``, ``/readyz`` (the kit's
revocation consumer is assigned), ``/metrics``. Any number of named instances can run at once; each
consumes ``sessions.revoked`` in its own group ``holder.<name>``.

Credentials: ``HOLDER_CREDENTIAL`` (what an operator hands a third-party holder, from
``hearth admin holder-credentials NAME``), or, in development, derived from ``HOLDER_SECRET``.
"""
