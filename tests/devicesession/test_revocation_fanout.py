"""devicesession and the holder kit on the real stack: minting, introspection, revocation fan-out."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import uuid
import xml.etree.ElementTree as ET

import aiohttp
import pytest
from aiokafka import AIOKafkaConsumer

from deploy.launcher import Stack, free_port
from shared import kafka
from shared.events import AUTH_EVENTS, SESSIONS_REVOKED, PasswordChanged, PasswordsChanged, envelope
from shared.holder import holder_secret
from tests.conftest import ROOT, TEST_HOLDERS, eventually

pytestmark = [pytest.mark.stack, pytest.mark.timeout(240)]


async def mint(stack: Stack, account_id: str, client: str, **extra: object) -> dict[str, object]:
    async with aiohttp.ClientSession() as http:
        async with http.post(stack.url("devicesession") + "/internal/sessions",
                             json={"account_id": account_id, "client_identifier": client, "product": "Test Player",
                                   "device_name": f"device {client}", "platform": "Linux", **extra},
                             headers={"Authorization": f"Bearer {stack.env['INTERNAL_API_SECRET']}"}) as r:
            assert r.status == 201, await r.text()
            return dict(await r.json())


async def introspect(stack: Stack, token: str, holder: str = "tests") -> dict[str, object]:
    secret = holder_secret(stack.env["HOLDER_SECRET"], holder)
    async with aiohttp.ClientSession() as http:
        async with http.post(stack.edge_url + "/oauth/introspect", data={"token": token},
                             auth=aiohttp.BasicAuth(holder, secret)) as r:
            assert r.status == 200
            return dict(await r.json())


async def library_status(port: int, token: str) -> int:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/library", headers={"X-Plex-Token": token}) as r:
            return r.status


def holder_ports(stack: Stack) -> list[int]:
    """Every instance of every sample holder (two each)."""
    ports = stack.holder_ports()
    assert len(ports) == len(TEST_HOLDERS) * stack.holder_instances >= 2 * len(TEST_HOLDERS)
    return ports


async def publish_password_changed(stack: Stack, account_id: str, *, revoke: bool, keep: str | None = None,
                                   env=None):  # type: ignore[no-untyped-def]
    ev = env or envelope(PasswordChanged(account_id=account_id, email="x@example.org", username="x", cause="change",
                                         revoke_sessions=revoke, keep_session_id=keep, notify=False),
                         producer="tests", key=account_id)
    producer = kafka.make_producer(stack.kafka_bootstrap)
    await producer.start()
    try:
        await kafka.publish(producer, stack.topic_prefix + AUTH_EVENTS, ev)
    finally:
        await producer.stop()
    return ev


async def test_minted_token_introspects_and_holder_credentials_are_required(stack: Stack) -> None:
    acct = str(uuid.uuid4())
    s = await mint(stack, acct, "cid-1")
    info = await introspect(stack, str(s["token"]))
    assert info["active"] is True and info["account_id"] == acct and info["session_id"] == s["session_id"]
    assert (await introspect(stack, "not-a-token")) == {"active": False}
    async with aiohttp.ClientSession() as http:
        async with http.post(stack.edge_url + "/oauth/introspect", data={"token": s["token"]},
                             auth=aiohttp.BasicAuth("tests", "wrong")) as r:
            assert r.status == 401 and (await r.json())["error"] == "invalid_client"
        async with http.post(stack.edge_url + "/internal/sessions", json={}) as r:
            assert r.status == 404  # never routed by the edge
        async with http.post(stack.url("devicesession") + "/internal/sessions", json={"account_id": acct}) as r:
            assert r.status == 401


async def test_mint_rejects_bad_input(stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        hdr = {"Authorization": f"Bearer {stack.env['INTERNAL_API_SECRET']}"}
        for body in ({"account_id": "nope", "client_identifier": "c"}, {"account_id": str(uuid.uuid4())},
                     {"account_id": str(uuid.uuid4()), "client_identifier": "c", "kind": "toaster"}):
            async with http.post(stack.url("devicesession") + "/internal/sessions", json=body, headers=hdr) as r:
                assert r.status == 400
        async with http.post(stack.url("devicesession") + "/internal/sessions", data=b"{", headers=hdr) as r:
            assert r.status == 400


async def test_batch_mint_mints_each_item_alone_and_refuses_bad_ones_alone(stack: Stack) -> None:
    acct, other = str(uuid.uuid4()), str(uuid.uuid4())
    url = stack.url("devicesession") + "/internal/sessions/batch"
    hdr = {"Authorization": f"Bearer {stack.env['INTERNAL_API_SECRET']}"}
    items = [
        {"account_id": acct, "client_identifier": "tv", "product": "Player A", "remember": True},
        {"account_id": acct, "client_identifier": "tv", "product": "Player B", "remember": False},  # same device
        {"account_id": acct, "client_identifier": "c", "kind": "toaster"},
        {"account_id": other, "client_identifier": "tv"},
        "not an object",
    ]
    async with aiohttp.ClientSession() as http:
        async with http.post(url, json={"sessions": items}, headers=hdr) as r:
            assert r.status == 200, await r.text()
            answers = (await r.json())["sessions"]
        for body in ({}, {"sessions": []}, {"sessions": "x"}, {"sessions": [{}] * 65}):
            async with http.post(url, json=body, headers=hdr) as r:
                assert r.status == 400 and (await r.json())["code"] == "invalid_request", body
        async with http.post(url, json={"sessions": items[:1]}) as r:
            assert r.status == 401
    assert [("token" in a, (a.get("error") or {}).get("status")) for a in answers] == [
        (True, None), (True, None), (False, 400), (True, None), (False, 400)]
    assert answers[2]["error"]["field"] == "kind"
    first, second, _, third, _ = answers
    assert first["device_id"] == second["device_id"] != third["device_id"]
    assert len({first["token"], second["token"], third["token"]}) == 3
    for answer, account in ((first, acct), (second, acct), (third, other)):
        info = await introspect(stack, str(answer["token"]))
        assert info["active"] is True and info["account_id"] == account and info["session_id"] == answer["session_id"]
    assert "exp" not in await introspect(stack, str(first["token"]))  # remember: no expiry
    assert "exp" in await introspect(stack, str(second["token"]))


async def test_password_change_with_sign_out_reaches_every_holder_within_two_seconds(stack: Stack) -> None:
    acct, other = str(uuid.uuid4()), str(uuid.uuid4())
    sessions = [await mint(stack, acct, f"dev-{i}") for i in range(4)]
    bystander = await mint(stack, other, "bystander")
    keep = sessions[0]
    for port in holder_ports(stack):  # every holder caches every token first
        for s in [*sessions, bystander]:
            assert await library_status(port, str(s["token"])) == 200
    await publish_password_changed(stack, acct, revoke=True, keep=str(keep["session_id"]))
    started = asyncio.get_running_loop().time()

    async def all_refused() -> bool:
        for port in holder_ports(stack):
            for s in sessions[1:]:
                if await library_status(port, str(s["token"])) != 401:
                    return False
        return True

    await eventually(all_refused, timeout=2.0, interval=0.02)
    assert asyncio.get_running_loop().time() - started < 2.0
    for s in sessions[1:]:
        assert (await introspect(stack, str(s["token"])))["active"] is False
    for port in holder_ports(stack):
        assert await library_status(port, str(keep["token"])) == 200
        assert await library_status(port, str(bystander["token"])) == 200


async def test_password_change_without_sign_out_revokes_nothing(stack: Stack) -> None:
    acct = str(uuid.uuid4())
    s = await mint(stack, acct, "dev")
    ev = await publish_password_changed(stack, acct, revoke=False)
    await asyncio.sleep(1.0)
    assert (await introspect(stack, str(s["token"])))["active"] is True
    assert (await revocation_outcome(stack, ev.id))[0] == 404


async def test_redelivered_password_change_revokes_nothing_twice(stack: Stack) -> None:
    acct = str(uuid.uuid4())
    s1 = await mint(stack, acct, "a")
    ev = await publish_password_changed(stack, acct, revoke=True)
    await eventually(lambda: introspect_inactive(stack, str(s1["token"])), timeout=10)
    s2 = await mint(stack, acct, "b")  # a new sign-in after the change
    await publish_password_changed(stack, acct, revoke=True, env=ev)  # the same event again
    await asyncio.sleep(1.5)
    assert (await introspect(stack, str(s2["token"])))["active"] is True
    consumer = AIOKafkaConsumer(stack.topic_prefix + SESSIONS_REVOKED, bootstrap_servers=stack.kafka_bootstrap,
                                auto_offset_reset="earliest", group_id=f"check-{uuid.uuid4().hex[:6]}")
    await consumer.start()
    found = 0
    try:
        for _ in range(10):
            for records in (await consumer.getmany(timeout_ms=300)).values():
                found += sum(1 for r in records if str(ev.id).encode() in r.value)
    finally:
        await consumer.stop()
    assert found == 1


async def test_bulk_revocation_cuts_off_whole_accounts_once(stack: Stack) -> None:
    """The breach command's batch form: every session of the listed accounts made before it is dead
    (holders included), others are untouched, sessions made afterwards live, and the same event
    delivered again cuts off nothing more."""
    a, b, other = (str(uuid.uuid4()) for _ in range(3))
    olds = [await mint(stack, a, "tv"), await mint(stack, a, "phone"), await mint(stack, b, "srv", kind="server")]
    bystander = await mint(stack, other, "tv")
    for port in holder_ports(stack):
        assert await library_status(port, str(olds[0]["token"])) == 200  # cached by every holder
    ev = envelope(PasswordsChanged(incident_id=f"t-{uuid.uuid4().hex[:6]}", batch=1, account_ids=[a, b],
                                   reason="test"), producer="tests", key="t")
    await publish_password_changed(stack, a, revoke=True, env=ev)
    for s in olds:
        await eventually(lambda s=s: introspect_inactive(stack, str(s["token"])), timeout=10)
    for port in holder_ports(stack):
        await eventually(lambda port=port: library_refuses(port, str(olds[0]["token"])), timeout=5)
    assert (await introspect(stack, str(bystander["token"])))["active"] is True
    fresh = await mint(stack, a, "tv")  # signed in again after the revocation
    await publish_password_changed(stack, a, revoke=True, env=ev)  # the same event again
    await asyncio.sleep(1.5)
    assert (await introspect(stack, str(fresh["token"])))["active"] is True
    status, outcome = await revocation_outcome(stack, ev.id)
    assert status == 200 and outcome["revoked"] == 3


async def revocation_outcome(stack: Stack, event_id: object) -> tuple[int, dict[str, object]]:
    """devicesession's record of the revocation caused by an event: (status, body)."""
    async with aiohttp.ClientSession() as http:
        async with http.get(stack.url("devicesession") + "/internal/revocations",
                            params={"causing_event_id": str(event_id)},
                            headers={"Authorization": f"Bearer {stack.env['INTERNAL_API_SECRET']}"}) as r:
            return r.status, (await r.json() if r.status == 200 else {})


async def library_refuses(port: int, token: str) -> bool:
    return await library_status(port, token) == 401


async def introspect_inactive(stack: Stack, token: str) -> bool:
    return (await introspect(stack, token))["active"] is False


async def test_holder_that_was_down_refuses_old_token_when_back(stack: Stack) -> None:
    acct = str(uuid.uuid4())
    s = await mint(stack, acct, "tv")
    port = free_port()
    argv = [sys.executable, "-m", "services.cli", "holder", "--name", "delta", "--port", str(port)]
    env = {**stack.env, "SERVICE_NAME": "holder-delta", "CACHE_TTL": "3600"}
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await eventually(lambda: ready(port), timeout=60, interval=0.2)
        assert await library_status(port, str(s["token"])) == 200
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        await publish_password_changed(stack, acct, revoke=True)
        await eventually(lambda: introspect_inactive(stack, str(s["token"])), timeout=10)
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await eventually(lambda: ready(port), timeout=60, interval=0.2)
        assert await library_status(port, str(s["token"])) == 401
    finally:
        proc.kill()
        proc.wait()


async def ready(port: int) -> bool:
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/readyz") as r:
                return r.status == 200
    except aiohttp.ClientError:
        return False


async def test_device_list_and_removal_sign_that_device_out_everywhere(stack: Stack) -> None:
    acct = str(uuid.uuid4())
    me = await mint(stack, acct, "phone", kind="app")
    tv = await mint(stack, acct, "tv-123", kind="player", provides="player")
    server = await mint(stack, acct, "srv-1", kind="server", connections=[{"protocol": "http", "address": "10.0.0.5",
                                                                            "port": 32400, "local": True}])
    for port in holder_ports(stack):
        assert await library_status(port, str(tv["token"])) == 200
    async with aiohttp.ClientSession() as http:
        async with http.get(stack.edge_url + "/devices.xml", headers={"X-Plex-Token": str(me["token"])}) as r:
            assert r.status == 200
            root = ET.fromstring(await r.read())
        by_cid = {d.attrib["clientIdentifier"]: d.attrib for d in root.iter("Device")}
        assert set(by_cid) == {"phone", "tv-123", "srv-1"} and root.attrib["size"] == "3"
        assert by_cid["phone"]["token"] == me["token"] and by_cid["tv-123"]["token"] == ""
        async with http.get(stack.edge_url + "/api/v2/resources?includeHttps=1&includeRelay=1",
                            headers={"X-Plex-Token": str(me["token"])}) as r:
            res = ET.fromstring(await r.read())
        servers = [x for x in res.iter("resource") if "server" in x.attrib["provides"]]
        assert [x.attrib["clientIdentifier"] for x in servers] == ["srv-1"]
        conn = servers[0].find("connections/connection")
        assert conn is not None and conn.attrib["uri"] == "http://10.0.0.5:32400" and conn.attrib["local"] == "1"
        async with http.delete(stack.edge_url + f"/devices/{by_cid['tv-123']['id']}.xml",
                               headers={"X-Plex-Token": str(me["token"])}) as r:
            assert r.status == 204
        async with http.delete(stack.edge_url + "/devices/999999999.xml",
                               headers={"X-Plex-Token": str(me["token"])}) as r:
            assert r.status == 404
        async with http.get(stack.edge_url + "/devices.xml", headers={"X-Plex-Token": "bogus"}) as r:
            assert r.status == 401

    async def tv_refused_everywhere() -> bool:
        return all([await library_status(p, str(tv["token"])) == 401 for p in holder_ports(stack)])

    await eventually(tv_refused_everywhere, timeout=2.0, interval=0.02)
    assert (await introspect(stack, str(server["token"])))["active"] is True


async def test_hearth_fanout_shows_each_holder_applying_and_a_summary(stack: Stack) -> None:
    acct = str(uuid.uuid4())
    s = await mint(stack, acct, "watched")
    for port in holder_ports(stack):
        assert await library_status(port, str(s["token"])) == 200
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "fanout", "--duration", "8", "--deadline", "1.5",
                             "--summary"], cwd=ROOT, env=stack.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    await asyncio.sleep(3.0)  # joined and positioned at the end of both topics
    await publish_password_changed(stack, acct, revoke=True)
    out, err = await asyncio.to_thread(proc.communicate, timeout=30)
    assert proc.returncode == 0, err
    for holder in TEST_HOLDERS:
        for key in stack.holder_keys(holder):
            inst = stack.instance_id(key)
            assert f"applied by {holder}/{inst} in" in out, out
            assert re.search(rf"^{holder}/{inst}\s+1\s", out, re.M), out
    assert re.search(r"all \d+ holders applied on all \d+ instances", out), out


async def revocations_published(stack: Stack, event_ids: list[str]) -> dict[str, int]:
    """How many ``sessions.revoked`` on the topic name each of ``event_ids`` as their cause."""
    consumer = AIOKafkaConsumer(stack.topic_prefix + SESSIONS_REVOKED, bootstrap_servers=stack.kafka_bootstrap,
                                auto_offset_reset="earliest", group_id=f"check-{uuid.uuid4().hex[:6]}")
    await consumer.start()
    found = dict.fromkeys(event_ids, 0)
    try:
        for _ in range(10):
            for records in (await consumer.getmany(timeout_ms=300)).values():
                for r in records:
                    for e in event_ids:
                        found[e] += str(e).encode() in r.value
    finally:
        await consumer.stop()
    return found


async def hand_over(stack: Stack, env: object) -> tuple[int, dict[str, object]]:
    async with aiohttp.ClientSession() as http:
        async with http.post(stack.url("devicesession") + "/internal/revocations/by-event", data=env.encode(),  # type: ignore[attr-defined]
                             headers={"Authorization": f"Bearer {stack.env['INTERNAL_API_SECRET']}",
                                      "Content-Type": "application/json"}) as r:
            return r.status, dict(await r.json())


async def handed_over_total(stack: Stack) -> dict[str, float]:
    """hearth_devicesession_handed_over_total by outcome, summed over devicesession's replicas."""
    totals: dict[str, float] = {}
    async with aiohttp.ClientSession() as http:
        for key in stack.replica_keys("devicesession"):
            async with http.get(f"http://127.0.0.1:{stack.ports[key]}/metrics") as r:
                for m in re.finditer(r'^hearth_devicesession_handed_over_total\{outcome="(\w+)"\} (\S+)$',
                                     await r.text(), re.M):
                    totals[m[1]] = totals.get(m[1], 0.0) + float(m[2])
    return totals


async def test_a_handed_over_password_change_and_its_consumed_copy_revoke_once(stack: Stack) -> None:
    """auth hands its committed password.changed to devicesession directly, and the same event also
    arrives through Kafka: in either order, and at the same moment, the sessions are revoked once,
    one sessions.revoked is published, and both paths report the same revocation."""
    before = await handed_over_total(stack)
    cases = []
    for order in ("direct first", "consumed first", "together", "together", "together"):
        acct = str(uuid.uuid4())
        keep, *others = [await mint(stack, acct, f"dev-{i}") for i in range(3)]
        for port in holder_ports(stack):
            assert await library_status(port, str(others[0]["token"])) == 200
        ev = envelope(PasswordChanged(account_id=acct, email="x@example.org", username="x", cause="change",
                                      revoke_sessions=True, keep_session_id=str(keep["session_id"])),
                      producer="tests", key=acct)
        if order == "direct first":
            status, body = await hand_over(stack, ev)
            # answered once Hearth's own holders applied it: the sample holders follow at once
            assert status == 200 and body["revoked"] == 2 and body["not_applied_by"] == [], body
            await publish_password_changed(stack, acct, revoke=True, env=ev)
        elif order == "consumed first":
            await publish_password_changed(stack, acct, revoke=True, env=ev)
            await eventually(lambda: _outcome_found(stack, ev.id), timeout=10)
            status, body = await hand_over(stack, ev)
        else:
            (status, body), _ = await asyncio.gather(hand_over(stack, ev),
                                                     publish_password_changed(stack, acct, revoke=True, env=ev))
        assert status == 200 and body["revoked"] == 2, (order, body)
        cases.append((ev, body, keep, others))
    await asyncio.sleep(1.5)  # every consumed copy has arrived by now
    published = await revocations_published(stack, [str(ev.id) for ev, *_ in cases])
    assert set(published.values()) == {1}, published
    for ev, body, keep, others in cases:
        status, outcome = await revocation_outcome(stack, ev.id)
        assert status == 200 and outcome["revocation_id"] == body["revocation_id"] and outcome["revoked"] == 2
        for s in others:
            assert (await introspect(stack, str(s["token"])))["active"] is False
        assert (await introspect(stack, str(keep["token"])))["active"] is True
    after = await handed_over_total(stack)
    assert after.get("applied", 0) - before.get("applied", 0) + after.get("already", 0) - before.get("already", 0) == 5
    assert after.get("already", 0) - before.get("already", 0) >= 1  # the consumed-first case at least


async def _outcome_found(stack: Stack, event_id: object) -> bool:
    return (await revocation_outcome(stack, event_id))[0] == 200


async def test_a_password_change_with_sign_out_publishes_one_revocation(stack: Stack) -> None:
    """Through the edge: the change answers with the sessions it revoked (handed to devicesession
    directly), and its event, consumed later, revokes and publishes nothing more."""
    from hearth_testing.client import HearthStack

    hs = HearthStack(edge_url=stack.edge_url, devicesession_url=stack.url("devicesession"),
                     kafka_bootstrap=stack.kafka_bootstrap, topic_prefix=stack.topic_prefix,
                     internal_api_secret=stack.env["INTERNAL_API_SECRET"], mode="launcher")
    account = await asyncio.to_thread(hs.sign_up)
    held = await asyncio.to_thread(hs.sign_in, account.username, account.password, "tv-one-revocation")
    before = await handed_over_total(stack)
    event_id = await asyncio.to_thread(hs.change_password, account)
    assert await asyncio.to_thread(hs.user_status, held) == 401
    after = await handed_over_total(stack)
    assert after.get("applied", 0) + after.get("already", 0) == before.get("applied", 0) + before.get("already", 0) + 1
    await asyncio.sleep(1.5)
    assert await revocations_published(stack, [event_id]) == {event_id: 1}
    status, outcome = await revocation_outcome(stack, event_id)
    assert status == 200 and outcome["revoked"] >= 1  # the held session (and any other but the changing one)


async def test_a_change_delivered_after_the_accounts_next_change_finds_nothing_left_to_revoke(stack: Stack) -> None:
    """A change whose event is held up (its database went down as it committed) and arrives after
    the account's next change was applied: the next change's selection (every session created
    before it but its own) already revoked the held-up change's sessions, so the held-up one
    revokes nothing and publishes no sessions.revoked, and sessions signed in after it stay. What
    tests/faults' check_changes accepts for such a change (its ``subsumed``)."""
    acct = str(uuid.uuid4())
    me1, tv1 = await mint(stack, acct, "me-1"), await mint(stack, acct, "tv-1")
    held = envelope(PasswordChanged(account_id=acct, email="x@example.org", username="x", cause="change",
                                    revoke_sessions=True, keep_session_id=str(me1["session_id"])),
                    producer="tests", key=acct)
    await asyncio.sleep(0.2)  # the account signs in again after the held-up change (beyond its 50 ms margin)
    me2 = await mint(stack, acct, "me-2")
    following = envelope(PasswordChanged(account_id=acct, email="x@example.org", username="x", cause="change",
                                         revoke_sessions=True, keep_session_id=str(me2["session_id"])),
                         producer="tests", key=acct)
    status, body = await hand_over(stack, following)
    assert status == 200 and body["revoked"] == 2, body  # me-1 and tv-1
    status, body = await hand_over(stack, held)
    assert status == 200 and body["revoked"] == 0, body
    async def settled() -> bool:
        return all([await library_status(p, str(tv1["token"])) == 401 for p in holder_ports(stack)])

    await eventually(settled, timeout=10)
    for port in holder_ports(stack):
        assert await library_status(port, str(me2["token"])) == 200
    assert await revocations_published(stack, [str(held.id), str(following.id)]) == {
        str(held.id): 0, str(following.id): 1}
