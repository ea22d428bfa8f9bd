"""Fault tests on the cluster topology: real processes, real SIGKILL, real broker and database faults.

Each test drives a stream of real requests through the edge and checks, afterwards, from the
brokers' own record (every ``sessions.revoked`` and every ``revocation.applied`` read from the
beginning) and from the holders' answers:

- every committed password change with sign-out took effect exactly once (one revocation event per
  change event, and its old tokens refused);
- every holder instance that was running applied every revocation;
- clients saw errors only for requests in flight when a process died (counted and reported in
  ``artifacts/faults.txt``).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from deploy.launcher import SERVICES, Stack
from shared.events import REVOCATIONS_APPLIED, SESSIONS_REVOKED, Envelope
from tests.conftest import ROOT, eventually
from tests.faults.conftest import FAULT_HOLDERS

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]
PASSWORD = "correct horse battery staple"
HOLDING_SERVICES = ("auth", "linkcode", "web")  # services that run the holder kit
REPORT = ROOT / "artifacts" / "faults.txt"


def report(line: str) -> None:
    REPORT.parent.mkdir(exist_ok=True)
    with REPORT.open("a") as f:
        f.write(f"{time.strftime('%H:%M:%S')} {line}\n")
    print(line)


# ------------------------------------------------------------------------------------------ clients


@dataclass
class Edge:
    """An edge client that counts requests in flight and errors (5xx or no answer)."""

    stack: Stack
    http: aiohttp.ClientSession
    inflight: int = 0
    requests: int = 0
    errors: list[str] = field(default_factory=list)

    async def call(self, method: str, path: str, *, token: str | None = None, client: str = "faults",
                   headers: dict[str, str] | None = None,
                   **kw: object) -> tuple[int, dict[str, object] | None, dict[str, str]]:
        headers = {"Accept": "application/json", "X-Plex-Client-Identifier": client, **(headers or {})}
        if token:
            headers["X-Plex-Token"] = token
        self.inflight += 1
        self.requests += 1
        try:
            async with self.http.request(method, self.stack.edge_url + path, headers=headers, **kw) as r:  # type: ignore[arg-type]
                raw = await r.read()
                body = None
                if raw and r.content_type == "application/json":
                    body = await r.json()
                if r.status >= 500:
                    self.errors.append(f"{method} {path} -> {r.status}")
                return r.status, body, dict(r.headers)
        except (TimeoutError, aiohttp.ClientError) as exc:
            self.errors.append(f"{method} {path} -> {type(exc).__name__}")
            return 0, None, {}
        finally:
            self.inflight -= 1


@dataclass
class Account:
    username: str
    password: str
    n: int = 0


async def sign_up(edge: Edge) -> Account:
    name = f"f{uuid.uuid4().hex[:10]}"
    for _ in range(20):
        status, body, _ = await edge.call("POST", "/api/v2/users",
                                          data={"email": f"{name}@example.org", "username": name, "password": PASSWORD})
        if status == 201:
            return Account(name, PASSWORD)
        if status == 409:  # an earlier attempt committed but its answer was lost
            return Account(name, PASSWORD)
        await asyncio.sleep(0.5)
    raise AssertionError(f"sign-up kept failing: {status} {body}")


async def sign_in(edge: Edge, a: Account, client: str) -> str | None:
    status, body, _ = await edge.call("POST", "/api/v2/users/signin", client=client,
                                      data={"login": a.username, "password": a.password})
    return str(body["authToken"]) if status == 201 and body else None


@dataclass
class Change:
    event_id: str
    old_tokens: list[str]
    answered: float


async def change_password(edge: Edge, a: Account, changes: list[Change]) -> None:
    """Sign in twice, then change the password with sign-out from the first session."""
    me = await sign_in(edge, a, f"me-{a.username}")
    tv = await sign_in(edge, a, f"tv-{a.username}")
    if not me or not tv:
        return
    new = f"fresh passphrase {uuid.uuid4().hex[:12]}"
    status, _, headers = await edge.call("PUT", "/api/v2/user/password", token=me,
                                         data={"currentPassword": a.password, "password": new,
                                               "signOutDevices": "true"})
    if status == 204:
        a.password, a.n = new, a.n + 1
        changes.append(Change(headers["X-Hearth-Event-Id"], [tv], time.time()))
    elif status in (0, 401, 502, 503, 504):
        # The outcome is unknown (the answer was lost): find out which password holds now. A 401 here
        # would be nginx's re-sent PUT answered as a new change after the first replica committed it
        # and died; auth recognises the re-sent request by its request id, so it is an error.
        if status == 401:
            edge.errors.append("PUT /api/v2/user/password -> 401 (re-sent by nginx after a replica died)")
        if await sign_in(edge, Account(a.username, new), "probe"):  # noqa: SIM102
            a.password, a.n = new, a.n + 1


async def link_pin(edge: Edge, a: Account, why: list[str] | None = None) -> bool:
    """Create a PIN as a TV, link it from a signed-in phone, collect the token as the TV."""
    def fail(step: str, status: int) -> bool:
        if why is not None:
            why.append(f"{step} {status}")
        return False

    token = await sign_in(edge, a, f"phone-{a.username}")
    if not token:
        return fail("sign-in", -1)
    cid = f"tv-{uuid.uuid4().hex[:8]}"
    status, pin, _ = await edge.call("POST", "/api/v2/pins.json", client=cid, data={"strong": "false"})
    if status != 201 or not pin:
        return fail("create", status)
    status, _, _ = await edge.call("PUT", "/api/v2/pins/link", token=token, client="phone",
                                   data={"code": str(pin["code"])}, headers={"X-Plex-Product": "Plex SSO"})
    if status != 204:
        return fail("link", status)
    status, body, _ = await edge.call("GET", f"/api/v2/pins/{pin['id']}.json", client=cid)
    if status == 200 and bool(body and body.get("authToken")):
        return True
    return fail("collect", status)


# ------------------------------------------------------------------------------------------ the record


class Record:
    """Every revocation and acknowledgement on the cluster, read from the beginning."""

    def __init__(self, stack: Stack) -> None:
        p = stack.topic_prefix
        self.consumer = AIOKafkaConsumer(p + SESSIONS_REVOKED, p + REVOCATIONS_APPLIED,
                                         bootstrap_servers=stack.kafka_bootstrap, group_id=None,
                                         auto_offset_reset="earliest")
        self.revocations: dict[str, tuple[float, str | None]] = {}  # id -> (occurred, causing event)
        self.by_cause: dict[str, list[str]] = {}
        self.acks: dict[str, set[tuple[str, str]]] = {}
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.consumer.start()

        async def run() -> None:
            async for rec in self.consumer:
                try:
                    env = Envelope.decode(rec.value)
                except ValueError:
                    continue
                if env.type == "sessions.revoked":
                    rid = str(env.data["revocation_id"])
                    if rid not in self.revocations:
                        cause = env.data.get("causing_event_id")
                        self.revocations[rid] = (env.occurred_at.timestamp(), cause)
                        if cause:
                            self.by_cause.setdefault(str(cause), []).append(rid)
                elif env.type == "revocation.applied":
                    self.acks.setdefault(str(env.data["revocation_id"]), set()).add(
                        (str(env.data["holder_id"]), str(env.data.get("instance_id", ""))))

        self.task = asyncio.create_task(run())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
        await self.consumer.stop()

    def missing(self, stack: Stack, since: float, down: dict[str, tuple[float, float]]) -> list[str]:
        """(revocation, instance) pairs not acknowledged, for revocations after ``since``, leaving out
        instances that were down (killed until ready again, with a second of margin) at the time."""
        expected = [(h, stack.instance_id(k)) for h in FAULT_HOLDERS for k in stack.holder_keys(h)]
        expected += [(s, stack.instance_id(k)) for s in HOLDING_SERVICES for k in stack.replica_keys(s)]
        out = []
        for rid, (at, _) in self.revocations.items():
            if at < since:
                continue
            for who in expected:
                window = down.get(who[1])
                if window and window[0] - 1 <= at <= window[1] + 1:
                    continue
                if who not in self.acks.get(rid, set()):
                    out.append(f"{rid[:8]}:{who[0]}/{who[1]}")
        return out


async def refused_everywhere(stack: Stack, http: aiohttp.ClientSession, tokens: list[str]) -> bool:
    for port in stack.holder_ports():
        for t in tokens:
            async with http.get(f"http://127.0.0.1:{port}/library", headers={"X-Plex-Token": t}) as r:
                if r.status != 401:
                    return False
    return True


async def check_changes(stack: Stack, record: Record, http: aiohttp.ClientSession, changes: list[Change]) -> None:
    """Exactly once: one revocation per committed change, and its old tokens refused by every instance.

    A change whose event was held up (the database was down when it committed, so neither the
    hand-over nor the relay could deliver it) may find its sessions already revoked by the account's
    next change, applied first: that next change's selection takes every session created before
    it, the held-up change's included. Its revocation then revokes nothing and publishes no
    ``sessions.revoked``; it still must have been processed once, and each of its old sessions must
    have been revoked before it ran (see :func:`subsumed`)."""
    try:
        await eventually(lambda: all(c.event_id in record.by_cause for c in changes), timeout=30)
    except AssertionError:
        lost = [c for c in changes if c.event_id not in record.by_cause]
        unexplained = [c.event_id for c in lost if not await subsumed(stack, c)]
        if unexplained:
            raise AssertionError(f"no revocation for {unexplained}: {await diagnose(stack, unexplained)}") from None
        report(f"{len(lost)} change(s) whose event was held up while the database was down found their sessions"
               " already revoked by the account's next change")
    await asyncio.sleep(1.0)  # a duplicate would have arrived by now
    dupes = {c.event_id: record.by_cause[c.event_id] for c in changes
             if c.event_id in record.by_cause and len(record.by_cause[c.event_id]) != 1}
    assert not dupes, dupes
    tokens = [t for c in changes for t in c.old_tokens]
    await eventually(lambda: refused_everywhere(stack, http, tokens), timeout=10)


async def subsumed(stack: Stack, change: Change) -> bool:
    """The change was processed exactly once (one revocation row for it in devicesession), revoked
    nothing, and every session of its old tokens had been revoked by another cause before that."""
    import asyncpg

    from shared import tokens
    from shared.settings import decode_key, with_database

    prefix = stack.extra_env["DB_NAME_PREFIX"]
    key = decode_key(stack.env["TOKEN_HMAC_KEY"])
    ds = await asyncpg.connect(with_database(stack.database_url, f"{prefix}hearth_devicesession"))
    try:
        rows = await ds.fetch("SELECT revoked, created_at FROM revocations WHERE causing_event_id = $1::uuid",
                              change.event_id)
        if len(rows) != 1 or rows[0]["revoked"] != 0:
            return False
        for t in change.old_tokens:
            revoked_at = await ds.fetchval("SELECT revoked_at FROM sessions WHERE token_hmac = $1",
                                           tokens.digest(key, t, purpose="session"))
            if revoked_at is None or revoked_at > rows[0]["created_at"]:
                return False
        return True
    finally:
        await ds.close()


async def diagnose(stack: Stack, event_ids: list[str]) -> dict[str, object]:
    """Where the events of committed changes are: auth's outbox, devicesession's processed events, and
    what the revocation had to choose from: the event's time and kept session beside every session of
    the account (created, revoked, why) and the account's cut-offs."""
    import asyncpg

    from shared.settings import with_database

    prefix = stack.extra_env["DB_NAME_PREFIX"]
    out: dict[str, object] = {}
    auth = await asyncpg.connect(with_database(stack.database_url, f"{prefix}hearth_auth"))
    ds = await asyncpg.connect(with_database(stack.database_url, f"{prefix}hearth_devicesession"))
    try:
        for eid in event_ids:
            row = await auth.fetchrow("SELECT id, published_at, created_at FROM outbox WHERE event_id = $1::uuid", eid)
            seen = await ds.fetch("SELECT consumer, processed_at FROM processed_events WHERE event_id = $1::uuid", eid)
            rev = await ds.fetchrow("SELECT id, revoked FROM revocations WHERE causing_event_id = $1::uuid", eid)
            out[eid] = {"outbox": dict(row) if row else None, "processed": [dict(r) for r in seen],
                        "revocation": dict(rev) if rev else None}
            payload = await auth.fetchval("SELECT payload FROM outbox WHERE event_id = $1::uuid", eid)
            if payload is not None:
                env = Envelope.decode(payload)
                account = env.data.get("account_id")
                out[eid]["event"] = {"occurred_at": env.occurred_at, "keep_session_id": env.data.get("keep_session_id")}  # type: ignore[index]
                out[eid]["sessions"] = [dict(r) for r in await ds.fetch(  # type: ignore[index]
                    "SELECT s.id, d.client_identifier, s.created_at, s.revoked_at, s.revoked_reason FROM sessions s"
                    " JOIN devices d ON d.id = s.device_id WHERE s.account_id = $1::uuid ORDER BY s.created_at",
                    account)]
                out[eid]["cutoffs"] = [dict(r) for r in await ds.fetch(  # type: ignore[index]
                    "SELECT * FROM account_cutoffs WHERE account_id = $1::uuid", account)]
    finally:
        await auth.close()
        await ds.close()
    return out


def ready_status(port: int) -> int:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:  # noqa: S310
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return 0


# ------------------------------------------------------------------------------------------ tests


async def test_killing_one_replica_of_each_service_mid_stream(cluster: Stack) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        edge = Edge(cluster, http)
        record = Record(cluster)
        await record.start()
        try:
            accounts = [await sign_up(edge) for _ in range(12)]
            since = time.time()
            changes: list[Change] = []
            links = [0, 0]
            why: list[str] = []
            stop = asyncio.Event()

            async def worker(i: int) -> None:
                # Each worker has its own accounts: a change must not revoke another worker's PIN link.
                mine = accounts[i::4]
                k = 0
                while not stop.is_set():
                    a = mine[k % len(mine)]
                    k += 1
                    if k % 2:
                        await change_password(edge, a, changes)
                    else:
                        links[0] += 1
                        ok = await link_pin(edge, a, why)  # (not `+= await`: that reads the count before awaiting)
                        links[1] += ok

            workers = [asyncio.create_task(worker(i)) for i in range(4)]
            await asyncio.sleep(4)
            keys = [f"{s}#2" for s in SERVICES]
            inflight = edge.inflight
            errors_before = len(edge.errors)
            killed = time.time()
            for key in keys:
                cluster.kill(key)
            await asyncio.sleep(4)  # the survivors carry the stream alone
            for key in keys:
                await asyncio.to_thread(cluster.restart, key)
            back = time.time()
            await asyncio.sleep(3)  # and with every replica back
            stop.set()
            await asyncio.gather(*workers)
            errors = edge.errors[errors_before:]
            report(f"kill one replica of each service: {edge.requests} requests, {len(changes)} password changes, "
                   f"{links[1]}/{links[0]} PIN links (failed: {why[:10]}), {inflight} in flight at the kill, "
                   f"{len(errors)} client errors {errors[:10]}")
            assert len(errors) <= inflight, errors
            assert len(changes) >= 5 and links[1] >= 3
            assert links[0] - links[1] <= inflight, why  # a link fails only when in flight at the kill
            await check_changes(cluster, record, http, changes)
            down = {cluster.instance_id(k): (killed, back) for k in keys}
            await eventually(lambda: not record.missing(cluster, since, down), timeout=30)
        finally:
            await record.stop()


def relay_active(stack: Stack, key: str) -> bool:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{stack.ports[key]}/metrics", timeout=3) as r:  # noqa: S310
        return any(line.startswith("hearth_outbox_relay_active") and line.rstrip().endswith(" 1.0")
                   for line in r.read().decode().splitlines())


async def test_outbox_relay_takeover_within_seconds(cluster: Stack) -> None:
    """SIGKILL the replica of auth whose relay publishes: the other takes over within seconds and a
    change committed meanwhile is published."""
    keys = cluster.replica_keys("auth")
    leaders = await eventually(lambda: [k for k in keys if relay_active(cluster, k)], timeout=20)
    assert len(leaders) == 1, leaders
    leader = leaders[0]
    other = next(k for k in keys if k != leader)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        edge = Edge(cluster, http)
        record = Record(cluster)
        await record.start()
        try:
            a = await sign_up(edge)
            cluster.kill(leader)
            killed = time.monotonic()
            changes: list[Change] = []
            await change_password(edge, a, changes)  # committed by the survivor, published by whoever leads
            await eventually(lambda: relay_active(cluster, other), timeout=10, interval=0.1)
            took = time.monotonic() - killed
            assert changes
            await check_changes(cluster, record, http, changes)
            report(f"outbox relay of {leader} killed: {other} leading after {took:.1f} s, the change committed "
                   f"meanwhile published and applied")
            assert took < 5
        finally:
            await record.stop()
            await asyncio.to_thread(cluster.restart, leader)


async def leader_counts(stack: Stack, topic: str) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=stack.kafka_bootstrap, group_id=None)
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()
        counts: dict[int, int] = {}
        for p in consumer.partitions_for_topic(topic) or set():
            leader = consumer._client.cluster.leader_for_partition(TopicPartition(topic, p))
            counts[leader] = counts.get(leader, 0) + 1
        return counts
    finally:
        await consumer.stop()


async def in_sync(stack: Stack, topic: str) -> bool:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=stack.kafka_bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics([topic])
        parts = described[0]["partitions"]
        return all(len(p["isr_nodes"] if "isr_nodes" in p else p["isr"]) == 3 and p["leader"] >= 0 for p in parts)
    finally:
        await admin.close()


async def test_killing_the_broker_that_leads_sessions_revoked(cluster: Stack) -> None:
    topic = cluster.topic_prefix + SESSIONS_REVOKED
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        edge = Edge(cluster, http)
        record = Record(cluster)
        await record.start()
        try:
            accounts = [await sign_up(edge) for _ in range(25)]
            counts = await leader_counts(cluster, topic)
            node = max(counts, key=lambda n: counts[n])
            broker = cluster.kafkas[node - 1]
            assert broker.node_id == node and broker.child
            since = time.time()
            changes: list[Change] = []
            queue = [accounts[i % len(accounts)] for i in range(200)]

            async def worker(i: int) -> None:
                # Changes of one account are sequential: each needs the password the last one set.
                for a in queue[i::len(accounts)]:
                    await change_password(edge, a, changes)

            workers = [asyncio.create_task(worker(i)) for i in range(len(accounts))]
            await eventually(lambda: len(changes) >= 40, timeout=120, interval=0.1)
            killed_at = len(changes)
            broker.child.kill()
            await asyncio.gather(*workers)
            report(f"kill broker {node} leading {counts[node]} of {sum(counts.values())} sessions.revoked partitions "
                   f"after {killed_at} changes: {len(changes)}/200 changes answered 204, "
                   f"{len(edge.errors)} client errors {edge.errors[:10]}")
            assert len(changes) >= 190, edge.errors[:20]
            await check_changes(cluster, record, http, changes)
            await eventually(lambda: not record.missing(cluster, since, {}), timeout=30)
            await asyncio.to_thread(broker.start)
            cluster.children.append(broker.child)
            await eventually(lambda: in_sync(cluster, topic), timeout=90, interval=1)
            report(f"broker {node} back: every sessions.revoked partition has 3 in-sync replicas again")
        finally:
            await record.stop()


async def test_postgres_restart_under_load(cluster: Stack) -> None:
    assert cluster.postgres is not None and cluster.postgres.child is not None
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        edge = Edge(cluster, http)
        record = Record(cluster)
        await record.start()
        try:
            accounts = [await sign_up(edge) for _ in range(8)]
            since = time.time()
            changes: list[Change] = []
            stop = asyncio.Event()

            async def worker(a: Account) -> None:
                while not stop.is_set():
                    await change_password(edge, a, changes)
                    await asyncio.sleep(0.05)

            workers = [asyncio.create_task(worker(a)) for a in accounts]
            pids = {k: c.proc.pid for k, c in cluster.named.items()}
            await eventually(lambda: len(changes) >= 8, timeout=60)
            before = len(changes)
            keys = [k for s in ("auth", "devicesession", "linkcode", "notification") for k in cluster.replica_keys(s)]
            await asyncio.to_thread(cluster.postgres.child.stop)  # SIGINT: fast shutdown
            not_ready = await eventually(
                lambda: all(ready_status(cluster.ports[k]) == 503 for k in keys), timeout=20, interval=0.2)
            await asyncio.sleep(2)
            await asyncio.to_thread(cluster.postgres.start)
            cluster.children.insert(0, cluster.postgres.child)
            await eventually(lambda: all(ready_status(cluster.ports[k]) == 200 for k in keys), timeout=60,
                             interval=0.5)
            await eventually(lambda: len(changes) >= before + 8, timeout=60)
            stop.set()
            await asyncio.gather(*workers)
            assert {k: c.proc.pid for k, c in cluster.named.items()} == pids  # nothing was restarted
            assert all(c.proc.poll() is None for c in cluster.named.values())
            report(f"PostgreSQL fast shutdown and start: all replicas reported not ready ({not_ready}) and came "
                   f"back without a restart; {len(changes)} password changes ({before} before), "
                   f"{len(edge.errors)} client errors while the database was down")
            await check_changes(cluster, record, http, changes)
            await eventually(lambda: not record.missing(cluster, since, {}), timeout=30)
            for a in accounts:  # every committed password is the one that works
                assert await sign_in(edge, a, "after"), a
        finally:
            await record.stop()


async def test_holder_started_in_a_revocation_storm_never_serves_a_revoked_token(cluster: Stack) -> None:
    from deploy.launcher import free_port

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        edge = Edge(cluster, http)
        accounts = [await sign_up(edge) for _ in range(10)]
        changes: list[Change] = []
        stop = asyncio.Event()

        async def storm(a: Account) -> None:
            while not stop.is_set():
                await change_password(edge, a, changes)

        workers = [asyncio.create_task(storm(a)) for a in accounts]
        await eventually(lambda: len(changes) >= 5, timeout=60)
        key = f"holder:{FAULT_HOLDERS[0]}#3"
        cluster.ports[key] = free_port()
        started_at = len(changes)
        child = await asyncio.to_thread(cluster.restart, key)  # a third instance, started now
        port = cluster.ports[key]
        try:
            served: list[str] = []
            checked = 0
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                # Every token revoked so far (before or after the instance started) must be refused.
                snapshot = list(changes)
                for c in snapshot:
                    for t in c.old_tokens:
                        async with http.get(f"http://127.0.0.1:{port}/library", headers={"X-Plex-Token": t}) as r:
                            checked += 1
                            if r.status == 200 and time.time() - c.answered > 0.5:
                                served.append(c.event_id)
                await asyncio.sleep(0.05)
            stop.set()
            await asyncio.gather(*workers)
            report(f"holder instance started after {started_at} changes of a storm of {len(changes)}: "
                   f"{checked} checks of revoked tokens, {len(served)} served")
            assert not served
        finally:
            stop.set()
            child.kill()
            cluster.named.pop(key, None)
            cluster.ports.pop(key, None)
