"""notification on the real stack with real aiosmtpd servers."""

from __future__ import annotations

import asyncio
import email
import email.policy
import re
import signal
import subprocess
import sys
import uuid
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiokafka import AIOKafkaConsumer
from aiosmtpd.controller import Controller

from deploy.launcher import Stack, free_port
from deploy.smtp_sink import SaveToDirectory
from shared import kafka
from shared.events import (
    AUTH_EVENTS,
    LINKCODE_EVENTS,
    NOTIFICATION_DEAD_LETTERS,
    AccountCreated,
    AccountResetRequired,
    Envelope,
    PinLinked,
    ServerClaimed,
    envelope,
    iso,
    utcnow,
)
from tests.auth.test_auth import account_uuid, sign_in, sign_up
from tests.conftest import ROOT, edge_json, eventually

pytestmark = [pytest.mark.stack, pytest.mark.timeout(300)]


def mails(directory: Path, to: str | None = None) -> list[EmailMessage]:
    out = []
    for p in sorted(directory.glob("*.eml")):
        msg = email.message_from_bytes(p.read_bytes(), policy=email.policy.default)
        if to is None or msg["To"] == to:
            out.append(msg)  # type: ignore[arg-type]
    return out


def body_text(msg: EmailMessage) -> str:
    part = msg.get_body(preferencelist=("plain",))
    assert part is not None
    return str(part.get_content())


async def publish(bootstrap: str, topic: str, env: Envelope) -> None:
    producer = kafka.make_producer(bootstrap)
    await producer.start()
    try:
        await kafka.publish(producer, topic, env)
    finally:
        await producer.stop()


async def test_reset_email_arrives_and_its_link_resets_the_password(stack: Stack) -> None:
    a = await sign_up(stack)
    status, _, _ = await edge_json(stack, "POST", "/api/v2/users/password/reset", data={"email": a["email"]})
    assert status == 204
    msg = (await eventually(lambda: mails(stack.mail_dir, a["email"]), timeout=10))[0]
    assert msg["Subject"] == "Reset your Hearth password"
    link = re.search(r"(http://\S+/reset\?token=\S+)", body_text(msg))
    assert link and link.group(1).startswith(stack.edge_url)
    token = link.group(1).split("token=", 1)[1]
    status, _, _ = await edge_json(stack, "PUT", "/api/v2/users/password",
                                   data={"resetToken": token, "password": "reset via email 123", "signOutDevices": "1"})
    assert status == 204
    status, _, _ = await sign_in(stack, a["username"], "reset via email 123")
    assert status == 201
    changed = await eventually(lambda: [m for m in mails(stack.mail_dir, a["email"])
                                        if m["Subject"] == "Your Hearth password was changed"], timeout=10)
    text = body_text(changed[0])
    assert "through a password reset link" in text and "signed out" in text
    logs = "".join(p.read_text(errors="replace") for p in (stack.run_dir / "logs").glob("*.log"))
    assert token not in logs  # no log line contains a reset token


async def test_breach_notice_device_linked_and_server_claimed_emails(stack: Stack) -> None:
    a = await sign_up(stack)
    acct = account_uuid(a["id"])
    async with aiohttp.ClientSession() as http:
        async with http.post(stack.url("auth") + f"/internal/accounts/{acct}/reset-required",
                             json={"reason": "A third party read our account database.", "notify": True},
                             headers={"Authorization": f"Bearer {stack.env['INTERNAL_API_SECRET']}"}) as r:
            assert r.status == 200
    now = iso(utcnow())
    await publish(stack.kafka_bootstrap, stack.topic_prefix + LINKCODE_EVENTS, envelope(
        PinLinked(account_id=acct, device_id="7", client_identifier="tv-1", product="Plex for LG",
                  device_name="Living room TV", platform="webOS", linked_at=now), producer="tests", key=acct))
    await publish(stack.kafka_bootstrap, stack.topic_prefix + LINKCODE_EVENTS, envelope(
        ServerClaimed(account_id=acct, device_id="8", client_identifier="srv-1", name="basement-nas",
                      platform="Linux", claimed_at=now), producer="tests", key=acct))
    got = await eventually(lambda: (m := mails(stack.mail_dir, a["email"])) and len(m) >= 3 and m, timeout=10)
    subjects = {m["Subject"]: m for m in got}
    breach = subjects["Action required: reset your Hearth password"]
    assert "A third party read our account database." in body_text(breach)
    assert re.search(r"/reset\?token=\S{40,}", body_text(breach))
    assert "Living room TV" in body_text(subjects["A new device was linked to your Hearth account"])
    assert "basement-nas" in body_text(subjects["A server was claimed on your Hearth account"])
    html = breach.get_body(preferencelist=("html",))
    assert html is not None and "<a href=" in str(html.get_content())


async def test_device_notice_that_arrives_before_the_account_is_sent_once_the_account_is_known(
        stack: Stack) -> None:
    """auth's account events and linkcode's notices are on different topics, so notification can see
    a device linked to an account it has not heard of yet. That notice waits for the address (retried
    with backoff) instead of being dead-lettered; this race made the breach-notice test flaky."""
    acct = str(uuid.uuid4())
    name = f"late{uuid.uuid4().hex[:10]}"
    address = f"{name}@example.org"
    await publish(stack.kafka_bootstrap, stack.topic_prefix + LINKCODE_EVENTS, envelope(
        PinLinked(account_id=acct, device_id="9", client_identifier="tv-late", product="Plex for Roku",
                  device_name="Bedroom TV", platform="Roku", linked_at=iso(utcnow())), producer="tests", key=acct))
    await asyncio.sleep(2.0)  # the sender has tried and found no recipient
    assert mails(stack.mail_dir, address) == []
    await publish(stack.kafka_bootstrap, stack.topic_prefix + AUTH_EVENTS, envelope(
        AccountCreated(account_id=acct, email=address, username=name), producer="tests", key=acct))
    got = await eventually(lambda: mails(stack.mail_dir, address), timeout=15)
    assert len(got) == 1 and "Bedroom TV" in body_text(got[0])


async def test_redelivered_event_sends_nothing_new(stack: Stack) -> None:
    a = await sign_up(stack)
    acct = account_uuid(a["id"])
    env = envelope(PinLinked(account_id=acct, device_id="1", client_identifier="x", product="Plex",
                             device_name="Phone", platform="iOS", linked_at=iso(utcnow())), producer="tests", key=acct)
    for _ in range(3):
        await publish(stack.kafka_bootstrap, stack.topic_prefix + LINKCODE_EVENTS, env)
    await eventually(lambda: mails(stack.mail_dir, a["email"]), timeout=10)
    await asyncio.sleep(2.0)
    assert len(mails(stack.mail_dir, a["email"])) == 1


# ------------------------------------------------------------------------------ own notification process


class Rejecting:
    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        return "550 5.1.1 mailbox unavailable"


class OwnNotification:
    """A notification process of its own (own topics, database and SMTP server) for failure tests."""

    def __init__(self, stack: Stack, tmp: Path, smtp_port: int, **env: str) -> None:
        self.stack = stack
        self.prefix = f"{stack.topic_prefix}own{uuid.uuid4().hex[:6]}."
        self.port = free_port()
        self.env = {**stack.service_env("notification", self.port), "TOPIC_PREFIX": self.prefix,
                    "DB_NAME_PREFIX": f"own{uuid.uuid4().hex[:6]}_", "SMTP_URL": f"smtp://127.0.0.1:{smtp_port}",
                    "RETRY_BASE": "0.5", "RETRY_MAX": "2", **env}
        self.log = tmp / "notification.log"
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "services.notification"], cwd=ROOT, env=self.env,
                                     stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        await eventually(self.ready, timeout=60, interval=0.2)

    async def ready(self) -> bool:
        try:
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{self.port}/readyz") as r:
                    return r.status == 200
        except aiohttp.ClientError:
            return False

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    async def publish(self, env: Envelope) -> None:
        await publish(self.stack.kafka_bootstrap, self.prefix + AUTH_EVENTS, env)


def breach_event(address: str) -> Envelope:
    acct = str(uuid.uuid4())
    return envelope(AccountResetRequired(account_id=acct, email=address, username="someone", reason="test",
                                         notify=True), producer="tests", key=acct)


async def test_smtp_down_for_ten_seconds_delays_but_loses_nothing(stack: Stack, tmp_path: Path) -> None:
    port = free_port()
    sink = Controller(SaveToDirectory(tmp_path / "mail"), hostname="127.0.0.1", port=port)
    own = OwnNotification(stack, tmp_path, port)
    await own.start()
    try:
        await own.publish(breach_event("down@example.org"))
        await asyncio.sleep(10)
        assert not mails(tmp_path / "mail")
        sink.start()
        await eventually(lambda: mails(tmp_path / "mail", "down@example.org"), timeout=30)
        sink.stop()
    finally:
        own.kill()


async def test_permanent_5xx_ends_in_the_dead_letter_topic(stack: Stack, tmp_path: Path) -> None:
    port = free_port()
    sink = Controller(Rejecting(), hostname="127.0.0.1", port=port)
    sink.start()
    own = OwnNotification(stack, tmp_path, port, PERMANENT_ATTEMPTS="2")
    await own.start()
    try:
        env = breach_event("rejected@example.org")
        await own.publish(env)
        consumer = AIOKafkaConsumer(own.prefix + NOTIFICATION_DEAD_LETTERS, bootstrap_servers=stack.kafka_bootstrap,
                                    auto_offset_reset="earliest", group_id=f"dl-{uuid.uuid4().hex[:6]}")
        await consumer.start()
        try:
            letters: list[Envelope] = []

            async def arrived() -> bool:
                for records in (await consumer.getmany(timeout_ms=300)).values():
                    letters.extend(Envelope.decode(r.value) for r in records)
                return bool(letters)

            await eventually(arrived, timeout=30)
        finally:
            await consumer.stop()
        assert letters[0].data["event_id"] == str(env.id)
        assert letters[0].data["reason"].startswith("SMTP 550")
    finally:
        own.kill()
        sink.stop()


async def test_killed_and_restarted_mid_stream_loses_and_duplicates_nothing(stack: Stack, tmp_path: Path) -> None:
    port = free_port()
    sink = Controller(SaveToDirectory(tmp_path / "mail"), hostname="127.0.0.1", port=port)
    sink.start()
    own = OwnNotification(stack, tmp_path, port, SMTP_RATE="40", SMTP_CONCURRENCY="2", SENDING_TIMEOUT="3")
    await own.start()
    events = [breach_event(f"user{i}@example.org") for i in range(200)]
    try:
        producer = kafka.make_producer(stack.kafka_bootstrap)
        await producer.start()
        for e in events:
            await producer.send(own.prefix + AUTH_EVENTS, e.encode(), key=e.key.encode())
        await producer.stop()
        await eventually(lambda: len(mails(tmp_path / "mail")) >= 40, timeout=30)
        own.kill()
        before = len(mails(tmp_path / "mail"))
        assert before < 200, "the kill must land mid-stream"
        await own.start()
        await eventually(lambda: len({m["To"] for m in mails(tmp_path / "mail")}) == 200, timeout=60)
        await asyncio.sleep(1.0)
    finally:
        own.kill()
        sink.stop()
    got = mails(tmp_path / "mail")
    ids = [m["Message-ID"] for m in got]
    duplicates = len(ids) - len(set(ids))
    # At most the messages in flight at the kill (SMTP_CONCURRENCY) can repeat: the documented window.
    assert duplicates <= 2, duplicates
    assert {m["To"] for m in got} == {f"user{i}@example.org" for i in range(200)}


async def test_sender_survives_a_database_failure_during_a_send_and_delivers_on_retry(stack: Stack) -> None:
    """The recipients table vanishes while a device-linked email is being sent (its recipient is
    looked up at send time): the worker records the failure, stays alive, /readyz stays ready, and
    once the table is back the same delivery is retried and sent once."""
    import asyncpg

    from shared.settings import with_database

    a = await sign_up(stack)
    acct = account_uuid(a["id"])
    conn = await asyncpg.connect(with_database(stack.database_url,
                                               f"{stack.extra_env['DB_NAME_PREFIX']}hearth_notification"))
    try:
        await eventually(lambda: conn.fetchval("SELECT 1 FROM recipients WHERE account_id = $1", uuid.UUID(acct)))
        await conn.execute("ALTER TABLE recipients RENAME TO recipients_away")
        try:
            env = envelope(PinLinked(account_id=acct, device_id="3", client_identifier="tv-db", product="Plex",
                                     device_name="Den TV", platform="tvOS", linked_at=iso(utcnow())),
                           producer="tests", key=acct)
            await publish(stack.kafka_bootstrap, stack.topic_prefix + LINKCODE_EVENTS, env)
            failed = await eventually(lambda: conn.fetchrow(
                "SELECT status, attempts, last_error FROM deliveries WHERE event_id = $1 AND attempts >= 1"
                " AND last_error IS NOT NULL", env.id), timeout=15)
            assert "recipients" in failed["last_error"] or "Undefined" in failed["last_error"], dict(failed)
            async with aiohttp.ClientSession() as http, http.get(stack.url("notification") + "/readyz") as r:
                assert r.status == 200, await r.text()
        finally:
            await conn.execute("ALTER TABLE recipients_away RENAME TO recipients")
        got = await eventually(lambda: mails(stack.mail_dir, a["email"]), timeout=20)
        assert [m["Subject"] for m in got] == ["A new device was linked to your Hearth account"]
        row = await conn.fetchrow("SELECT status, attempts FROM deliveries WHERE event_id = $1", env.id)
        assert row["status"] == "sent" and row["attempts"] >= 2
        # Every worker is still there: a second email goes out as usual.
        status, _, _ = await edge_json(stack, "POST", "/api/v2/users/password/reset", data={"email": a["email"]})
        assert status == 204
        await eventually(lambda: len(mails(stack.mail_dir, a["email"])) == 2, timeout=10)
    finally:
        await conn.close()
