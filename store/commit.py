"""Group commit: one writer task turns many small appends into few store writes.

Appends from every conversation wait in one bounded queue; the writer takes all
that is waiting (up to `max_events` events) as one batch, so a batch forms while
the previous write is in flight and an idle store writes at once (well inside
the 10 ms of PROTOCOL.md section 2).  A failed write is retried, with backoff,
as the same batch: writes are idempotent, and nothing queued behind it overtakes
it, so offsets are never reordered.  `healthy` is False from a failed write to
the next successful one.

A conflict (`StoreConflict`: another writer owns the conversation, or an offset is
stored with another event) is never retried: the batches of that conversation
fail, with every later batch of the same writer, and the rest is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from typing import Any

from store.base import Store, StoreConflict, WriteBatch

log = logging.getLogger("steerway.store")


class GroupCommitter:
    def __init__(
        self,
        store: Store,
        *,
        max_events: int = 256,
        max_pending: int = 4096,
        backoff: tuple[float, float] = (0.01, 1.0),
    ) -> None:
        self._store = store
        self._max_events = max_events
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(max_pending)
        # writers (any object: an event log) whose batch conflicted: the rest of theirs fails
        self._conflicted: weakref.WeakKeyDictionary[Any, StoreConflict] = (
            weakref.WeakKeyDictionary()
        )
        self._backoff = backoff
        self._task: asyncio.Task[None] | None = None
        self.healthy = True
        self.batches = 0  # writes that succeeded, for metrics and tests

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="group-commit")

    async def stop(self) -> None:
        """Flush what is queued, then stop."""
        if self._task is None:
            return
        await self._queue.join()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    async def write(self, batch: WriteBatch) -> None:
        """Return once `batch` is durably stored."""
        await asyncio.shield(await self.submit(batch))

    async def submit(self, batch: WriteBatch, writer: Any = None) -> asyncio.Future[None]:
        """Queue `batch` (waiting while the queue is full); the future is done once it is
        durably stored, or fails with StoreConflict. Batches are stored, and their futures
        done, in queue order. `writer` (weakly held) names whose batches follow a conflict
        down."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Item(batch, done, writer))
        return done

    async def _run(self) -> None:
        while True:
            items = [await self._queue.get()]
            while not self._queue.empty() and sum(len(i.batch.events) for i in items) < (
                self._max_events
            ):
                items.append(self._queue.get_nowait())
            try:
                await self._write(items)
            finally:
                for _ in items:
                    self._queue.task_done()

    async def _write(self, items: list[_Item]) -> None:
        delay, ceiling = self._backoff
        while True:
            items = [item for item in items if not self._refused(item)]
            if not items:
                return
            batch = WriteBatch()
            for item in items:
                batch.extend(item.batch)
            try:
                await self._store.write(batch)
            except StoreConflict as exc:
                log.error("store write refused: %s", exc)
                for item in items:
                    if exc.conversation_id in item.batch.conversation_ids():
                        self._fail(item, exc)
                continue  # the rest at once: a conflict says nothing of the store's health
            except Exception as exc:
                if self.healthy:
                    log.error("store write failed, retrying: %s", exc)
                self.healthy = False
                await asyncio.sleep(delay)
                delay = min(delay * 2, ceiling)
                continue
            if not self.healthy:
                log.warning("store write succeeded again")
            self.healthy = True
            self.batches += 1
            for item in items:
                if not item.done.done():
                    item.done.set_result(None)
            return

    def _refused(self, item: _Item) -> bool:
        """Fail an item at once if its writer's earlier batch conflicted."""
        conflict = self._conflicted.get(item.writer) if item.writer is not None else None
        if conflict is None:
            return False
        if not item.done.done():
            item.done.set_exception(conflict)
        return True

    def _fail(self, item: _Item, exc: StoreConflict) -> None:
        if item.writer is not None:
            self._conflicted[item.writer] = exc
        if not item.done.done():
            item.done.set_exception(exc)


class _Item:
    __slots__ = ("batch", "done", "writer")

    def __init__(self, batch: WriteBatch, done: asyncio.Future[None], writer: Any) -> None:
        self.batch = batch
        self.done = done
        self.writer = writer
