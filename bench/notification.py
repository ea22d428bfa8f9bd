"""Notification: latency from ``POST /api/v2/users/password/reset`` to the message stored by the
SMTP sink (p50, p99) beside the broker's own round trip; and emails per second to the sink for
10,000 queued events beside raw aiosmtplib sends to the same sink (8 connections) in the same run.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from email.message import EmailMessage
from pathlib import Path

import aiohttp
import aiosmtplib

from bench.common import Row, broker_round_trip, summary_ms
from deploy.launcher import Stack
from shared import kafka
from shared.events import AUTH_EVENTS, AccountResetRequired, envelope

NAME = "notification"
SAMPLES = 100
QUEUED = 10_000


def _count(mail_dir: Path) -> int:
    return sum(1 for p in mail_dir.iterdir() if p.suffix == ".eml")


async def reset_latency(stack: Stack) -> list[float]:
    tag = uuid.uuid4().hex[:6]
    emails = []
    async with aiohttp.ClientSession() as http:
        for i in range(SAMPLES):
            name = f"n{i}{tag}"
            async with http.post(stack.edge_url + "/api/v2/users", data={"email": f"{name}@example.org",
                                                                          "username": name,
                                                                          "password": "notification bench 1"}) as r:
                assert r.status == 201
            emails.append(f"{name}@example.org")
        latencies = []
        for email in emails:
            before = set(stack.mail_dir.iterdir())
            t0 = time.perf_counter()
            async with http.post(stack.edge_url + "/api/v2/users/password/reset", data={"email": email}) as r:
                assert r.status == 204
            while True:
                new = [p for p in set(stack.mail_dir.iterdir()) - before if p.suffix == ".eml"]
                if any(f"X-Hearth-Sink-Rcpt: {email}".encode() in p.read_bytes()[:300] for p in new):
                    break
                await asyncio.sleep(0.002)
            latencies.append(time.perf_counter() - t0)
    return latencies


async def queued_throughput(stack: Stack) -> float:
    producer = kafka.make_producer(stack.kafka_bootstrap)
    await producer.start()
    events = []
    for i in range(QUEUED):
        acct = str(uuid.uuid4())
        events.append(envelope(AccountResetRequired(account_id=acct, email=f"bulk{i}@example.org", username="bulk",
                                                    reason="benchmark", notify=True), producer="bench", key=acct))
    start_count = _count(stack.mail_dir)
    t0 = time.perf_counter()
    futures = [await producer.send(stack.topic_prefix + AUTH_EVENTS, e.encode(), key=e.key.encode()) for e in events]
    await asyncio.gather(*futures)
    await producer.stop()
    while _count(stack.mail_dir) - start_count < QUEUED:
        await asyncio.sleep(0.2)
    return QUEUED / (time.perf_counter() - t0)


async def raw_smtp_rate(port: int, n: int = 3000, connections: int = 8) -> float:
    async def sender(count: int) -> None:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port)
        await client.connect()
        for i in range(count):
            msg = EmailMessage()
            msg["From"], msg["To"], msg["Subject"] = "bench@example.org", f"raw{i}@example.org", "raw"
            msg.set_content("reference message " * 20)
            await client.send_message(msg)
        await client.quit()

    t0 = time.perf_counter()
    await asyncio.gather(*(sender(n // connections) for _ in range(connections)))
    return (n // connections * connections) / (time.perf_counter() - t0)


async def run(stack: Stack) -> list[Row]:
    lat = summary_ms(await reset_latency(stack))
    ref = summary_ms(await broker_round_trip(stack.kafka_bootstrap))
    rate = await queued_throughput(stack)
    raw = await raw_smtp_rate(stack.ports["smtp"])
    return [
        Row(NAME, "reset request -> mail stored p50", lat["p50"], "ms", "broker produce->consume p50", ref["p50"]),
        Row(NAME, "reset request -> mail stored p99", lat["p99"], "ms", "broker produce->consume p99", ref["p99"],
            "p99 < 1000 ms"),
        Row(NAME, f"{QUEUED:,} queued events -> sink", rate, "emails/s", "raw aiosmtplib, 8 connections", raw),
    ]
