"""The event log's pipeline (issue 4, item 7): an actor hands a batch to the group
commit and goes on; batches are published, and their callbacks run, once stored and in
append order, with at most PIPELINE_DEPTH in flight.  And the actor on top of it: acks
and a new run's driver wait for the store."""

from __future__ import annotations

import asyncio

from gateway.bus import MemoryBus
from gateway.config import Settings
from gateway.conversation import ConversationHub
from gateway.core.conversation import Effects
from gateway.eventlog import PIPELINE_DEPTH, EventLog
from gateway.metrics import Metrics
from gateway.outbox import Frame
from gateway.protocol.frames import MessageDelta, MessageFrame
from gateway.runners.registry import RunnerRegistry
from store.base import WriteBatch
from tests.helpers import TIMEOUT, Fed
from tests.test_commit import GatedStore


class Recorder:
    """A bus subscriber that keeps the offsets it is given."""

    def __init__(self) -> None:
        self.offsets: list[int] = []

    def deliver(self, frames: list[Frame]) -> None:
        self.offsets.extend(frame.offset for frame in frames)


def deltas(count: int) -> Effects:
    fx = Effects()
    fx.events = [
        MessageDelta(conversation_id="c", run_id="r", ts=1, message_id="m", delta="x")
        for _ in range(count)
    ]
    return fx


class FakeCommitter:
    """Hands out futures the test completes, in any order."""

    def __init__(self) -> None:
        self.futures: list[asyncio.Future[None]] = []
        self.batches: list[WriteBatch] = []

    async def submit(self, batch: WriteBatch, writer: object = None) -> asyncio.Future[None]:
        self.batches.append(batch)
        self.futures.append(asyncio.get_running_loop().create_future())
        return self.futures[-1]


def event_log(committer: object, bus: MemoryBus) -> EventLog:
    return EventLog("c", 0, committer, bus, "node")  # type: ignore[arg-type]


async def test_batches_are_published_once_stored_in_append_order() -> None:
    committer, bus, seen, calls = FakeCommitter(), MemoryBus(), Recorder(), []
    bus.subscribe("c", seen)
    log = event_log(committer, bus)
    for size in (2, 1, 3):
        await log.append(deltas(size), None, {})
        log.then(lambda size=size: calls.append(size))
    assert log.busy
    assert log.head == 6
    assert log.published == 0
    assert [[e.offset for e in b.events] for b in committer.batches] == [[1, 2], [3], [4, 5, 6]]
    committer.futures[2].set_result(None)  # the last first: held back
    committer.futures[1].set_result(None)
    await asyncio.wait(committer.futures[1:])  # their done-callbacks have run
    assert seen.offsets == []
    assert calls == []
    assert log.published == 0
    committer.futures[0].set_result(None)
    await asyncio.wait_for(log.flush(), TIMEOUT)
    assert seen.offsets == [1, 2, 3, 4, 5, 6]
    assert calls == [2, 1, 3]
    assert log.published == 6
    assert not log.busy
    log.then(lambda: calls.append(0))  # nothing in flight: at once
    assert calls == [2, 1, 3, 0]


async def test_at_most_pipeline_depth_batches_are_in_flight() -> None:
    committer, bus = FakeCommitter(), MemoryBus()
    log = event_log(committer, bus)
    for _ in range(PIPELINE_DEPTH):
        await asyncio.wait_for(log.append(deltas(1), None, {}), TIMEOUT)
    blocked = asyncio.create_task(log.append(deltas(1), None, {}))
    await asyncio.sleep(0)
    assert not blocked.done()
    assert len(committer.batches) == PIPELINE_DEPTH
    committer.futures[0].set_result(None)
    await asyncio.wait_for(blocked, TIMEOUT)
    assert len(committer.batches) == PIPELINE_DEPTH + 1


async def test_a_failing_callback_holds_back_no_other() -> None:
    committer, bus, seen, calls = FakeCommitter(), MemoryBus(), Recorder(), []
    bus.subscribe("c", seen)
    log = event_log(committer, bus)
    await log.append(deltas(1), None, {})
    log.then(lambda: 1 / 0)  # type: ignore[func-returns-value]
    log.then(lambda: calls.append("after"))
    await log.append(deltas(1), None, {})
    for future in committer.futures:
        future.set_result(None)
    await asyncio.wait_for(log.flush(), TIMEOUT)
    assert calls == ["after"]
    assert seen.offsets == [1, 2]


async def test_acks_and_a_runs_driver_wait_for_the_store() -> None:
    """A message starts a run while the store holds the write: no ack and no driver yet.
    A cancel sent meanwhile ends the run; once stored, the ack comes and no driver ever
    starts for the ended run."""
    store, runner = GatedStore(), Fed("fed")
    settings = Settings.load({"runner": "fed"}, environ={})
    hub = ConversationHub(settings, store, MemoryBus(), RunnerRegistry([runner]), Metrics())
    hub.start()
    try:
        frame = MessageFrame(type="message", client_msg_id="m1", text="hi")
        ack = asyncio.create_task(hub.submit("c", frame, "anonymous"))
        await asyncio.wait_for(store.entered.wait(), TIMEOUT)
        actor = hub.actors["c"]
        run = actor.machine.active
        assert run is not None
        cancel = asyncio.create_task(hub.cancel("c", run.run_id))
        await asyncio.sleep(0)
        assert not ack.done()
        assert not actor.drivers
        assert runner.contexts.empty()
        store.gate.set()
        first = await asyncio.wait_for(ack, TIMEOUT)
        await asyncio.wait_for(cancel, TIMEOUT)
        await asyncio.wait_for(actor.log.flush(), TIMEOUT)
        assert first.run_id == run.run_id
        assert actor.machine.active is None
        assert not actor.drivers
        assert runner.contexts.empty()
        doc = await store.get_run(run.run_id)
        assert doc is not None
        assert doc["status"] == "cancelled"
    finally:
        await hub.stop()
