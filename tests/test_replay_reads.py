"""Replay reads shared by clients catching up at once (issue 13, item 3): after a deploy
every client reconnects with `after`; a conversation's events are read from the store
once per page, not once per client, and every client still gets `(after, head]` exactly."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence

import pytest

from gateway.replay import Page, ReplayReader
from gateway.wsserver import text_frame
from store.memory import MemoryStore
from tests.conftest import run_gateway
from tests.helpers import END, Fed, ack_of, delta, expect, run_completed


class Pages:
    """A store whose conversation "c" has `n` events and the others those in `logs`;
    its queries wait for `gate` (when given) and are counted."""

    def __init__(self, n: int, gate: asyncio.Event | None = None) -> None:
        self.logs = {"c": offsets(1, n)}
        self.gate = gate
        self.reads: list[tuple[int, int]] = []  # (after, limit) of each query
        self.queried: list[list[str]] = []  # the conversations of each query
        self.fail: Exception | None = None
        self.failing: str | None = None  # a query of this conversation fails
        self.started = asyncio.Event()  # a query was made
        self.querying = 0
        self.most = 0  # queries in flight at once, at most

    async def read_pages(
        self, conversation_ids: Sequence[str], after: int, limit: int
    ) -> dict[str, list[str]]:
        self.reads.append((after, limit))
        self.queried.append(list(conversation_ids))
        self.started.set()
        self.querying += 1
        self.most = max(self.most, self.querying)
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.fail is not None:
                raise self.fail
            if self.failing in conversation_ids:
                raise OSError(f"store down for {self.failing}")
            return {cid: self.logs.get(cid, [])[after : after + limit] for cid in conversation_ids}
        finally:
            self.querying -= 1


async def collect(reader: ReplayReader, after: int, head: int, cid: str = "c") -> list[str]:
    return [
        text
        async for page, start, end in reader.pages(cid, after, head)
        for text in page.texts[start:end]
    ]


def offsets(n: int, m: int) -> list[str]:
    return [f'{{"offset":{i}}}' for i in range(n, m + 1)]


def texts(cid: str, n: int) -> list[str]:
    """The `n` events of another conversation than "c"."""
    return [f'{{"c":"{cid}","offset":{i}}}' for i in range(1, n + 1)]


async def test_clients_catching_up_at_once_share_one_read_per_page() -> None:
    gate = asyncio.Event()
    store = Pages(120, gate)
    reader = ReplayReader(store, page=50)  # type: ignore[arg-type]
    ranges = [(0, 120), (10, 60), (49, 50), (50, 51), (70, 100), (99, 120), (0, 30)] * 5
    replays = [asyncio.create_task(collect(reader, a, h)) for a, h in ranges]
    await asyncio.sleep(0)  # every replay asks for its first page
    gate.set()
    results = await asyncio.wait_for(asyncio.gather(*replays), 5)
    for (after, head), got in zip(ranges, results, strict=True):
        assert got == offsets(after + 1, head)
    assert sorted(store.reads) == [(0, 50), (50, 50), (100, 50)]  # 3 reads for 35 clients
    assert reader.reads == 3


async def test_a_page_read_before_the_newest_events_is_read_again_when_too_short() -> None:
    store = Pages(30)
    reader = ReplayReader(store, page=50)  # type: ignore[arg-type]
    assert await collect(reader, 0, 30) == offsets(1, 30)
    store.logs["c"] += offsets(31, 45)  # events stored after the page was read
    assert await collect(reader, 20, 30) == offsets(21, 30)  # the cached page has these
    assert len(store.reads) == 1
    assert await collect(reader, 20, 45) == offsets(21, 45)  # it does not have these
    assert len(store.reads) == 2
    assert await collect(reader, 40, 45) == offsets(41, 45)  # the fresh page replaced it
    assert len(store.reads) == 2


async def test_a_replay_stops_where_the_store_ends() -> None:
    reader = ReplayReader(Pages(10), page=50)  # type: ignore[arg-type]
    assert await collect(reader, 5, 80) == offsets(6, 10)


async def test_the_cache_is_bounded_in_bytes() -> None:
    store = Pages(100)
    bound = 2 * sum(map(len, store.logs["c"][70:100]))  # the last three pages, text and frames
    reader = ReplayReader(store, page=10, cache_bytes=bound)  # type: ignore[arg-type]
    assert await collect(reader, 0, 100) == offsets(1, 100)
    assert len(reader._cache) == 3
    assert reader._cached_bytes == bound
    assert await collect(reader, 70, 100) == offsets(71, 100)  # the last pages: cached
    assert len(store.reads) == 10
    assert await collect(reader, 0, 10) == offsets(1, 10)  # evicted: read again
    assert len(store.reads) == 11


async def test_clients_at_once_share_one_page_and_its_frames() -> None:
    gate = asyncio.Event()
    reader = ReplayReader(Pages(30, gate), page=50)  # type: ignore[arg-type]

    async def slices(after: int) -> list[tuple[Page, int, int]]:
        return [s async for s in reader.pages("c", after, 30)]

    replays = [asyncio.create_task(slices(a)) for a in (0, 10, 29)]
    await asyncio.sleep(0)
    gate.set()
    (whole,), (tail,), (last,) = await asyncio.gather(*replays)
    assert whole[0] is tail[0] is last[0]  # one Page object for every client
    assert (whole[1:], tail[1:], last[1:]) == ((0, 30), (10, 30), (29, 30))
    page = whole[0]
    assert page.framed(29, 30) == text_frame(b'{"offset":30}')
    assert page.framed(0, 30) == b"".join(text_frame(t.encode()) for t in offsets(1, 30))


async def test_pages_unused_for_the_ttl_are_dropped() -> None:
    now = [100.0]
    store = Pages(30)
    reader = ReplayReader(store, page=10, ttl_s=5, clock=lambda: now[0])  # type: ignore[arg-type]
    assert await collect(reader, 0, 30) == offsets(1, 30)
    now[0] += 4
    assert await collect(reader, 25, 30) == offsets(26, 30)  # page 2 used again
    now[0] += 2
    reader.purge()
    assert list(reader._cache) == [("c", 2)]  # pages 0 and 1: unused for 6 s
    assert reader._cached_bytes == reader._cache["c", 2].size
    now[0] += 6
    reader.purge()
    assert not reader._cache
    assert reader._cached_bytes == 0
    assert reader._purging is None  # nothing left to look at


async def test_a_client_that_goes_away_does_not_cancel_the_others_read() -> None:
    gate = asyncio.Event()
    store = Pages(20, gate)
    reader = ReplayReader(store, page=50)  # type: ignore[arg-type]
    first = asyncio.create_task(collect(reader, 0, 20))
    second = asyncio.create_task(collect(reader, 5, 20))
    await asyncio.sleep(0)
    first.cancel()
    gate.set()
    assert await asyncio.wait_for(second, 5) == offsets(6, 20)
    assert len(store.reads) == 1
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_a_failed_read_fails_every_waiting_client_and_is_not_kept() -> None:
    gate = asyncio.Event()
    store = Pages(20, gate)
    store.fail = OSError("store down")
    reader = ReplayReader(store, page=50)  # type: ignore[arg-type]
    replays = [asyncio.create_task(collect(reader, a, 20)) for a in (0, 3, 7)]
    await asyncio.sleep(0)
    gate.set()
    for outcome in await asyncio.gather(*replays, return_exceptions=True):
        assert isinstance(outcome, OSError)
    store.fail = None
    assert await collect(reader, 0, 20) == offsets(1, 20)
    assert len(store.reads) == 2


async def test_many_conversations_catching_up_at_once_cost_a_query_per_hundred() -> None:
    """The clients of 250 conversations catch up at once (a deploy): their pages are read
    100 conversations to a store query, not one query each, and every client still gets
    exactly `(after, head]`."""
    store = Pages(0)
    heads = {f"c{i}": 10 + i * 37 % 80 for i in range(250)}  # 10 to 89 events: 1 or 2 pages
    for cid, head in heads.items():
        store.logs[cid] = texts(cid, head)
    reader = ReplayReader(store, page=50)  # type: ignore[arg-type]
    asks = [(cid, after, head) for cid, head in heads.items() for after in (0, head // 2, head - 1)]
    replays = [asyncio.create_task(collect(reader, a, h, cid)) for cid, a, h in asks]
    results = await asyncio.wait_for(asyncio.gather(*replays), 5)
    for (cid, after, head), got in zip(asks, results, strict=True):
        assert got == store.logs[cid][after:head]
    longer = [cid for cid, head in heads.items() if head > 50]
    assert 0 < len(longer) < 250
    assert len(store.queried) == math.ceil(250 / 100) + math.ceil(len(longer) / 100)
    assert reader.reads == len(store.queried)
    assert max(map(len, store.queried)) == 100
    read = sorted(
        (after, cid)
        for (after, _), ids in zip(store.reads, store.queried, strict=True)
        for cid in ids
    )
    assert read == sorted([(0, cid) for cid in heads] + [(50, cid) for cid in longer])  # once each
    assert store.most == 1  # one query at a time


async def test_pages_asked_while_a_query_is_in_flight_are_read_together_next() -> None:
    gate = asyncio.Event()
    store = Pages(20, gate)
    others = [f"c{i}" for i in range(250)]
    for cid in others:
        store.logs[cid] = texts(cid, 20)
    reader = ReplayReader(store, page=50)  # type: ignore[arg-type]
    first = asyncio.create_task(collect(reader, 0, 20))  # an idle store: read at once
    await asyncio.wait_for(store.started.wait(), 5)
    replays = [asyncio.create_task(collect(reader, 5, 20))]  # "c": the query in flight has it
    replays += [asyncio.create_task(collect(reader, 3, 20, cid)) for cid in others]
    gate.set()
    assert await asyncio.wait_for(first, 5) == offsets(1, 20)
    results = await asyncio.wait_for(asyncio.gather(*replays), 5)
    assert results == [offsets(6, 20)] + [texts(cid, 20)[3:] for cid in others]
    assert store.queried == [["c"], others[:100], others[100:200], others[200:]]
    assert reader.reads == 4
    assert store.most == 1


async def test_a_failed_query_fails_only_its_pages_and_they_are_read_again() -> None:
    store = Pages(0)
    cids = [f"c{i}" for i in range(150)]
    for cid in cids:
        store.logs[cid] = texts(cid, 20)
    store.failing = "c120"  # in the second query, of c100 to c149
    reader = ReplayReader(store, page=50)  # type: ignore[arg-type]
    asks = [(cid, after) for cid in cids for after in (0, 7)]
    replays = [asyncio.create_task(collect(reader, a, 20, cid)) for cid, a in asks]
    outcomes = await asyncio.wait_for(asyncio.gather(*replays, return_exceptions=True), 5)
    for (cid, after), outcome in zip(asks, outcomes, strict=True):
        if cid in cids[:100]:
            assert outcome == texts(cid, 20)[after:]
        else:
            assert isinstance(outcome, OSError)
    assert store.queried == [cids[:100], cids[100:]]
    assert not reader._inflight  # nothing left behind
    assert not reader._asked
    store.failing = None
    again = [collect(reader, 0, 20, cid) for cid in cids[90:]]
    assert await asyncio.wait_for(asyncio.gather(*again), 5) == [texts(c, 20) for c in cids[90:]]
    assert store.queried[2:] == [cids[100:]]  # the failed pages only: the others were kept


async def test_a_client_that_goes_away_does_not_cancel_a_query_of_many_conversations() -> None:
    gate = asyncio.Event()
    store = Pages(20, gate)
    store.logs["b"] = texts("b", 20)
    reader = ReplayReader(store, page=50)  # type: ignore[arg-type]
    leaving = asyncio.create_task(collect(reader, 0, 20))  # its ask starts the query
    staying = asyncio.create_task(collect(reader, 4, 20))
    other = asyncio.create_task(collect(reader, 0, 20, "b"))
    await asyncio.wait_for(store.started.wait(), 5)
    leaving.cancel()
    gate.set()
    assert await asyncio.wait_for(staying, 5) == offsets(5, 20)
    assert await asyncio.wait_for(other, 5) == texts("b", 20)
    assert store.queried == [["c", "b"]]
    with pytest.raises(asyncio.CancelledError):
        await leaving


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    async def read_pages(
        self, conversation_ids: Sequence[str], after: int, limit: int
    ) -> dict[str, list[str]]:
        self.reads += 1
        return await super().read_pages(conversation_ids, after, limit)


async def test_a_reconnect_storm_reads_each_page_once_and_every_client_gets_every_offset_once() -> (
    None
):
    runner = Fed()
    store = CountingStore()
    cid = "storm"
    async with run_gateway(runners=[runner], store=store) as gw:
        async with gw.connect(cid) as first:
            await first.message("fill", "fill", runner="fed")
            run_id = (await ack_of(first, "fill"))["run_id"]
            runner.put(*(delta(f"<{i}>") for i in range(1100)), run_completed(), END)
            head = (await expect(first, "run.ended", run_id=run_id, within=20))["offset"]
        assert head > 1100  # three pages of 500
        afters = [0, 1, head - 50, head - 50, 499, 500, 501, head - 1, head] * 4
        before = store.reads
        replayed = [asyncio.Event() for _ in afters]

        async def reconnect(after: int, done: asyncio.Event) -> list[int]:
            async with gw.connect(cid, after=after) as client:
                while len(client.events()) < head - after:
                    await client.recv()
                done.set()
                await client.until_type("run.ended")  # the next run, live
                return [f["offset"] for f in client.events()]

        async with asyncio.timeout(20):
            storm = [
                asyncio.create_task(reconnect(a, e)) for a, e in zip(afters, replayed, strict=True)
            ]
            await asyncio.gather(*(e.wait() for e in replayed))
            reads = store.reads - before
            assert reads <= 3, f"{reads} store reads for {len(afters)} clients"
            async with gw.client() as http:  # the gateway counts them (/metrics)
                scraped = (await http.get("/metrics")).text
            assert f"steerway_replay_store_reads {float(reads)}" in scraped.splitlines()
            async with gw.connect(cid) as control:
                runner.put(delta("live"), run_completed(), END)
                await control.message("after", "after", runner="fed")
                end = (await control.until_type("run.ended"))["offset"]
            for after, seen in zip(afters, await asyncio.gather(*storm), strict=True):
                assert seen == list(range(after + 1, end + 1))  # replay then live, once each
