"""Replay reads shared by clients catching up at once (issue 13, item 3): after a deploy
every client reconnects with `after`; a conversation's events are read from the store
once per page, not once per client, and every client still gets `(after, head]` exactly."""

from __future__ import annotations

import asyncio

import pytest

from gateway.replay import Page, ReplayReader
from gateway.wsserver import text_frame
from store.memory import MemoryStore
from tests.conftest import run_gateway
from tests.helpers import END, Fed, ack_of, delta, expect, run_completed


class Pages:
    """A store of `n` events whose reads wait for `gate` (when given) and are counted."""

    def __init__(self, n: int, gate: asyncio.Event | None = None) -> None:
        self.events = [f'{{"offset":{i}}}' for i in range(1, n + 1)]
        self.gate = gate
        self.reads: list[tuple[int, int]] = []
        self.fail: Exception | None = None

    async def read_events(self, conversation_id: str, after: int, limit: int) -> list[str]:
        self.reads.append((after, limit))
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return self.events[after : after + limit]


async def collect(reader: ReplayReader, after: int, head: int) -> list[str]:
    return [
        text
        async for page, start, end in reader.pages("c", after, head)
        for text in page.texts[start:end]
    ]


def offsets(n: int, m: int) -> list[str]:
    return [f'{{"offset":{i}}}' for i in range(n, m + 1)]


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
    store.events += offsets(31, 45)  # events stored after the page was read
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
    bound = 2 * sum(map(len, store.events[70:100]))  # the last three pages, text and frames
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


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    async def read_events(self, conversation_id: str, after: int, limit: int) -> list[str]:
        self.reads += 1
        return await super().read_events(conversation_id, after, limit)


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
