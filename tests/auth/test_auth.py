"""auth through the edge on the real stack, with the real python-plexapi client where it applies."""

from __future__ import annotations

import asyncio
import time
import uuid
import xml.etree.ElementTree as ET

import aiohttp
import asyncpg
import pytest
from plexapi.exceptions import Unauthorized as PlexUnauthorized
from plexapi.myplex import MyPlexAccount

from deploy.launcher import Stack
from services.auth.app import create_app
from services.auth.routes import AUTH
from services.auth.settings import Settings
from shared.crypto import Sealer
from shared.settings import with_database
from tests.conftest import EventTap, edge_json, eventually
from tests.plexclient import plex_session

pytestmark = [pytest.mark.stack, pytest.mark.timeout(240)]
PASSWORD = "correct horse battery staple"


def unique(prefix: str = "u") -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


async def sign_up(stack: Stack, password: str = PASSWORD) -> dict:  # type: ignore[type-arg]
    name = unique()
    status, body, _ = await edge_json(stack, "POST", "/api/v2/users",
                                      data={"email": f"{name}@Example.org", "username": name, "password": password})
    assert status == 201, body
    return {"username": name, "email": f"{name}@example.org", "id": body["uuid"], "password": password}


async def sign_in(stack: Stack, login: str, password: str = PASSWORD, client: str = "tests", **headers: str):  # type: ignore[no-untyped-def]
    return await edge_json(stack, "POST", "/api/v2/users/signin", data={"login": login, "password": password},
                           headers={"X-Plex-Client-Identifier": client, **headers})


async def user_status(stack: Stack, token: str) -> int:
    status, _, _ = await edge_json(stack, "GET", "/api/v2/user", headers={"X-Plex-Token": token})
    return status


def account_uuid(hex_id: str) -> str:
    return str(uuid.UUID(hex_id))


async def test_sign_up_validates_and_keeps_emails_and_usernames_unique(stack: Stack) -> None:
    a = await sign_up(stack)
    cases = [
        ({"email": a["email"].upper(), "username": unique(), "password": PASSWORD}, 409, 1114),
        ({"email": f"{unique()}@example.org", "username": a["username"].upper(), "password": PASSWORD}, 409, 1115),
        ({"email": "not-an-email", "username": unique(), "password": PASSWORD}, 400, 1116),
        ({"email": f"{unique()}@example.org", "username": "a", "password": PASSWORD}, 400, 1116),
        ({"email": f"{unique()}@example.org", "username": unique()}, 400, 1112),
        ({"email": f"{unique()}@example.org", "username": unique(), "password": "short"}, 400, 1112),
        ({"email": f"{unique()}@example.org", "username": unique(), "password": "password1"}, 400, 1112),
    ]
    for data, status, code in cases:
        got, body, _ = await edge_json(stack, "POST", "/api/v2/users", data=data)
        assert (got, body["errors"][0]["code"]) == (status, code), (data, body)
    name = unique()
    got, body, _ = await edge_json(stack, "POST", "/api/v2/users",
                                   data={"email": f"other{name}@example.org", "username": name,
                                         "password": f"my name is {name} ok"})
    assert got == 400 and "username" in body["errors"][0]["message"]


async def test_python_plexapi_signs_in_by_username_and_email_reads_user_and_signs_out(stack: Stack) -> None:
    a = await sign_up(stack)
    for login in (a["username"], a["email"].upper()):
        account = await asyncio.to_thread(MyPlexAccount, login, PASSWORD, session=plex_session(stack.edge_url))
        assert (account.username, account.email) == (a["username"], a["email"])
        assert account.authenticationToken and account.subscriptionActive is False
        assert await asyncio.to_thread(account.ping) is True
        token = account.authenticationToken
        again = await asyncio.to_thread(MyPlexAccount, token=token, session=plex_session(stack.edge_url))
        assert again.uuid == account.uuid
        await asyncio.to_thread(account.signout)
        await eventually(lambda t=token: user_status_is(stack, t, 401), timeout=2)


async def user_status_is(stack: Stack, token: str, status: int) -> bool:
    return await user_status(stack, token) == status


async def test_wrong_password_and_unknown_user_answer_alike(stack: Stack) -> None:
    a = await sign_up(stack)
    with pytest.raises(PlexUnauthorized):
        await asyncio.to_thread(MyPlexAccount, a["username"], "wrong password!", session=plex_session(stack.edge_url))
    timings: dict[str, list[float]] = {"wrong": [], "unknown": []}
    bodies = {}
    for i in range(4):
        for kind, login in (("wrong", a["username"]), ("unknown", unique("ghost"))):
            t0 = time.perf_counter()
            status, body, _ = await sign_in(stack, login, "wrong password!")
            timings[kind].append(time.perf_counter() - t0)
            bodies[kind] = (status, body)
    assert bodies["wrong"] == bodies["unknown"] == (401, {"errors": [
        {"code": 1001, "message": "User could not be authenticated", "status": 401}]})
    ratio = sorted(timings["unknown"])[1] / sorted(timings["wrong"])[1]
    assert 0.5 < ratio < 2.0, timings


async def test_sign_in_throttling_kicks_in_and_releases(stack: Stack) -> None:
    a = await sign_up(stack)
    for _ in range(5):
        status, _, _ = await sign_in(stack, a["username"], "nope nope nope")
        assert status == 401
    status, body, _ = await sign_in(stack, a["username"], "nope nope nope")
    assert status == 401  # the 6th failure is counted and starts the block
    status, body, headers = await sign_in(stack, a["username"], PASSWORD)
    assert status == 429 and body["errors"][0]["code"] == 1111
    wait = int(headers["Retry-After"])
    assert 1 <= wait <= 3
    await asyncio.sleep(wait + 0.2)
    status, body, _ = await sign_in(stack, a["username"], PASSWORD)
    assert status == 201 and body["authToken"]


async def test_per_address_throttling_is_independent_of_the_account(stack: Stack) -> None:
    address = f"203.0.113.{uuid.uuid4().int % 250 + 1}"
    async with aiohttp.ClientSession() as http:
        async def attempt(login: str) -> int:
            async with http.post(stack.url("auth") + "/api/v2/users/signin",
                                 data={"login": login, "password": "wrong wrong"},
                                 headers={"X-Plex-Client-Identifier": "t", "X-Forwarded-For": address}) as r:
                return r.status
        statuses = [await attempt(unique("nobody")) for _ in range(51)]
        assert statuses.count(401) == 51
        assert await attempt(unique("another")) == 429


async def test_reset_request_answers_alike_and_emits_a_sealed_token(stack: Stack, tap: EventTap) -> None:
    a = await sign_up(stack)
    for email in (a["email"], f"{unique('nobody')}@example.org"):
        status, body, _ = await edge_json(stack, "POST", "/api/v2/users/password/reset", data={"email": email})
        assert (status, body) == (204, None)
    events = await eventually(lambda: tap.of("password.reset_requested", account_id=account_uuid(a["id"])))
    assert len(events) == 1
    sealed = events[0].data["sealed_token"]
    token = Sealer(stack.env["SEAL_KEYS"]).open(sealed, context=account_uuid(a["id"]))
    assert len(token) >= 43 and token not in events[0].encode().decode()
    assert events[0].data["reset_url"].endswith("/reset")


async def request_reset_token(stack: Stack, tap: EventTap, a: dict) -> str:  # type: ignore[type-arg]
    before = len(tap.of("password.reset_requested", account_id=account_uuid(a["id"])))
    status, _, _ = await edge_json(stack, "POST", "/api/v2/users/password/reset", data={"email": a["email"]})
    assert status == 204
    events = await eventually(lambda: (e := tap.of("password.reset_requested", account_id=account_uuid(a["id"])))
                              and len(e) > before and e)
    return Sealer(stack.env["SEAL_KEYS"]).open(events[-1].data["sealed_token"], context=account_uuid(a["id"]))


async def auth_db(stack: Stack) -> asyncpg.Connection:
    return await asyncpg.connect(with_database(stack.database_url, f"{stack.extra_env['DB_NAME_PREFIX']}hearth_auth"))


async def test_reset_with_valid_expired_reused_and_forged_tokens(stack: Stack, tap: EventTap) -> None:
    a = await sign_up(stack)
    first = await request_reset_token(stack, tap, a)
    second = await request_reset_token(stack, tap, a)
    new_password = "a brand new passphrase 42"

    async def put(token: str, password: str = new_password) -> tuple[int, object]:
        status, body, headers = await edge_json(stack, "PUT", "/api/v2/users/password",
                                                data={"resetToken": token, "password": password,
                                                      "signOutDevices": "false"})
        return status, body

    assert (await put("forged-" + "x" * 40))[0] == 400
    status, body = await put(second, "password")  # weak: the token is not burnt
    assert status == 400 and body["errors"][0]["code"] == 1112  # type: ignore[index]
    assert (await put(second)) == (204, None)
    status, body = await put(second)
    assert status == 400 and body["errors"][0]["code"] == 1113  # type: ignore[index]
    assert (await put(first))[0] == 400  # using one token invalidated the other
    third = await request_reset_token(stack, tap, a)
    conn = await auth_db(stack)
    try:
        await conn.execute("UPDATE reset_tokens SET expires_at = now() - interval '1 second' WHERE used_at IS NULL")
    finally:
        await conn.close()
    assert (await put(third))[0] == 400
    status, _, _ = await sign_in(stack, a["username"], new_password)
    assert status == 201


async def test_change_password_with_and_without_signing_out_devices(stack: Stack, tap: EventTap) -> None:
    a = await sign_up(stack)
    tokens = []
    for client in ("phone", "tv", "server"):
        status, body, _ = await sign_in(stack, a["username"], client=client)
        tokens.append(body["authToken"])
    me, *others = tokens

    async def change(current: str, new: str, sign_out: bool) -> str:
        status, body, headers = await edge_json(stack, "PUT", "/api/v2/user/password",
                                                data={"currentPassword": current, "password": new,
                                                      "signOutDevices": str(sign_out).lower()},
                                                headers={"X-Plex-Token": me})
        assert status == 204, body
        return headers["X-Hearth-Event-Id"]

    status, body, _ = await edge_json(stack, "PUT", "/api/v2/user/password",
                                      data={"currentPassword": "wrong one!!", "password": "whatever passphrase 1"},
                                      headers={"X-Plex-Token": me})
    assert status == 401
    first = await change(PASSWORD, "second passphrase here", sign_out=False)
    await asyncio.sleep(1.0)
    assert [await user_status(stack, t) for t in tokens] == [200, 200, 200]
    second = await change("second passphrase here", "third passphrase here", sign_out=True)
    await eventually(lambda: all_status(stack, others, 401), timeout=2)
    assert await user_status(stack, me) == 200
    for event_id, revoke in ((first, False), (second, True)):
        found = await eventually(lambda eid=event_id: [e for e in tap.events if str(e.id) == eid])
        assert len(found) == 1
        data = found[0].data
        assert (data["cause"], data["revoke_sessions"], data["account_id"]) == ("change", revoke, account_uuid(a["id"]))
        assert data["keep_session_id"]
    await asyncio.sleep(0.5)
    changes = tap.of("password.changed", account_id=account_uuid(a["id"]))
    assert len(changes) == 2  # exactly once per change


async def hashes_started(stack: Stack) -> float:
    """hearth_password_hashes_total (argon2 computations started), summed over auth's replicas."""
    total = 0.0
    async with aiohttp.ClientSession() as http:
        for key in stack.replica_keys("auth"):
            async with http.get(f"http://127.0.0.1:{stack.ports[key]}/metrics") as r:
                total += sum(float(line.split()[-1]) for line in (await r.text()).splitlines()
                             if line.startswith("hearth_password_hashes_total "))
    return total


async def test_a_change_hashes_beside_the_verify_and_a_refused_one_hashes_nothing(stack: Stack) -> None:
    """The new password's hash runs beside the current one's verify (a change waits for one argon2
    time): a wrong current password costs the two and changes nothing; once the account is blocked,
    an attempt is refused before any argon2 starts."""
    a = await sign_up(stack)
    _, body, _ = await sign_in(stack, a["username"], client="phone")
    me = body["authToken"]

    async def change(current: str) -> tuple[int, dict, dict]:  # type: ignore[type-arg]
        return await edge_json(stack, "PUT", "/api/v2/user/password", headers={"X-Plex-Token": me},
                               data={"currentPassword": current, "password": "a fresh passphrase 42"})

    before = await hashes_started(stack)
    for _ in range(6):  # the 6th failure starts the block
        assert (await change("wrong one!!"))[0] == 401
    assert await hashes_started(stack) - before == 12
    status, body, headers = await change(PASSWORD)
    assert status == 429 and int(headers["Retry-After"]) >= 1
    assert await hashes_started(stack) - before == 12
    assert (await sign_in(stack, a["username"], client="tv"))[0] == 429  # the same budget as sign-in
    await asyncio.sleep(int(headers["Retry-After"]) + 0.2)
    assert (await sign_in(stack, a["username"], client="tv"))[0] == 201  # the password did not change


async def all_status(stack: Stack, tokens: list[str], status: int) -> bool:
    return all([await user_status(stack, t) == status for t in tokens])


async def test_nothing_is_published_when_the_transaction_fails(stack: Stack, tap: EventTap) -> None:
    a = await sign_up(stack)
    settings = Settings(**{k.lower(): v for k, v in stack.service_env("auth", 0).items()
                           if k.lower() in Settings.model_fields})
    app = create_app(settings)
    runner = aiohttp.web.AppRunner(app)  # starts pool, producer, relay: the real service objects
    await runner.setup()
    try:
        auth = app[AUTH]
        from services.auth import store

        account = await store.find_by_id(auth.pool, uuid.UUID(a["id"]))
        assert account is not None
        async with auth.pool.acquire() as conn:
            with pytest.raises(RuntimeError):
                async with conn.transaction():
                    event_id = (await auth._change(conn, account, "-$broken", cause="change", revoke=True, keep=None)).event_id
                    raise RuntimeError("the transaction fails after the event was written")
            assert await conn.fetchval("SELECT count(*) FROM outbox WHERE event_id = $1", uuid.UUID(event_id)) == 0
    finally:
        await runner.cleanup()
    await asyncio.sleep(1.0)
    assert not [e for e in tap.events if str(e.id) == event_id]
    status, _, _ = await sign_in(stack, a["username"])
    assert status == 201  # the password did not change


async def test_flagged_account_is_refused_until_reset(stack: Stack, tap: EventTap) -> None:
    a = await sign_up(stack)
    status, body, _ = await sign_in(stack, a["username"], client="tv")
    old_token = body["authToken"]
    async with aiohttp.ClientSession() as http:
        async with http.post(stack.url("auth") + f"/internal/accounts/{account_uuid(a['id'])}/reset-required",
                             json={"reason": "test incident", "notify": True, "revoke_sessions": True},
                             headers={"Authorization": f"Bearer {stack.env['INTERNAL_API_SECRET']}"}) as r:
            assert r.status == 200
    status, body, _ = await sign_in(stack, a["username"])
    assert status == 403 and body["errors"][0]["code"] == 1110
    await eventually(lambda: user_status_is(stack, old_token, 401), timeout=3)
    event = (await eventually(lambda: tap.of("account.reset_required", account_id=account_uuid(a["id"]))))[0]
    token = Sealer(stack.env["SEAL_KEYS"]).open(event.data["sealed_token"], context=account_uuid(a["id"]))
    status, _, _ = await edge_json(stack, "PUT", "/api/v2/users/password",
                                   data={"resetToken": token, "password": "fresh start passphrase"})
    assert status == 204
    status, body, _ = await sign_in(stack, a["username"], "fresh start passphrase")
    assert status == 201


async def test_malformed_missing_oversized_and_hostile_input_get_4xx(stack: Stack) -> None:
    a = await sign_up(stack)
    async with aiohttp.ClientSession() as http:
        url = stack.edge_url
        async with http.post(url + "/api/v2/users/signin", data={"login": a["username"], "password": PASSWORD}) as r:
            assert r.status == 400 and 'code="1000"' in await r.text()  # no client identifier
        async with http.post(url + "/api/v2/users/signin", data=b"x" * 200_000,
                             headers={"X-Plex-Client-Identifier": "t"}) as r:
            assert r.status == 413
        async with http.post(url + "/api/v2/users", data=b"{not json", headers={"Content-Type": "application/json"}) as r:
            assert r.status == 400
        async with http.post(url + "/api/v2/users/signin", data={"login": "' OR 1=1 --", "password": "x" * 5000},
                             headers={"X-Plex-Client-Identifier": "t"}) as r:
            assert r.status == 401
        async with http.get(url + "/api/v2/user", headers={"X-Plex-Token": "x" * 600}) as r:
            assert r.status in (400, 401)
        async with http.put(url + "/api/v2/users/password", data={"resetToken": "\x00\x01", "password": "p"}) as r:
            assert r.status == 400
        async with http.post(url + "/api/v2/users/password/reset", data={}) as r:
            assert r.status == 400
        async with http.get(url + "/api/v2/user", headers={"X-Plex-Token": "nope"}) as r:
            assert r.status == 401
            root = ET.fromstring(await r.read())
            assert root.tag == "errors" and root[0].attrib["code"] == "1001"


async def test_a_password_change_re_sent_with_the_same_request_id_gets_the_first_answer(stack: Stack) -> None:
    """What nginx does when the replica that committed a change died before answering: the same
    request (same X-Request-Id) arrives again. It gets the first answer, and nothing changes twice."""
    a = await sign_up(stack)
    _, me, _ = await sign_in(stack, a["username"], client="me")
    rid = uuid.uuid4().hex
    headers = {"X-Plex-Token": me["authToken"], "X-Plex-Client-Identifier": "me", "X-Request-Id": rid}
    data = {"currentPassword": PASSWORD, "password": "a brand new passphrase", "signOutDevices": "1"}
    answers = []
    async with aiohttp.ClientSession() as http:
        for _ in range(2):
            async with http.put(stack.url("auth") + "/api/v2/user/password", headers=headers, data=data) as r:
                answers.append((r.status, r.headers.get("X-Hearth-Event-Id")))
        # Another request (another id) with the old current password is a wrong password again.
        async with http.put(stack.url("auth") + "/api/v2/user/password",
                            headers={**headers, "X-Request-Id": uuid.uuid4().hex, "Accept": "application/json"},
                            data=data) as r:
            assert r.status == 401
    assert answers[0][0] == answers[1][0] == 204 and answers[0][1] == answers[1][1], answers
    conn = await auth_db(stack)
    try:
        assert await conn.fetchval("SELECT count(*) FROM password_change_requests WHERE request_id = $1", rid) == 1
    finally:
        await conn.close()
    status, _, _ = await sign_in(stack, a["username"], "a brand new passphrase")
    assert status == 201
