"""Replay reads shared by the clients that catch up on one conversation at once.

After a deploy every client reconnects with `after` within a second or two.  Were
each to read its own `(after, head]` from the store, a conversation with 10
clients would cost 10 store queries for the same events.  Instead the store is
read in pages aligned on `page` offsets (page k holds offsets `k*page + 1 ..
(k+1)*page`): one read per page, however many clients want it at once, and every
client gets the same list of payloads, sliced to its own range.

Stored events never change (an offset, once written, keeps its payload), so a
page read earlier is still right; it may only be short, read while the
conversation had fewer events: a client that needs more than a page holds reads
the page again (and the fresh page replaces it).  Recently read pages are kept
for the next clients in a small LRU bounded in bytes, so clients arriving a few
milliseconds apart also share; a client's replay still ends exactly at its own
`head`, so the replay/live boundary is what `ConversationHub.follow` said.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterator

from store.base import Store

PAGE = 500  # events per store read
CACHE_BYTES = 8 * 1024 * 1024  # payload text kept for clients to come, at most

Key = tuple[str, int]  # conversation id, page number


class ReplayReader:
    """Per node: reads `(after, head]` of a conversation for many clients at once."""

    def __init__(self, store: Store, page: int = PAGE, cache_bytes: int = CACHE_BYTES) -> None:
        self.store = store
        self.page = page
        self.cache_bytes = cache_bytes
        self.reads = 0  # store reads made, for tests and metrics
        self._inflight: dict[Key, asyncio.Task[list[str]]] = {}
        self._cache: OrderedDict[Key, tuple[list[str], int]] = OrderedDict()
        self._cached_bytes = 0

    async def pages(self, conversation_id: str, after: int, head: int) -> AsyncIterator[list[str]]:
        """The payloads of offsets `after + 1 .. head`, ascending, in slices of at most
        a page; it stops early only if the store has fewer events than `head`."""
        offset = after
        while offset < head:
            k = offset // self.page
            start = k * self.page
            need = min(head, start + self.page) - start  # events of this page wanted
            payloads = await self._page(conversation_id, k, need)
            part = payloads[offset - start : need]
            if not part:
                return
            yield part
            offset += len(part)

    async def _page(self, conversation_id: str, k: int, need: int) -> list[str]:
        """Page k holding at least `need` events (or all the store has)."""
        key = (conversation_id, k)
        cached = self._cache.get(key)
        if cached is not None and len(cached[0]) >= need:
            self._cache.move_to_end(key)
            return cached[0]
        short: asyncio.Task[list[str]] | None = None
        while True:
            read = self._inflight.get(key)
            fresh = read is None or read is short
            if fresh:
                read = self._start(key)
            assert read is not None
            # shielded: a client that goes away does not cancel the others' read
            payloads = await asyncio.shield(read)
            if fresh or len(payloads) >= need:
                return payloads
            short = read  # read before the events this client needs were stored

    def _start(self, key: Key) -> asyncio.Task[list[str]]:
        """One store read of a page, awaited by every client that asks meanwhile."""
        self.reads += 1
        read = asyncio.create_task(self.store.read_events(key[0], key[1] * self.page, self.page))
        self._inflight[key] = read

        def done(task: asyncio.Task[list[str]]) -> None:
            if self._inflight.get(key) is task:
                del self._inflight[key]
            if not task.cancelled() and task.exception() is None:
                self._remember(key, task.result())

        read.add_done_callback(done)
        return read

    def _remember(self, key: Key, payloads: list[str]) -> None:
        size = sum(map(len, payloads))
        old = self._cache.pop(key, None)
        if old is not None:
            self._cached_bytes -= old[1]
        if size > self.cache_bytes:
            return
        self._cache[key] = (payloads, size)
        self._cached_bytes += size
        while self._cached_bytes > self.cache_bytes:
            _, (_, dropped) = self._cache.popitem(last=False)
            self._cached_bytes -= dropped
