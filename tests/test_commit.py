"""Group commit (issue 4, item 2): batches form while a write is in flight, at most 256
events each; a failed write is retried as the same batch, in order, and `healthy`
tells the gateway in the meantime."""

from __future__ import annotations

import asyncio

import pytest

from store.base import EventRecord, StoreConflict, StoreError, WriteBatch
from store.commit import GroupCommitter
from store.memory import MemoryStore
from tests.helpers import TIMEOUT


class GatedStore(MemoryStore):
    """Each write waits for `gate`, records its events' offsets, and fails while
    `failures` is above zero."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()
        self.writes: list[list[int]] = []
        self.failures = 0
        self.failed = asyncio.Event()

    async def write(self, batch: WriteBatch) -> None:
        self.entered.set()
        await self.gate.wait()
        self.writes.append([ev.offset for ev in batch.events])
        if self.failures:
            self.failures -= 1
            self.failed.set()
            raise StoreError("down")
        await super().write(batch)


class Writer:
    """A writer key (weakly held by the committer), as an event log is."""


def batch(offset: int) -> WriteBatch:
    ev = EventRecord("c", offset, "message.delta", offset, f'{{"offset":{offset}}}', "r")
    return WriteBatch(events=[ev])


async def test_appends_wait_for_their_batch_and_batches_hold_at_most_256_events() -> None:
    store = GatedStore()
    committer = GroupCommitter(store)
    committer.start()
    try:
        first = asyncio.create_task(committer.write(batch(1)))
        await asyncio.wait_for(store.entered.wait(), TIMEOUT)  # written alone, at once
        rest = [asyncio.create_task(committer.write(batch(n))) for n in range(2, 302)]
        await asyncio.sleep(0)  # let them all queue behind the write in flight
        assert not first.done()
        assert not any(t.done() for t in rest)
        store.gate.set()
        await asyncio.wait_for(asyncio.gather(first, *rest), TIMEOUT)
        assert [len(w) for w in store.writes] == [1, 256, 44]
        assert [o for w in store.writes for o in w] == list(range(1, 302))
        assert await store.last_offset("c") == 301
        assert committer.batches == 3
    finally:
        await committer.stop()


async def test_a_failed_write_is_retried_as_the_same_batch_in_order() -> None:
    store = GatedStore()
    store.failures = 2
    committer = GroupCommitter(store, backoff=(0.001, 0.002))
    committer.start()
    try:
        first = asyncio.create_task(committer.write(batch(1)))
        await asyncio.wait_for(store.entered.wait(), TIMEOUT)
        later = asyncio.create_task(committer.write(batch(2)))
        store.gate.set()
        await asyncio.wait_for(asyncio.gather(first, later), TIMEOUT)
        # the same batch three times (two failures), then what queued behind it
        assert store.writes == [[1], [1], [1], [2]]
        assert committer.healthy
        assert await store.read_events("c", 0, 10) == ['{"offset":1}', '{"offset":2}']
    finally:
        await committer.stop()


async def test_healthy_is_false_from_a_failed_write_to_the_next_success() -> None:
    store = GatedStore()
    store.failures = 1_000_000
    committer = GroupCommitter(store, backoff=(0.001, 0.002))
    committer.start()
    try:
        pending = asyncio.create_task(committer.write(batch(1)))
        await asyncio.wait_for(store.entered.wait(), TIMEOUT)
        store.gate.set()
        await asyncio.wait_for(store.failed.wait(), TIMEOUT)
        assert not committer.healthy
        assert not pending.done()  # acknowledged only once written
        store.failures = 0
        await asyncio.wait_for(pending, TIMEOUT)
        assert committer.healthy
        assert await store.last_offset("c") == 1
    finally:
        await committer.stop()


async def test_a_conflict_fails_that_writers_batches_and_the_rest_is_written() -> None:
    """Issue 12, item 2: a conflicting batch is not retried forever; it fails, so do the
    later batches of the same writer, and other conversations' batches are stored."""
    store = GatedStore()
    taken = EventRecord("c", 1, "x", 1, '{"other":1}', "r")
    await MemoryStore.write(store, WriteBatch(events=[taken]))
    committer = GroupCommitter(store, backoff=(0.001, 0.002))
    committer.start()
    stale, fresh = Writer(), Writer()
    try:
        first = await committer.submit(batch(1), writer=stale)  # offset 1 holds another event
        await asyncio.wait_for(store.entered.wait(), TIMEOUT)
        later = await committer.submit(batch(2), writer=stale)
        other_ev = EventRecord("d", 1, "x", 1, '{"d":1}', "r")
        other = await committer.submit(WriteBatch(events=[other_ev]), writer=fresh)
        store.gate.set()
        await asyncio.wait_for(asyncio.wait([first, later, other]), TIMEOUT)
        assert isinstance(first.exception(), StoreConflict)
        assert isinstance(later.exception(), StoreConflict)
        assert other.result() is None
        assert committer.healthy
        assert await store.read_events("c", 0, 10) == ['{"other":1}']
        assert await store.read_events("d", 0, 10) == ['{"d":1}']
        # a batch of the refused writer submitted afterwards fails at once, unwritten
        writes = len(store.writes)
        again = await committer.submit(batch(3), writer=stale)
        with pytest.raises(StoreConflict):
            await asyncio.wait_for(again, TIMEOUT)
        assert len(store.writes) == writes
    finally:
        await committer.stop()
