"""Code every Hearth service shares: settings, database, events, outbox, consumers, HTTP app
factory, errors, Plex rendering, token and password helpers, and the holder kit.

Services import from here and never from each other.
"""
