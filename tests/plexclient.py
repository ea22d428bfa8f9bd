"""Point the real python-plexapi client at Hearth, changing nothing but the base URL.

plexapi hard-codes ``https://plex.tv`` (and ``https://clients.plex.tv``) in its URLs. It accepts a
``requests.Session``; this one carries a transport adapter that sends those hosts' requests to the
Hearth edge instead. Everything else (paths, headers, parsing) is plexapi's own.

    session = plex_session(stack.edge_url)
    account = MyPlexAccount("alice", "secret", session=session)
"""

from __future__ import annotations

from typing import Any

import requests
from requests.adapters import HTTPAdapter

PLEX_HOSTS = ("https://plex.tv", "https://clients.plex.tv", "https://www.plex.tv")


class RebaseAdapter(HTTPAdapter):
    def __init__(self, base_url: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.base_url = base_url.rstrip("/")

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        assert request.url is not None
        for host in PLEX_HOSTS:
            if request.url.startswith(host + "/") or request.url == host:
                request.url = self.base_url + request.url[len(host):]
                break
        return super().send(request, **kwargs)


def plex_session(base_url: str) -> requests.Session:
    session = requests.Session()
    adapter = RebaseAdapter(base_url)
    for host in PLEX_HOSTS:
        session.mount(host + "/", adapter)
    return session
