"""``hearth.testing``: test your own session holder (media server, API) against a real Hearth.

Installed with Hearth, it registers a pytest plugin (entry point ``pytest11``, name ``hearth``)
whose fixtures are described in :mod:`hearth_testing.plugin`; nothing starts unless a test uses one.
"""

from hearth_testing.client import Account, HearthError, HearthStack, HolderCredentials, kit_ready

__all__ = ["Account", "HearthError", "HearthStack", "HolderCredentials", "kit_ready"]
