"""Group commit: one writer task turns many small appends into few store writes.

Appends from every conversation wait in one bounded queue; the writer takes all
that is waiting (up to `max_events` events) as one batch, so a batch forms while
the previous write is in flight and an idle store writes at once (well inside
the 10 ms of PROTOCOL.md section 2).  A failed write is retried, with backoff,
as the same batch: writes are idempotent, and nothing queued behind it overtakes
it, so offsets are never reordered.  `healthy` is False from a failed write to
the next successful one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from store.base import Store, WriteBatch

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
        self._queue: asyncio.Queue[tuple[WriteBatch, asyncio.Future[None]]] = asyncio.Queue(
            max_pending
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

    async def submit(self, batch: WriteBatch) -> asyncio.Future[None]:
        """Queue `batch` (waiting while the queue is full); the future is done once it is
        durably stored. Batches are stored, and their futures done, in queue order."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await self._queue.put((batch, done))
        return done

    async def _run(self) -> None:
        while True:
            items = [await self._queue.get()]
            batch = WriteBatch()
            batch.extend(items[0][0])
            while not self._queue.empty() and len(batch.events) < self._max_events:
                item = self._queue.get_nowait()
                items.append(item)
                batch.extend(item[0])
            await self._write(batch)
            for _, done in items:
                if not done.done():
                    done.set_result(None)
                self._queue.task_done()

    async def _write(self, batch: WriteBatch) -> None:
        delay, ceiling = self._backoff
        while True:
            try:
                await self._store.write(batch)
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
            return
