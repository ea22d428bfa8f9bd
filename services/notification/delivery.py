"""notification's delivery: the sender claims due deliveries and sends them over a few reused SMTP
connections at ``SMTP_RATE``.

Retries: transient failures (connection errors, timeouts, 4xx replies) back off exponentially with
jitter up to ``MAX_ATTEMPTS``; permanent ones (5xx) get ``PERMANENT_ATTEMPTS``; then the row is
``dead`` and a dead letter with the reason is published (outbox) for operators. No single message
can end a worker (see ``Sender._worker``), and ``/readyz`` reports whether every sender task runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from urllib.parse import parse_qs, unquote, urlsplit

import aiosmtplib
import asyncpg
import jinja2
from prometheus_client import Counter, Gauge, Histogram

from services.notification import store
from services.notification.errors import InvalidSmtpUrl
from services.notification.rendering import Rendered, Renderer
from services.notification.service import PRIORITY
from services.notification.settings import Settings
from shared import outbox
from shared.crypto import SealError
from shared.events import Envelope, utcnow

log = logging.getLogger(__name__)

SENT = Counter("hearth_notification_sent_total", "Emails sent", ["kind"])
FAILED = Counter("hearth_notification_failed_total", "Failed send attempts", ["kind", "permanent"])
WORKER_FAILURES = Counter("hearth_notification_worker_failures_total",
                          "Unexpected failures of one delivery caught by a sender worker")
DEAD = Counter("hearth_notification_dead_lettered_total", "Deliveries given up and dead-lettered", ["kind"])
QUEUE_AGE = Gauge("hearth_notification_queue_age_seconds", "Age of the oldest due delivery")
SEND_LATENCY = Histogram("hearth_notification_send_seconds", "SMTP send time per message", ["kind"],
                         buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
DELIVERY_LATENCY = Histogram("hearth_notification_delivery_seconds", "Event queued to SMTP accepted", ["kind"],
                             buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))


@dataclass(frozen=True)
class SmtpConfig:
    host: str
    port: int
    use_tls: bool
    start_tls: bool
    username: str | None
    password: str | None

    @classmethod
    def parse(cls, url: str) -> SmtpConfig:
        parts = urlsplit(url)
        if parts.scheme not in ("smtp", "smtps"):
            raise InvalidSmtpUrl("SMTP_URL must start with smtp:// or smtps://")
        query = parse_qs(parts.query)
        implicit = parts.scheme == "smtps"
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or (465 if implicit else 25),
            use_tls=implicit,
            start_tls=query.get("starttls", ["0"])[0] in ("1", "true", "yes"),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
        )


class SharedRate:
    """At most ``rate`` sends per second across every replica: each replica takes a small share of
    the current second's budget from ``send_budget`` (one upsert per share, on the database clock)
    and spends it locally within that second; a full budget waits for the next second. A bucket in
    each process's memory would let N replicas send N times ``SMTP_RATE``."""

    def __init__(self, pool: asyncpg.Pool, rate: float) -> None:
        self.pool = pool
        self.rate = max(1, int(rate))
        self.share = max(1, self.rate // 10)
        self.second = -1
        self.tokens = 0
        self.lock = asyncio.Lock()
        self.purged = 0.0

    async def _take(self) -> tuple[int, int, float]:
        """(second, tokens granted, seconds left in that second)."""
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                "WITH s AS (SELECT floor(extract(epoch FROM clock_timestamp()))::bigint AS second,"
                "                  extract(epoch FROM clock_timestamp()) AS t)"
                " , grant_ AS ("
                "   INSERT INTO send_budget AS b (second, used, last_grant) SELECT second, least($1::int, $2::int),"
                "   least($1::int, $2::int) FROM s"
                "   ON CONFLICT (second) DO UPDATE SET used = b.used + least($1::int, $2::int - b.used),"
                "   last_grant = least($1::int, $2::int - b.used)"
                "   WHERE b.used < $2::int RETURNING b.last_grant)"
                " SELECT s.second, s.t, (SELECT last_grant FROM grant_) AS granted FROM s",
                self.share, self.rate,
            )
            if time.monotonic() - self.purged > 60:
                self.purged = time.monotonic()
                await conn.execute("DELETE FROM send_budget WHERE second < $1", int(row["second"]) - 60)
        second, t = int(row["second"]), float(row["t"])
        return second, int(row["granted"] or 0), max(0.0, second + 1 - t)

    async def acquire(self) -> None:
        async with self.lock:
            while True:
                # Tokens are spent in the second they were granted for (the hosts' clocks are assumed
                # NTP-close to the database's; a skew only shifts when a share expires).
                if self.tokens > 0 and self.second == int(time.time()):
                    self.tokens -= 1
                    return
                second, granted, left = await self._take()
                if granted > 0:
                    self.second, self.tokens = second, granted - 1
                    return
                await asyncio.sleep(left + 0.001)


class Sender:
    """Claims due deliveries and sends them over a few reused SMTP connections."""

    def __init__(self, settings: Settings, pool: asyncpg.Pool, dead_letter_topic: str) -> None:
        self.s = settings
        self.pool = pool
        self.dead_letter_topic = dead_letter_topic
        self.renderer = Renderer(settings)
        self.smtp = SmtpConfig.parse(settings.smtp_url.get_secret_value())
        self.bucket = SharedRate(pool, settings.smtp_rate)
        self.wake = asyncio.Event()
        self.space = asyncio.Event()  # a worker took a message: the claimer may claim again
        self.queue: asyncio.Queue[store.Delivery] = asyncio.Queue(maxsize=settings.smtp_concurrency)
        self.tasks: list[asyncio.Task[None]] = []
        self.stopping = False
        self.sender_domain = settings.mail_from.rsplit("@", 1)[-1].strip(">") or "hearth.invalid"

    def start(self) -> None:
        self.tasks.append(asyncio.create_task(self._claimer(), name="notification-claimer"))
        for i in range(self.s.smtp_concurrency):
            self.tasks.append(asyncio.create_task(self._worker(), name=f"notification-smtp-{i}"))

    async def stop(self) -> None:
        self.stopping = True
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    async def _claimer(self) -> None:
        """Feed workers: claim only as many rows as there are free workers, highest priority first,
        so a reset requested during a mass mailing waits for at most one message per worker."""
        last_stale = 0.0
        while not self.stopping:
            try:
                if time.monotonic() - last_stale > 10:
                    await store.requeue_stale(self.pool, self.s.sending_timeout)
                    QUEUE_AGE.set(await store.oldest_due_age(self.pool, sorted(set(PRIORITY.values()))))
                    last_stale = time.monotonic()
                self.space.clear()
                if self.queue.full():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.space.wait(), 1.0)
                    continue
                free = self.queue.maxsize - self.queue.qsize()
                self.wake.clear()  # before the claim: a wake-up for a row committed during it is kept
                batch = await store.claim_due(self.pool, max(1, free))
                for d in batch:
                    await self.queue.put(d)
                if not batch:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.wake.wait(), 0.5)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("claiming deliveries failed")
                await asyncio.sleep(1)

    @property
    def healthy(self) -> bool:
        """Every sender task is running (for /readyz)."""
        return bool(self.tasks) and not any(t.done() for t in self.tasks)

    async def _worker(self) -> None:
        """Send what the claimer queues. No single message can end a worker: any failure of one
        delivery (the database gone mid-send, a bug in a template) is caught here, recorded as a
        transient failure with backoff when the database lets us, and otherwise left in 'sending',
        where ``requeue_stale`` picks it up again after ``SENDING_TIMEOUT``."""
        client: aiosmtplib.SMTP | None = None
        try:
            while True:
                d = await self.queue.get()
                self.space.set()
                try:
                    client = await self._deliver(client, d)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.exception("delivery failed unexpectedly; will retry", extra={"delivery": d.id, "kind": d.kind})
                    WORKER_FAILURES.inc()
                    try:
                        await self._failed(d, f"{type(exc).__name__}: {str(exc)[:200]}", permanent=False)
                    except Exception:
                        log.warning("could not record the failure; the delivery is retried after the sending "
                                    "timeout", extra={"delivery": d.id})
                finally:
                    self.queue.task_done()
        finally:
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.quit()

    async def _connect(self) -> aiosmtplib.SMTP:
        c = self.smtp
        client = aiosmtplib.SMTP(hostname=c.host, port=c.port, use_tls=c.use_tls, start_tls=c.start_tls,
                                 timeout=self.s.smtp_timeout)
        await client.connect()
        if c.username and c.password:
            await client.login(c.username, c.password)
        return client

    async def _recipient(self, d: store.Delivery) -> tuple[str, str] | None:
        if d.email:
            return d.email, str(d.context.get("username", ""))
        if d.account_id is None:
            return None
        async with self.pool.acquire() as conn:
            return await store.find_recipient(conn, d.account_id)

    async def _deliver(self, client: aiosmtplib.SMTP | None, d: store.Delivery) -> aiosmtplib.SMTP | None:
        try:
            recipient = await self._recipient(d)
            if recipient is None:
                # Device and server notices name only the account; its address comes from auth's
                # account events, on another topic, so a notice can be here first (a TV linked
                # seconds after sign-up, or this service catching up on both topics). An unknown
                # recipient is therefore transient: retried with backoff, dead after MAX_ATTEMPTS.
                await self._failed(d, "no recipient known for this account yet", permanent=False)
                return client
            try:
                rendered = self.renderer.render(d, *recipient)
            except (SealError, jinja2.TemplateError) as exc:
                await self._give_up(d, f"cannot render: {type(exc).__name__}")
                return client
            message = self._message(d, rendered)
            await self.bucket.acquire()
            started = time.perf_counter()
            if client is None or not client.is_connected:
                client = await self._connect()
            await client.send_message(message)
            SEND_LATENCY.labels(d.kind).observe(time.perf_counter() - started)
            await store.mark_sent(self.pool, d.id)
            SENT.labels(d.kind).inc()
            DELIVERY_LATENCY.labels(d.kind).observe(max(0.0, time.time() - d.created_at.timestamp()))
            log.info("email sent", extra={"delivery": d.id, "kind": d.kind, "attempt": d.attempts})
            return client
        except aiosmtplib.SMTPResponseException as exc:
            permanent = 500 <= exc.code < 600
            await self._failed(d, f"SMTP {exc.code}: {exc.message[:200]}", permanent)
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.rset()
            return client
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            await self._failed(d, f"{type(exc).__name__}: {str(exc)[:200]}", permanent=False)
            if client is not None:
                with contextlib.suppress(Exception):
                    client.close()
            return None

    def _message(self, d: store.Delivery, r: Rendered) -> EmailMessage:
        msg = EmailMessage()
        msg["From"] = self.s.mail_from
        msg["To"] = r.to
        msg["Subject"] = r.subject
        msg["Date"] = formatdate(localtime=False)
        msg["Message-ID"] = make_msgid(idstring=f"{d.event_id}.{d.part}", domain=self.sender_domain)
        msg["X-Hearth-Kind"] = d.kind
        msg.set_content(r.text)
        msg.add_alternative(r.html, subtype="html")
        return msg

    async def _failed(self, d: store.Delivery, error: str, permanent: bool) -> None:
        FAILED.labels(d.kind, str(permanent).lower()).inc()
        budget = self.s.permanent_attempts if permanent else self.s.max_attempts
        if d.attempts >= budget:
            await self._give_up(d, error)
            return
        delay = min(self.s.retry_max, self.s.retry_base * 2 ** (d.attempts - 1)) * (0.5 + random.random() / 2)
        log.warning("email send failed; will retry", extra={"delivery": d.id, "kind": d.kind, "error": error,
                                                            "attempt": d.attempts, "retry_in": round(delay, 2)})
        await store.mark_failed(self.pool, d.id, error, delay)

    async def _give_up(self, d: store.Delivery, error: str) -> None:
        """Dead: mark the row and publish a dead letter with the reason, in one transaction."""
        DEAD.labels(d.kind).inc()
        log.error("email dead-lettered", extra={"delivery": d.id, "kind": d.kind, "error": error})
        env = _dead_letter(d, error)
        async with self.pool.acquire() as conn, conn.transaction():
            await store.mark_dead(conn, d.id, error)
            await outbox.add(conn, self.dead_letter_topic, env)


def _dead_letter(d: store.Delivery, error: str) -> Envelope:
    return Envelope(
        id=uuid.uuid4(), type="notification.dead_lettered", occurred_at=utcnow(), producer="notification",
        key=str(d.account_id or d.event_id),
        data={"delivery_id": d.id, "event_id": str(d.event_id), "part": d.part, "kind": d.kind,
              "account_id": str(d.account_id) if d.account_id else None, "attempts": d.attempts, "reason": error},
    )
