"""A small client of a running Hearth, for tests of apps that hold Hearth sessions.

Standard library only (urllib), so it runs in any test suite and in a thread beside an event loop.
"""

from __future__ import annotations

import json
import secrets
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


class HearthError(RuntimeError):
    def __init__(self, status: int, body: str, what: str) -> None:
        super().__init__(f"{what}: HTTP {status}: {body[:300]}")
        self.status = status


@dataclass(frozen=True)
class HolderCredentials:
    """What an app needs to hold sessions: pass these to ``shared.holder.HolderKit``."""

    holder_id: str
    holder_secret: str = field(repr=False)
    introspect_url: str
    kafka_bootstrap: str
    topic_prefix: str

    def kit_kwargs(self) -> dict[str, str]:
        return {"holder_id": self.holder_id, "holder_secret": self.holder_secret,
                "introspect_url": self.introspect_url, "bootstrap": self.kafka_bootstrap,
                "topic_prefix": self.topic_prefix}


@dataclass
class Account:
    id: str
    username: str
    email: str
    password: str = field(repr=False)
    token: str = field(repr=False)


@dataclass
class HearthStack:
    """A running Hearth: its public edge plus what a holder and the test helpers need."""

    edge_url: str
    devicesession_url: str
    kafka_bootstrap: str
    topic_prefix: str = ""
    internal_api_secret: str = field(default="", repr=False)
    holder_master_secret: str = field(default="", repr=False)
    mode: str = "url"

    # ------------------------------------------------------------------ HTTP

    def _call(self, method: str, url: str, what: str, *, form: dict[str, str] | None = None,
              headers: dict[str, str] | None = None, timeout: float = 30) -> tuple[int, Any, dict[str, str]]:
        data = urllib.parse.urlencode(form).encode() if form is not None else None
        hdrs = {"Accept": "application/json", "X-Plex-Client-Identifier": "hearth-testing", **(headers or {})}
        req = urllib.request.Request(url, data=data, method=method, headers=hdrs)  # noqa: S310 - http(s) URLs
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310
                raw = r.read()
                return r.status, (json.loads(raw) if raw else None), dict(r.headers)
        except urllib.error.HTTPError as exc:
            raise HearthError(exc.code, exc.read().decode(errors="replace"), what) from None

    def edge(self, method: str, path: str, what: str, **kw: Any) -> tuple[int, Any, dict[str, str]]:
        return self._call(method, self.edge_url + path, what, **kw)

    def internal(self, path: str, what: str) -> Any:
        if not self.internal_api_secret:
            raise RuntimeError("this Hearth's INTERNAL_API_SECRET is unknown (set HEARTH_ENV_FILE)")
        _, body, _ = self._call("GET", self.devicesession_url + path, what,
                                headers={"Authorization": f"Bearer {self.internal_api_secret}"})
        return body

    # ------------------------------------------------------------------ accounts

    def sign_up(self, password: str | None = None, client: str = "hearth-testing") -> Account:
        """A fresh account, signed in once (its ``token`` is that session's)."""
        name = f"t{secrets.token_hex(6)}"
        password = password or f"pw {secrets.token_urlsafe(18)}"
        email = f"{name}@example.org"
        _, body, _ = self.edge("POST", "/api/v2/users", "sign-up",
                               form={"email": email, "username": name, "password": password})
        token = self.sign_in(name, password, client=client)
        return Account(id=str(body["uuid"]), username=name, email=email, password=password, token=token)

    def sign_in(self, login: str, password: str, client: str = "hearth-testing") -> str:
        _, body, _ = self.edge("POST", "/api/v2/users/signin", "sign-in", form={"login": login, "password": password},
                               headers={"X-Plex-Client-Identifier": client})
        return str(body["authToken"])

    def user_status(self, token: str) -> int:
        try:
            status, _, _ = self.edge("GET", "/api/v2/user", "user", headers={"X-Plex-Token": token})
            return status
        except HearthError as exc:
            return exc.status

    def holder_credentials(self, holder_id: str | None = None) -> HolderCredentials:
        from shared.holder import holder_secret

        if not self.holder_master_secret:
            raise RuntimeError("this Hearth's HOLDER_SECRET is unknown (set HEARTH_ENV_FILE)")
        hid = holder_id or f"app-{secrets.token_hex(4)}"
        return HolderCredentials(hid, holder_secret(self.holder_master_secret, hid),
                                 self.devicesession_url.rstrip("/") + "/oauth/introspect", self.kafka_bootstrap,
                                 self.topic_prefix)

    # ------------------------------------------------------------------ sign-out

    def change_password(self, account: Account, *, new_password: str | None = None) -> str:
        """Change ``account``'s password with "sign out connected devices"; returns the change's event
        id. The session in ``account.token`` is the one making the change, so it stays signed in;
        every other session of the account is revoked."""
        new_password = new_password or f"pw {secrets.token_urlsafe(18)}"
        _, _, headers = self.edge("PUT", "/api/v2/user/password", "password change",
                                  form={"currentPassword": account.password, "password": new_password,
                                        "signOutDevices": "true"}, headers={"X-Plex-Token": account.token})
        account.password = new_password
        event_id = headers.get("X-Hearth-Event-Id") or headers.get("x-hearth-event-id")
        if not event_id:
            raise RuntimeError("the password change answered without X-Hearth-Event-Id")
        return event_id

    def revocation_acks(self, event_id: str) -> list[dict[str, Any]] | None:
        """The acknowledgements (``holder_id``, ``instance_id``, ``applied_at``) of the revocation
        that event ``event_id`` caused; None while devicesession has not recorded that revocation."""
        try:
            revocation_id = self.internal(f"/internal/revocations?causing_event_id={event_id}",
                                          "revocation")["revocation_id"]
        except HearthError as exc:
            if exc.status != 404:
                raise
            return None
        acks: list[dict[str, Any]] = self.internal(f"/internal/revocations/{revocation_id}/acks", "acks")["acks"]
        return acks

    def change_password_and_wait(self, account: Account, holder_id: str, *, new_password: str | None = None,
                                 timeout: float = 10.0) -> float:
        """``change_password``, then wait until holder ``holder_id`` (any instance of it) has
        acknowledged the revocation; returns seconds from the request to the holder's
        acknowledgement (as devicesession recorded it). Raises TimeoutError after ``timeout``."""
        sent = time.time()
        event_id = self.change_password(account, new_password=new_password)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ack in self.revocation_acks(event_id) or []:
                if ack["holder_id"] == holder_id:
                    return max(0.0, datetime.fromisoformat(ack["applied_at"]).timestamp() - sent)
            time.sleep(0.05)
        raise TimeoutError(f"holder {holder_id!r} did not acknowledge the sign-out within {timeout}s")

    async def change_password_and_wait_async(self, account: Account, holder_id: str, **kw: Any) -> float:
        """``change_password_and_wait`` from async code (in a thread, so the loop keeps serving)."""
        import asyncio

        return await asyncio.to_thread(self.change_password_and_wait, account, holder_id, **kw)


async def kit_ready(kit: Any, within: float = 60.0) -> None:
    """Wait until a ``HolderKit`` consumes revocations (it has its partitions): from then on, every
    sign-out reaches it. Before that a new holder id's consumer group starts at the latest offset."""
    import asyncio

    try:
        async with asyncio.timeout(within):
            await kit.assigned.wait()  # set together with healthy on each partition assignment
    except TimeoutError:
        raise TimeoutError(f"holder {kit.holder_id!r} was not consuming revocations within {within}s") from None
