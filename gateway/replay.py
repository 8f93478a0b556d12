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

Pages of many conversations are read together (`Store.read_pages`): a store
query costs about the same for one conversation as for a hundred (nx-27017
spends ~13 ms per find), and a storm reconnects the clients of a thousand
conversations at once.  One query is in flight at a time, as in the group
commit (store/commit.py): an idle store reads a page at once, and the pages
asked meanwhile wait and are then read together, the same page number of up to
`BATCH` conversations per query.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable

from gateway.wsserver import text_frame
from store.base import Store

PAGE = 500  # events per page
BATCH = 100  # conversations per store query, at most
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
        self.reads = 0  # store queries made, for tests and metrics
        # the pages asked and not yet read, or being read: one future each, however
        # many clients wait for it
        self._inflight: dict[Key, asyncio.Future[list[str]]] = {}
        # page number -> the conversations whose page waits for the next query, in the
        # order asked. Bounded: a (conversation, page) is in it at most once, and only
        # while a client asked for it (each replay asks one page at a time).
        self._asked: dict[int, list[str]] = {}
        self._querying: asyncio.Task[None] | None = None
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
        while True:
            read = self._inflight.get(key)
            fresh = read is None
            if read is None:
                read = self._ask(key)
            # shielded: a client that goes away does not cancel the others' read
            texts = await asyncio.shield(read)
            page = self._cache.get(key)
            if page is None or page.texts is not texts:  # not kept: too large
                page = Page(texts)
            if fresh or len(page.texts) >= need:
                return page
            # read before the events this client needs were stored: ask again

    def _ask(self, key: Key) -> asyncio.Future[list[str]]:
        """A page for the next query, awaited by every client that asks meanwhile."""
        read: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        self._inflight[key] = read
        self._asked.setdefault(key[1], []).append(key[0])
        if self._querying is None:
            self._querying = asyncio.create_task(self._query(), name="replay-reads")
        return read

    async def _query(self) -> None:
        """Read the pages asked, one query at a time, until none is left."""
        try:
            while self._asked:
                k, ids = next(iter(self._asked.items()))  # the page number asked first
                del self._asked[k]
                if len(ids) > BATCH:  # the rest after the other page numbers' turn
                    ids, self._asked[k] = ids[:BATCH], ids[BATCH:]
                reads = {cid: self._inflight[cid, k] for cid in ids}
                self.reads += 1
                try:
                    pages = await self.store.read_pages(ids, k * self.page, self.page)
                except Exception as exc:  # these pages fail; the next asks read again
                    for cid, read in reads.items():
                        del self._inflight[cid, k]
                        read.set_exception(exc)
                    continue
                for cid, read in reads.items():
                    del self._inflight[cid, k]  # read: the next client to ask asks anew
                    texts = pages.get(cid, [])
                    self._remember((cid, k), Page(texts))
                    read.set_result(texts)
        finally:
            self._querying = None

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
