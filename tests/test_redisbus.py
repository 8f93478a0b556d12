"""The Redis bus and leases against a real redis-server (issue 12, items 1, 2 and 6), in
one event loop with the memory store: every offset once and in order on every node,
gaps filled from the store before anything after them, duplicates dropped, the end of
a stream found by the owner's head ticks; leases taken, kept, lost with their node."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from gateway.cluster.leases import Leases
from gateway.cluster.redisbus import RedisBus, conversation_channel
from gateway.outbox import Frame
from gateway.protocol.frames import MessageDelta, encode
from store.base import EventRecord, WriteBatch
from store.embedded import free_port
from store.memory import MemoryStore
from tests.cluster import RedisServer
from tests.helpers import TIMEOUT


class Recorder:
    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self.changed = asyncio.Event()

    def deliver(self, frames: list[Frame]) -> None:
        self.frames.extend(frames)
        self.changed.set()

    @property
    def offsets(self) -> list[int]:
        return [f.offset for f in self.frames]

    async def until(self, offset: int) -> None:
        async with asyncio.timeout(TIMEOUT):
            while not self.frames or self.frames[-1].offset < offset:
                self.changed.clear()
                await self.changed.wait()


@pytest.fixture
async def redis() -> AsyncIterator[RedisServer]:
    server = RedisServer(free_port())
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def delta(offset: int) -> Frame:
    event = MessageDelta(
        conversation_id="c", run_id="r", message_id="m", delta=f"d{offset}", offset=offset, ts=1
    )
    return Frame.of(encode(event), offset, event)


async def store_events(store: MemoryStore, frames: list[Frame]) -> None:
    records = [EventRecord("c", f.offset, "message.delta", 1, f.text, "r") for f in frames]
    await store.write(WriteBatch(events=records))


@contextlib.asynccontextmanager
async def connections(redis: RedisServer, count: int) -> AsyncIterator[list[Redis]]:
    clients = [Redis(port=redis.port) for _ in range(count)]
    try:
        yield clients
    finally:
        for client in clients:
            await client.aclose()


@pytest.fixture
async def buses(redis: RedisServer) -> AsyncIterator[tuple[MemoryStore, RedisBus, RedisBus]]:
    store = MemoryStore()
    async with connections(redis, 2) as clients:
        owner = RedisBus(clients[0], store, "owner", lambda _: None)
        other = RedisBus(clients[1], store, "other", lambda _: None)
        for bus in (owner, other):
            bus.start()
        try:
            yield store, owner, other
        finally:
            for bus in (owner, other):
                await bus.stop()


async def test_every_node_gets_every_offset_once_with_gaps_filled_from_the_store(
    buses: tuple[MemoryStore, RedisBus, RedisBus],
) -> None:
    store, owner, other = buses
    seen = Recorder()
    await other.join("c")
    other.subscribe("c", seen)
    assert other.head("c") == 0
    batch = [delta(1), delta(2)]
    await store_events(store, batch)
    owner.publish("c", batch)  # the owner has no client of "c": Redis only
    await seen.until(2)
    # a lost message: offsets 3-4 stored, never published; 5 arrives first
    lost, later = [delta(3), delta(4)], [delta(5)]
    await store_events(store, lost + later)
    owner.publish("c", later)
    await seen.until(5)
    assert seen.offsets == [1, 2, 3, 4, 5]  # the gap came from the store, before 5
    assert other.filled == 2
    assert [f.text for f in seen.frames[2:4]] == [f.text for f in lost]  # byte-identical
    assert seen.frames[2].message_delta() is not None  # a filled delta can still be merged
    # a duplicate (Redis redelivers, or a node republishes) is dropped
    owner.publish("c", [delta(4), delta(5)])
    tail = [delta(6)]
    await store_events(store, tail)
    owner.publish("c", tail)
    await seen.until(6)
    assert seen.offsets == [1, 2, 3, 4, 5, 6]


async def test_a_lost_last_message_is_found_by_the_owners_head_tick(
    buses: tuple[MemoryStore, RedisBus, RedisBus],
) -> None:
    store, owner, other = buses
    seen = Recorder()
    await other.join("c")
    other.subscribe("c", seen)
    frames = [delta(1), delta(2), delta(3)]
    await store_events(store, frames)
    # stored and published by the owner, but the message never reached Redis
    owner._incoming("c", 1, frames)
    owner._recent["c"] = 3
    await seen.until(3)  # the next tick says head 3: the node reads 1-3 from the store
    assert seen.offsets == [1, 2, 3]


async def test_join_starts_from_the_stored_head_and_leave_unsubscribes(
    buses: tuple[MemoryStore, RedisBus, RedisBus], redis: RedisServer
) -> None:
    store, _, other = buses
    await store_events(store, [delta(1), delta(2)])
    await other.join("c")
    assert other.head("c") == 2
    await other.join("c")  # a second client of the same conversation
    other.leave("c")
    assert other.head("c") == 2
    other.leave("c")
    assert other.head("c") is None
    probe = Redis(port=redis.port)
    try:
        await until_unsubscribed(probe)
    finally:
        await probe.aclose()


async def until_unsubscribed(probe: Redis) -> None:
    """Redis has no event for an unsubscription: ask until the channel has none."""
    async with asyncio.timeout(TIMEOUT):
        for _ in range(10_000):
            if not (await probe.pubsub_numsub(conversation_channel("c")))[0][1]:
                return
            await asyncio.sleep(0.01)


async def test_the_owners_own_clients_are_served_without_a_round_trip(
    buses: tuple[MemoryStore, RedisBus, RedisBus],
) -> None:
    store, owner, _ = buses
    seen = Recorder()
    await owner.join("c")
    owner.subscribe("c", seen)
    frames = [delta(1)]
    await store_events(store, frames)
    owner.publish("c", frames)
    assert seen.frames == frames  # at once, the very frame objects (encoded once)


async def test_subscriptions_are_rebuilt_and_caught_up_after_redis_restarts(
    buses: tuple[MemoryStore, RedisBus, RedisBus], redis: RedisServer
) -> None:
    store, owner, other = buses
    seen = Recorder()
    await other.join("c")
    other.subscribe("c", seen)
    await redis.stop()
    frames = [delta(1), delta(2)]
    await store_events(store, frames)
    owner.publish("c", frames)  # lost: Redis is down
    await redis.start()
    await seen.until(2)  # resubscribed, then caught up from the store
    assert seen.offsets == [1, 2]


Pair = tuple[Leases, Leases, Redis]


@pytest.fixture
async def pair(redis: RedisServer) -> AsyncIterator[Pair]:
    """Nodes a and b, alive, and a client of the same Redis."""
    async with connections(redis, 3) as clients:
        a = Leases(clients[0], "a", lease_s=2.0)
        b = Leases(clients[1], "b", lease_s=2.0)
        for leases in (a, b):
            await leases.beat(b"{}")
        yield a, b, clients[2]


async def test_a_lease_has_one_holder_and_goes_with_its_node(
    pair: tuple[Leases, Leases, Redis],
) -> None:
    a, b, redis = pair
    assert await a.acquire("c") is None
    assert await b.acquire("c") == "a"
    assert a.holds("c")
    assert not b.holds("c")
    assert await b.lost(["c"]) == []
    assert await b.free(["c", "d"]) == ["d"]
    await redis.delete("steerway:alive:a")  # a's liveness expired (killed, paused)
    assert await b.lost(["c"]) == ["c"]
    assert await b.acquire("c") is None  # b takes it over
    assert await a.acquire("c") == "b"
    await a.release("c")  # a's old lease value: not b's lease
    assert await a.acquire("c") == "b"
    await b.release("c")
    assert await a.acquire("c") is None


async def test_after_redis_lost_everything_a_node_takes_its_leases_again(
    pair: tuple[Leases, Leases, Redis],
) -> None:
    a, b, redis = pair
    assert await a.acquire("c") is None
    assert await a.acquire("d") is None
    await redis.flushall()  # a restarted Redis keeps nothing
    assert await b.beat(b"{}") is False  # b held nothing: nothing to assert again
    assert await b.acquire("d") is None  # b was quicker for one of them
    assert await a.beat(b"{}") is True  # a learns that Redis lost its liveness
    assert not a.valid()  # ... and writes nothing until it knows which leases are its own
    assert await a.reassert() == ["d"]
    a.confirm()
    assert a.valid()
    assert a.holds("c")
    assert not a.holds("d")
    assert await b.acquire("c") == "a"


async def test_a_node_that_cannot_renew_stops_writing_before_its_lease_can_expire(
    pair: tuple[Leases, Leases, Redis],
) -> None:
    a, _, _ = pair
    assert await a.acquire("c") is None
    assert a.valid()
    a._valid_until = 0.0  # the last renewal is older than the liveness time allows
    assert not a.holds("c")
    assert a.alive_ms == 1000  # half the lease time


async def test_a_malformed_message_is_skipped_and_the_stream_goes_on(
    buses: tuple[MemoryStore, RedisBus, RedisBus], redis: RedisServer
) -> None:
    store, owner, other = buses
    seen = Recorder()
    await other.join("c")
    other.subscribe("c", seen)
    hostile = Redis(port=redis.port)
    try:
        for junk in (b"", b"not json\n{}", b'{"n":"x"}\nabc', b'{"n":"x","o":"one"}\n{}'):
            await hostile.publish(conversation_channel("c"), junk)
    finally:
        await hostile.aclose()
    frames = [delta(1)]
    await store_events(store, frames)
    owner.publish("c", frames)
    await seen.until(1)
    assert seen.offsets == [1]
    assert other.connections == 1  # read past, not taken for a broken connection


async def test_publishing_goes_on_with_replies_when_redis_refuses_to_turn_them_off(
    redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    store = MemoryStore()
    async with connections(redis, 3) as (admin, one, two):
        await admin.execute_command("ACL", "SETUSER", "default", "-client|reply")
        owner = RedisBus(one, store, "owner", lambda _: None)
        other = RedisBus(two, store, "other", lambda _: None)
        for bus in (owner, other):
            bus.start()
        try:
            seen = Recorder()
            await other.join("c")
            other.subscribe("c", seen)
            frames = [delta(i) for i in range(1, 201)]
            await store_events(store, frames)
            for frame in frames:  # one message each: 200 replies to read, none left over
                owner.publish("c", [frame])
            await seen.until(200)
            assert seen.offsets == list(range(1, 201))
            assert owner.dropped == 0
            assert "refused CLIENT REPLY OFF" in caplog.text
        finally:
            for bus in (owner, other):
                await bus.stop()
