"""Session minting for sign-in, batched under load.

Every sign-in asks devicesession for a session. Under a saturated sign-in load each such call wakes
devicesession, its PostgreSQL backend and auth's own loop for one request, beside memory-hard hashing
that keeps every cache cold, a cost that matters beside the hash itself (figures: the README's
benchmark section). Mints that arrive close together are cheaper as one call (one request, one
statement), so the batcher holds a mint while other sign-ins are still hashing, for at most
``window`` seconds, and sends what has gathered to ``POST /internal/sessions/batch``.

- A mint is sent at once when no other hash is in flight (an idle or lightly loaded service adds no
  latency) or when the batch is full; otherwise when the hashes in flight have finished or the
  window has passed, whichever is first.
- A lone mint goes to ``POST /internal/sessions``, the single-session route.
- Each item succeeds or fails alone: a refused item raises its own error for its own sign-in; a
  failed call raises for every sign-in in the batch.
- ``window`` 0 turns batching off. It may be a function, read at each mint: with
  MINT_BATCH_WINDOW_MS unset, app.py passes :func:`auto_window`, which holds for about three
  hashes' worth of this process's throughput (3 x the average hash time / the hashing threads,
  capped). A fixed window sized for two hashing threads lets a replica with one send most of its
  mints alone, since fewer hashes finish within it.

Per-process by design (issue 17): a batch holds only this replica's own sign-ins, which is all
batching needs; nothing is shared with other replicas and nothing is lost with a replica but the
sign-ins that were in flight in it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from prometheus_client import Histogram

from shared import logs
from shared.errors import HearthError, Unavailable
from shared.internal import InternalClient

MAX_BATCH = 32
MAX_WINDOW = 0.2
HASHES_PER_WINDOW = 3
BATCH_SIZE = Histogram("hearth_auth_mint_batch_size", "Sign-in sessions minted per devicesession call",
                       buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32))


def auto_window(hash_seconds: Callable[[], float], threads: int) -> Callable[[], float]:
    """The default window: HASHES_PER_WINDOW hashes' worth of this process's hashing throughput
    (40 ms until the first hash has been timed), at most MAX_WINDOW."""
    def window() -> float:
        seconds = hash_seconds()
        return min(MAX_WINDOW, HASHES_PER_WINDOW * seconds / max(1, threads)) if seconds else 0.04
    return window


class MintBatcher:
    def __init__(self, client: InternalClient, *, window: float | Callable[[], float], busy: Callable[[], int],
                 max_batch: int = MAX_BATCH) -> None:
        self.client = client
        self._window = window
        self.busy = busy
        self.max_batch = max_batch
        self._held: list[tuple[dict[str, Any], asyncio.Future[dict[str, Any]]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._sending: set[asyncio.Task[None]] = set()
        self.calls = 0  # devicesession calls made (for tests and metrics)

    @property
    def window(self) -> float:
        return self._window() if callable(self._window) else self._window

    async def mint(self, body: dict[str, Any]) -> dict[str, Any]:
        """Mint one session (the body of ``POST /internal/sessions``); returns devicesession's answer."""
        window = self.window
        if window <= 0:
            self.calls += 1
            BATCH_SIZE.observe(1)
            answer: dict[str, Any] = await self.client.call("POST", "/internal/sessions", body)
            return answer
        loop = asyncio.get_running_loop()
        future: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._held.append(({**body, "request_id": logs.request_id.get()}, future))
        if len(self._held) >= self.max_batch or self.busy() == 0:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(window, self._flush)
        return await future

    def settled(self) -> None:
        """A hash has finished: send what is held if nothing else is hashing."""
        if self._held and self.busy() == 0:
            self._flush()

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch = [(body, future) for body, future in self._held if not future.done()]  # drop abandoned sign-ins
        self._held = []
        if batch:
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[tuple[dict[str, Any], asyncio.Future[dict[str, Any]]]]) -> None:
        self.calls += 1
        BATCH_SIZE.observe(len(batch))
        # This task may have been started from another request's context (a hash finishing); the call
        # carries the first held sign-in's request id, and every item its own in the body.
        logs.request_id.set(batch[0][0].get("request_id"))
        try:
            if len(batch) == 1:
                body = {k: v for k, v in batch[0][0].items() if k != "request_id"}
                answers: Any = [await self.client.call("POST", "/internal/sessions", body)]
            else:
                reply = await self.client.call("POST", "/internal/sessions/batch",
                                               {"sessions": [body for body, _ in batch]})
                answers = reply.get("sessions") if isinstance(reply, dict) else None
                if not isinstance(answers, list) or len(answers) != len(batch):
                    raise Unavailable("devicesession answered a batch mint with the wrong number of sessions")
        except BaseException as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception) else Unavailable("mint cancelled"))
            if not isinstance(exc, Exception):
                raise
            return
        for (_, future), answer in zip(batch, answers, strict=True):
            if future.done():
                continue
            error = answer.get("error") if isinstance(answer, dict) else None
            if isinstance(error, dict):
                future.set_exception(HearthError(str(error.get("detail") or "the session request was refused"),
                                                 status=int(error.get("status") or 400),
                                                 code=str(error.get("code") or "invalid_request"),
                                                 field=error.get("field")))
            elif isinstance(answer, dict) and isinstance(answer.get("token"), str):
                future.set_result(answer)
            else:
                future.set_exception(Unavailable("devicesession answered a batch mint item without a token"))

    async def close(self) -> None:
        self._flush()
        if self._sending:
            await asyncio.wait(self._sending, timeout=10)
