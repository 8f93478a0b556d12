"""The webhook dispatcher: one background task per node sends the due deliveries.

Deliveries are documents in the store (written with their events, gateway/eventlog.py);
nothing here is on a conversation's path. Each endpoint has a queue per conversation,
in offset order, and only its head may be sent: the next waits until the head is
delivered or given up. A node leases a head before sending it (`Store.claim_delivery`),
so in a cluster one node sends a delivery at a time; a node that dies mid-send leaves a
lease that lapses, and the delivery goes again: at least once. While a head waits for
its retry, the rest of its queue is held to the same time, so that the look for due
deliveries is not filled with ones that cannot go yet.

2xx is delivered, 410 Gone gives up at once, anything else (another status, a refused
connection, a timeout) is retried after a random wait up to `backoff * 2^(n-1)` (at most
`backoff_max`: "full jitter"), until `give_up` after the first try.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter
from typing import Any

import httpx

from gateway.config import Settings
from gateway.core.ids import now_ms
from gateway.webhooks import signing
from gateway.webhooks.endpoints import Endpoint
from gateway.webhooks.subscriptions import Subscriptions
from store.base import Store, StoreError

log = logging.getLogger("steerway.webhooks")

SCAN = 256  # due deliveries looked at per pass
LEASE_MARGIN_MS = 10_000  # beyond the request's timeout, to record how it went
ERROR_CHARS = 300


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:ERROR_CHARS]


class Dispatcher:
    def __init__(
        self,
        store: Store,
        subscriptions: Subscriptions,
        settings: Settings,
        node: str,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._store = store
        self._endpoints = subscriptions.endpoints
        self._node = node
        self._timeout = settings.webhook_timeout_s
        self._backoff = settings.webhook_backoff_s
        self._backoff_max = settings.webhook_backoff_max_s
        self._give_up_ms = int(settings.webhook_give_up_s * 1000)
        self._concurrency = settings.webhook_concurrency
        self._poll = settings.webhook_poll_s
        self._lease_ms = int(self._timeout * 1000) + LEASE_MARGIN_MS
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._wake = asyncio.Event()
        self._busy: set[tuple[str, str]] = set()  # queues with a send in flight here
        self._inflight: Counter[str] = Counter()  # sends in flight per endpoint
        self._sends: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._failing = False  # the store failed the last pass: logged once
        subscriptions.wake = self._wake.set

    def start(self) -> None:
        if self._task is None:
            self._client = httpx.AsyncClient(
                transport=self._transport,
                timeout=self._timeout,
                follow_redirects=False,
                limits=httpx.Limits(max_connections=self._concurrency * len(self._endpoints)),
            )
            self._task = asyncio.create_task(self._run(), name="webhooks")

    async def stop(self) -> None:
        """Stop sending. A send cut short stays leased until its lease lapses, then it
        goes again (from this node after a restart, or another)."""
        tasks = [t for t in (self._task, *self._sends) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._task = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self._pass()
                if self._failing:
                    log.warning("webhooks: the store answers again")
                self._failing = False
            except StoreError as exc:
                if not self._failing:
                    log.error("webhooks: the store is unavailable, deliveries wait: %s", exc)
                self._failing = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll)

    async def _pass(self) -> None:
        """Start sending the heads of the queues that are due, as far as slots allow."""
        store, now = self._store, now_ms()
        seen: set[tuple[str, str]] = set()
        for doc in await store.due_deliveries(now, SCAN):
            queue = (doc["endpoint"], doc["conversation_id"])
            if queue in seen or queue in self._busy:
                continue
            seen.add(queue)
            endpoint = self._endpoints.get(queue[0])
            if endpoint is None:
                # not configured on this node (removed, or not yet here in a rolling
                # change of the cluster's settings): its deliveries wait
                await store.hold_deliveries(*queue, -1, now + int(self._backoff_max * 1000))
                continue
            if self._inflight[endpoint.name] >= self._concurrency:
                continue
            head = await store.delivery_head(*queue)
            if head is None:
                continue
            if head["_id"] != doc["_id"]:
                until = max(head["next_at"], head["lease_until"])
                if until > now:
                    await self._hold(queue, head, until, now)
                    continue
            claimed = await store.claim_delivery(head["_id"], self._node, now, now + self._lease_ms)
            if claimed is None:
                continue  # another node leased it meanwhile
            self._busy.add(queue)
            self._inflight[endpoint.name] += 1
            task = asyncio.create_task(self._send(endpoint, claimed), name="webhook-send")
            self._sends.add(task)
            task.add_done_callback(self._sends.discard)

    async def _hold(
        self, queue: tuple[str, str], head: dict[str, Any], until: int, now: int
    ) -> None:
        """The queue's head waits (for a retry, or on another node): so does the rest.
        Looked at again after: if the head was settled meanwhile, the hold is undone."""
        store = self._store
        await store.hold_deliveries(*queue, head["offset"], until)
        again = await store.delivery_head(*queue)
        if (
            again is None
            or again["_id"] != head["_id"]
            or (max(again["next_at"], again["lease_until"]) != until)
        ):
            await store.wake_deliveries(*queue, head["offset"], now)
            self._wake.set()

    async def _send(self, endpoint: Endpoint, doc: dict[str, Any]) -> None:
        queue = (endpoint.name, doc["conversation_id"])
        try:
            status, error = await self._post(endpoint, doc)
            await self._settle(doc, status, error)
        except StoreError as exc:
            # its lease lapses and it goes again: at least once
            log.error("webhooks: %s: could not record the delivery: %s", doc["_id"], exc)
        finally:
            self._busy.discard(queue)
            self._inflight[endpoint.name] -= 1
            self._wake.set()

    async def _post(self, endpoint: Endpoint, doc: dict[str, Any]) -> tuple[int | None, str | None]:
        """The HTTP status (None when there was no answer) and what went wrong, if it did."""
        assert self._client is not None
        body = doc["body"].encode()
        headers = signing.headers(endpoint.key, doc["_id"], int(time.time()), body)
        try:
            async with asyncio.timeout(self._timeout):
                # the answer's body is never read: an endpoint cannot make us buffer it
                async with self._client.stream(
                    "POST", endpoint.url, content=body, headers=headers
                ) as response:
                    status = response.status_code
        except TimeoutError:
            return None, f"no answer within {self._timeout:g} s"
        except httpx.HTTPError as exc:
            return None, f"{type(exc).__name__}: {_short(exc)}"
        return status, None if 200 <= status < 300 else f"HTTP {status}"

    async def _settle(self, doc: dict[str, Any], status: int | None, error: str | None) -> None:
        store, now = self._store, now_ms()
        attempts = doc["attempts"] + 1
        changes: dict[str, Any] = {
            "attempts": attempts,
            "last_status": status,
            "last_error": error,
            "last_at": now,
        }
        wait = random.uniform(0, min(self._backoff_max, self._backoff * 2 ** (attempts - 1)))
        next_at = now + int(wait * 1000)
        if error is None:
            changes.update(status="delivered", delivered_at=now)
        elif status == 410 or next_at > doc["since"] + self._give_up_ms:
            changes["status"] = "failed"
            log.warning("webhooks: %s given up after %d tries: %s", doc["_id"], attempts, error)
        else:
            changes["next_at"] = next_at
        if not await store.settle_delivery(doc["_id"], self._node, changes):
            return  # the lease lapsed and another took it (or it was replayed): theirs now
        queue = (doc["endpoint"], doc["conversation_id"])
        if "status" in changes:  # the next of its queue may go
            await store.wake_deliveries(*queue, doc["offset"], now)
        else:
            await store.hold_deliveries(*queue, doc["offset"], next_at)
