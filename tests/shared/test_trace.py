"""Trace context (W3C ``traceparent``) follows one password change with sign-out through auth,
devicesession, Kafka and every holder instance: the events carry it, and the holders' log lines name
it. The pure parsing is a unit test."""

from __future__ import annotations

import asyncio
import secrets
import uuid

import pytest
from aiokafka import AIOKafkaConsumer

from deploy.launcher import Stack
from shared import logs
from shared.events import AUTH_EVENTS, REVOCATIONS_APPLIED, SESSIONS_REVOKED, Envelope


@pytest.mark.unit
def test_traceparent_parsing_takes_only_the_w3c_shape() -> None:
    tid = secrets.token_hex(16)
    assert logs.trace_of(f"00-{tid}-{secrets.token_hex(8)}-01") == tid
    assert logs.trace_of(f" 00-{tid.upper()}-{secrets.token_hex(8)}-00 ") == tid
    for bad in (None, "", "00-" + "0" * 32 + "-" + "1" * 16 + "-01", f"00-{tid}-short-01", f"00-{tid}",
                f"00-{tid}-{secrets.token_hex(8)}-01\r\nX: y", "x" * 100, f"00-{tid[:-1]}g-{secrets.token_hex(8)}-01"):
        assert logs.trace_of(bad) is None, bad
    rid = secrets.token_hex(16)
    assert logs.new_trace_id(rid) == rid  # the edge's request id, so nginx's access log matches
    assert len(logs.new_trace_id("not-hex")) == 32 and logs.new_trace_id("not-hex") != "not-hex"


@pytest.mark.unit
async def test_events_published_while_handling_carry_the_trace() -> None:
    from shared.events import SessionsRevoked, envelope

    event = SessionsRevoked(revocation_id=str(uuid.uuid4()), account_id=str(uuid.uuid4()), session_ids=[],
                            cutoff="2026-12-07T00:00:00Z", cause="test")
    assert envelope(event, producer="t", key="k").trace == {}
    tid = secrets.token_hex(16)
    with logs.handling_event(str(uuid.uuid4()), {"traceparent": f"00-{tid}-{secrets.token_hex(8)}-01"}):
        assert logs.trace_of(envelope(event, producer="t", key="k").trace["traceparent"]) == tid
    assert logs.trace_id.get() is None


async def _events(stack: Stack, topic: str, match: str, count: int, seconds: float = 15) -> list[Envelope]:
    consumer = AIOKafkaConsumer(stack.topic_prefix + topic, bootstrap_servers=stack.kafka_bootstrap,
                                auto_offset_reset="earliest", group_id=f"trace-{uuid.uuid4().hex[:6]}")
    await consumer.start()
    found: list[Envelope] = []
    try:
        deadline = asyncio.get_running_loop().time() + seconds
        while len(found) < count and asyncio.get_running_loop().time() < deadline:
            for records in (await consumer.getmany(timeout_ms=300)).values():
                found += [Envelope.decode(r.value) for r in records if match.encode() in r.value]
    finally:
        await consumer.stop()
    return found


async def test_one_trace_from_the_password_change_to_every_holder_instance(stack: Stack) -> None:
    from hearth_testing.client import HearthStack

    hs = HearthStack(edge_url=stack.edge_url, devicesession_url=stack.url("devicesession"),
                     kafka_bootstrap=stack.kafka_bootstrap, topic_prefix=stack.topic_prefix,
                     internal_api_secret=stack.env["INTERNAL_API_SECRET"], mode="launcher")
    account = await asyncio.to_thread(hs.sign_up)
    held = await asyncio.to_thread(hs.sign_in, account.username, account.password, "tv-traced")
    tid = secrets.token_hex(16)
    import aiohttp

    async with aiohttp.ClientSession() as http, http.put(
            stack.edge_url + "/api/v2/user/password",
            data={"currentPassword": account.password, "password": f"pw {secrets.token_urlsafe(18)}",
                  "signOutDevices": "true"},
            headers={"X-Plex-Token": account.token, "X-Plex-Client-Identifier": "tests", "Accept": "application/json",
                     "traceparent": f"00-{tid}-{secrets.token_hex(8)}-01"}) as r:
        assert r.status == 204, await r.text()
        event_id = r.headers["X-Hearth-Event-Id"]
    assert await asyncio.to_thread(hs.user_status, held) == 401

    changed = [e for e in await _events(stack, AUTH_EVENTS, event_id, 1) if str(e.id) == event_id]
    assert changed and logs.trace_of(changed[0].trace.get("traceparent")) == tid, changed
    revoked = [e for e in await _events(stack, SESSIONS_REVOKED, event_id, 1)
               if e.data.get("causing_event_id") == event_id]
    assert revoked and all(logs.trace_of(e.trace.get("traceparent")) == tid for e in revoked), revoked
    revocation_id = revoked[0].data["revocation_id"]
    instances = sum(len(stack.holder_keys(h)) for h in stack.holders)
    acks = [e for e in await _events(stack, REVOCATIONS_APPLIED, revocation_id, instances)
            if e.data.get("revocation_id") == revocation_id]
    assert acks and all(logs.trace_of(e.trace.get("traceparent")) == tid for e in acks), acks
    # The sample holders' processes log the eviction under the same trace id.
    lines = await asyncio.to_thread(lambda: [line for p in (stack.run_dir / "logs").glob("holder-*.log")
                                             for line in p.read_text(errors="replace").splitlines()
                                             if tid in line and "revocation applied" in line])
    assert len(lines) == instances, lines


async def test_crafted_traceparent_headers_are_ignored_through_the_edge(stack: Stack) -> None:
    """Malformed, oversized, all-zero or odd-charactered trace headers change nothing: every request
    on one keep-alive connection answers as without them (no 5xx), and the next one still works."""
    import aiohttp

    from hearth_testing.client import HearthStack

    hs = HearthStack(edge_url=stack.edge_url, devicesession_url=stack.url("devicesession"),
                     kafka_bootstrap=stack.kafka_bootstrap, topic_prefix=stack.topic_prefix,
                     internal_api_secret=stack.env["INTERNAL_API_SECRET"], mode="launcher")
    account = await asyncio.to_thread(hs.sign_up)
    crafted = ["00-" + "0" * 32 + "-" + "1" * 16 + "-01", "00-" + "f" * 32 + "-" + "1" * 16 + "-01" + "x" * 4000,
               "zz-not-a-trace", "00-\u00e9" + "a" * 31 + "-" + "1" * 16 + "-01", "", " " * 10, "00-" * 200]
    connector = aiohttp.TCPConnector(limit=1)  # one connection: each request follows the last on it
    async with aiohttp.ClientSession(connector=connector) as http:
        for value in [*crafted, None]:
            headers = {"X-Plex-Token": account.token, "X-Plex-Client-Identifier": "tests",
                       "Accept": "application/json"}
            if value is not None:
                headers["traceparent"] = value
            async with http.get(stack.edge_url + "/api/v2/user", headers=headers) as r:
                body = await r.read()
                assert r.status in (200, 400, 431), (value[:40] if value else value, r.status, body[:200])
                if value is None or len(value) < 200:
                    assert r.status == 200, (value, r.status, body[:200])
