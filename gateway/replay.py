"""Replay reads shared by the clients that catch up on one conversation at once.

After a deploy every client reconnects with `after` within a second or two.  Were
each to read its own `(after, head]` from the store, a conversation with 10
clients would cost 10 store queries for the same events.  Instead the store is
read in pages aligned on `page` offsets (page k holds offsets `k*page + 1 ..
(k+1)*page`): one read per page, however many clients want it at once, and every
client gets the same `Page`, of which it sends its own slice.  A page also builds
its events' WebSocket frames once, for every client that can take them whole.

Stored events never change (an offset, once written, keeps its payload), so a
page read earlier is still right; it may only be short, read while the
conversation had fewer events: a client that needs more than a page holds reads
the page again (and the fresh page replaces it).  Pages are kept for the clients
to come for `ttl_s` after their last use, at most `cache_bytes` of them (least
recently used first out).  A client's replay still ends exactly at its own
`head`, so the replay/live boundary is what `ConversationHub.follow` said.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable

from gateway.wsserver import text_frame
from store.base import Store

PAGE = 500  # events per store read
CACHE_BYTES = 32 * 1024 * 1024  # pages kept for clients to come, at most (text and frames)
TTL_S = 5.0  # a page unused for this long is dropped

Key = tuple[str, int]  # conversation id, page number


class Page:
    """The payloads of one store read, and (built on first use) their frames."""

    __slots__ = ("_frames", "size", "texts", "used")

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts
        self.size = 2 * sum(map(len, texts))  # the texts, and their frames once built
        self.used = 0.0
        self._frames: list[bytes] | None = None

    def framed(self, start: int, end: int) -> bytes:
        """The unmasked, uncompressed WebSocket frames of `texts[start:end]`, joined."""
        if self._frames is None:
            self._frames = [text_frame(text.encode()) for text in self.texts]
        return b"".join(self._frames[start:end])


class ReplayReader:
    """Per node: reads `(after, head]` of a conversation for many clients at once."""

    def __init__(
        self,
        store: Store,
        page: int = PAGE,
        cache_bytes: int = CACHE_BYTES,
        ttl_s: float = TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.page = page
        self.cache_bytes = cache_bytes
        self.ttl_s = ttl_s
        self.clock = clock
        self.reads = 0  # store reads made, for tests and metrics
        self._inflight: dict[Key, asyncio.Task[list[str]]] = {}
        self._cache: OrderedDict[Key, Page] = OrderedDict()  # least recently used first
        self._cached_bytes = 0
        self._purging: asyncio.TimerHandle | None = None

    async def pages(
        self, conversation_id: str, after: int, head: int
    ) -> AsyncIterator[tuple[Page, int, int]]:
        """Offsets `after + 1 .. head`, ascending, as slices `(page, start, end)` of
        `page.texts`; it stops early only if the store has fewer events than `head`."""
        offset = after
        while offset < head:
            k = offset // self.page
            first = k * self.page
            need = min(head, first + self.page) - first  # events of this page wanted
            page = await self._page(conversation_id, k, need)
            end = min(need, len(page.texts))
            if end <= offset - first:
                return
            yield page, offset - first, end
            offset = first + end

    async def _page(self, conversation_id: str, k: int, need: int) -> Page:
        """Page k holding at least `need` events (or all the store has)."""
        key = (conversation_id, k)
        page = self._cache.get(key)
        if page is not None and len(page.texts) >= need:
            self._cache.move_to_end(key)
            page.used = self.clock()
            return page
        short: asyncio.Task[list[str]] | None = None
        while True:
            read = self._inflight.get(key)
            fresh = read is None or read is short
            if fresh:
                read = self._start(key)
            assert read is not None
            # shielded: a client that goes away does not cancel the others' read
            await asyncio.shield(read)
            page = self._cache.get(key)
            if page is None or page.texts is not read.result():  # not kept: too large
                page = Page(read.result())
            if fresh or len(page.texts) >= need:
                return page
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
                self._remember(key, Page(task.result()))

        read.add_done_callback(done)
        return read

    def _remember(self, key: Key, page: Page) -> None:
        old = self._cache.pop(key, None)
        if old is not None:
            self._cached_bytes -= old.size
        if page.size > self.cache_bytes:
            return
        page.used = self.clock()
        self._cache[key] = page
        self._cached_bytes += page.size
        while self._cached_bytes > self.cache_bytes:
            _, dropped = self._cache.popitem(last=False)
            self._cached_bytes -= dropped.size
        if self._purging is None:
            loop = asyncio.get_running_loop()
            self._purging = loop.call_later(self.ttl_s, self.purge)

    def purge(self) -> None:
        """Drop the pages unused for `ttl_s`; look again later while any is left."""
        self._purging = None
        deadline = self.clock() - self.ttl_s
        while self._cache:
            key, page = next(iter(self._cache.items()))
            if page.used > deadline:
                break
            del self._cache[key]
            self._cached_bytes -= page.size
        if self._cache:
            self._purging = asyncio.get_running_loop().call_later(self.ttl_s, self.purge)
