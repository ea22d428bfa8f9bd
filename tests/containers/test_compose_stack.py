"""The compose stack (deploy/compose.yaml: the cluster topology, every container from Hearth's own
images, host network), booted, checked through its edge with real clients, and torn down. Runs with
HEARTH_COMPOSE=1 (CI's containers stage); needs a Docker engine, the images (make images) and
docker-compose. The tests share one stack and run in file order: the broker-stop test is last.
"""

from __future__ import annotations

import asyncio
import email
import os
import re
import secrets
import time
from collections.abc import Iterator
from datetime import datetime

import aiohttp
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError
from plexapi.myplex import MyPlexAccount, MyPlexPinLogin

from hearth_testing.client import Account, HearthStack
from hearth_testing.compose import ComposeStack
from shared.events import ALL_TOPICS, SESSIONS_REVOKED
from tests.conftest import eventually
from tests.plexclient import plex_session

pytestmark = [pytest.mark.timeout(600),
              pytest.mark.skipif(os.environ.get("HEARTH_COMPOSE") != "1", reason="HEARTH_COMPOSE=1 boots compose")]

HOLDERS = {"living-room": ("HOLDER_LIVING_ROOM_PORT", "HOLDER_LIVING_ROOM_2_PORT"),
           "basement": ("HOLDER_BASEMENT_PORT", "HOLDER_BASEMENT_2_PORT")}
# (holder id, INSTANCE_ID) of every sample-holder container.
INSTANCES = {(h, f"holder-{h}-{i}") for h in HOLDERS for i in (1, 2)}


@pytest.fixture(scope="module")
def compose() -> Iterator[ComposeStack]:
    started = time.monotonic()
    with ComposeStack(project=f"hearth-ci-{secrets.token_hex(3)}") as c:
        print(f"compose: cluster stack ready in {time.monotonic() - started:.0f} s")
        yield c


def holder_ports(compose: ComposeStack) -> list[str]:
    """The ports of all four sample-holder containers."""
    return [compose.values[k] for keys in HOLDERS.values() for k in keys]


async def library_status(port: str, token: str) -> int:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/library", headers={"X-Plex-Token": token}) as r:
            return r.status


async def sign_out_everywhere(stack: HearthStack, account: Account, held: str, ports: list[str],
                              timeout: float = 30) -> tuple[float, float, float, float]:
    """Change ``account``'s password with sign-out; wait until every holder container refuses
    ``held`` and devicesession has an acknowledgement from every instance of every sample holder.
    Returns the seconds from sending the change to its response, to the last holder instance
    refusing the token (polled every 20 ms), to the last acknowledgement recorded, and to the last
    sample-holder instance evicting the token by its own clock (the acknowledgements' ``applied_at``:
    what the poll measures, without the poll's own delay on a loaded machine)."""
    sent = time.monotonic()
    sent_at = time.time()

    async def refused_everywhere() -> float:
        waiting = set(ports)
        while waiting:
            statuses = await asyncio.gather(*(library_status(p, held) for p in waiting))
            waiting = {p for p, status in zip(waiting, statuses, strict=True) if status != 401}
            if waiting:
                assert time.monotonic() - sent < timeout, f"still accepted by {sorted(waiting)}"
                await asyncio.sleep(0.02)
        return time.monotonic() - sent

    refusing = asyncio.create_task(refused_everywhere())
    event_id = await asyncio.to_thread(stack.change_password, account)
    answered = time.monotonic() - sent

    applied: dict[tuple[str, str], float] = {}

    def every_instance_acked() -> bool:
        for a in stack.revocation_acks(event_id) or []:
            applied[(a["holder_id"], a["instance_id"])] = datetime.fromisoformat(a["applied_at"]).timestamp()
        return INSTANCES <= set(applied)

    await eventually(lambda: asyncio.to_thread(every_instance_acked), timeout=timeout, interval=0.05)
    acked = time.monotonic() - sent
    evicted = max(applied[i] for i in INSTANCES) - sent_at
    refused = await refusing
    for port in ports:  # an instance acknowledges after evicting: from then on it refuses the token
        assert await library_status(port, held) == 401, port
    assert stack.user_status(held) == 401 and stack.user_status(account.token) == 200
    return answered, refused, acked, evicted


def timings(answered: float, refused: float, acked: float, evicted: float) -> str:
    return (f"change answered in {answered * 1000:.0f} ms; token evicted by every holder instance "
            f"{evicted * 1000:.0f} ms after sending (their clocks), refused by all of them at "
            f"{refused * 1000:.0f} ms (20 ms poll), every acknowledgement recorded at {acked * 1000:.0f} ms")


async def test_compose_stack_sign_up_plexapi_pin_link_sign_out_and_reset_email(compose: ComposeStack) -> None:
    stack = compose.stack
    assert stack is not None
    edge = stack.edge_url
    # sign-up through the edge
    account = await asyncio.to_thread(stack.sign_up)
    # sign-in with python-plexapi
    plex = await asyncio.to_thread(MyPlexAccount, account.username, account.password, session=plex_session(edge))
    assert plex.username == account.username and plex.authenticationToken
    # a PIN link: a TV shows a code, the signed-in account links it, the TV collects its token
    headers = {"X-Plex-Client-Identifier": f"tv-{secrets.token_hex(4)}", "X-Plex-Product": "Plex for Roku",
               "X-Plex-Device-Name": "Living room"}
    login = MyPlexPinLogin(session=plex_session(edge), headers=headers)
    code = await asyncio.to_thread(lambda: login.pin)
    login.run(timeout=60)
    await asyncio.to_thread(plex.link, code)
    assert await asyncio.to_thread(login.waitForLogin)
    tv_token = login.token
    assert tv_token and stack.user_status(tv_token) == 200
    # both instances of both sample holders accept the TV's session, then all four refuse it after a
    # password change with sign-out (made from the plexapi session, which stays signed in), and each
    # instance acknowledged the revocation under its own INSTANCE_ID
    ports = holder_ports(compose)
    for port in ports:
        assert await library_status(port, tv_token) == 200
    account.token = plex.authenticationToken
    took = await sign_out_everywhere(stack, account, tv_token, ports)
    print(f"compose: sign-out over {len(ports)} holder instances: {timings(*took)}")
    # the reset email lands in the SMTP sink container (sent by one of the two notification replicas)
    async with aiohttp.ClientSession() as http:
        async with http.post(edge + "/api/v2/users/password/reset", data={"email": account.email},
                             headers={"Accept": "application/json"}) as r:
            assert r.status == 204

    link = re.compile(re.escape(edge) + r"/reset\S*")

    def reset_link() -> str | None:
        for raw in compose.mail():
            msg = email.message_from_string(raw)
            if account.email not in (msg["To"] or ""):
                continue
            for part in msg.walk():
                if part.get_content_type() == "text/plain":
                    found = link.search(part.get_payload(decode=True).decode())
                    if found:
                        return found.group(0)
        return None

    url = await eventually(reset_link, timeout=60, interval=0.5)
    assert len(url) > len(edge) + 20  # carries the reset token


async def test_compose_topics_have_replication_factor_3_and_min_insync_replicas_2(compose: ComposeStack) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=compose.kafka_bootstrap, request_timeout_ms=15_000)
    await admin.start()
    try:
        assert len((await admin.describe_cluster())["brokers"]) == 3
        described = {t["topic"]: t for t in await admin.describe_topics(list(ALL_TOPICS))}
        assert set(described) == set(ALL_TOPICS)
        for topic, meta in described.items():
            assert meta["partitions"], topic
            assert {len(p["replicas"]) for p in meta["partitions"]} == {3}, topic
        responses = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, t, {"min.insync.replicas": None}) for t in ALL_TOPICS])
        min_isr = {r[3]: {c[0]: c[1] for c in r[4]}["min.insync.replicas"]
                   for resp in responses for r in resp.resources}
        assert min_isr == dict.fromkeys(ALL_TOPICS, "2")
    finally:
        await admin.close()


async def test_compose_sign_out_reaches_every_holder_instance_with_one_broker_stopped(compose: ComposeStack) -> None:
    stack = compose.stack
    assert stack is not None
    account = await asyncio.to_thread(stack.sign_up)
    held = await asyncio.to_thread(stack.sign_in, account.username, account.password, "tv-broker-test")
    ports = holder_ports(compose)
    for port in ports:
        assert await library_status(port, held) == 200
    admin = AIOKafkaAdminClient(bootstrap_servers=compose.kafka_bootstrap, request_timeout_ms=15_000)
    await admin.start()
    try:
        async def leaders() -> set[int]:
            [meta] = await admin.describe_topics([SESSIONS_REVOKED])
            return {p["leader"] for p in meta["partitions"]}

        assert 2 in await leaders(), "kafka-2 leads some partitions of sessions.revoked"
        compose.run("stop", "--timeout", "20", "kafka-2")
        try:
            took = await sign_out_everywhere(stack, account, held, ports, timeout=60)
            print(f"compose: with kafka-2 stopped, sign-out over {len(ports)} holder instances: {timings(*took)}")
        finally:
            compose.run("start", "kafka-2")

        async def recovered() -> bool:  # the broker is back, registered, and in sync again
            try:
                [meta] = await admin.describe_topics([SESSIONS_REVOKED])
                return (len((await admin.describe_cluster())["brokers"]) == 3
                        and all(len(p["isr"]) == 3 for p in meta["partitions"]))
            except KafkaError:  # the client may ask the restarted broker before it listens again
                return False

        await eventually(recovered, timeout=90, interval=1)
    finally:
        await admin.close()
