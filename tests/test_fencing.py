"""One writer, fenced (issue 12, item 2), in one event loop on the memory store: an actor
whose conversation another node claimed (a newer fencing epoch) or whose lease lapsed
writes nothing more, acknowledges nothing of the refused batch, publishes nothing of it,
and stops; the conversation then goes to the lease holder."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.bus import MemoryBus
from gateway.config import Settings
from gateway.conversation import ConversationActor, ConversationHub, ConversationRef
from gateway.errors import SteerwayError
from gateway.metrics import Metrics
from gateway.outbox import Frame
from gateway.protocol.codes import ErrorCode
from gateway.protocol.frames import MessageFrame
from gateway.runners.registry import RunnerRegistry
from store.memory import MemoryStore
from tests.helpers import TIMEOUT, Fed


class Recorder:
    def __init__(self) -> None:
        self.offsets: list[int] = []

    def deliver(self, frames: list[Frame]) -> None:
        self.offsets.extend(frame.offset for frame in frames)


class Elsewhere:
    """A proxy for a conversation another node runs: records what it is handed."""

    def __init__(self, conversation_id: str) -> None:
        self.conversation_id = conversation_id
        self.posted: list[Any] = []
        self.stopped = False
        self.published = 0
        self.queued_runs = 0

    def summary(self) -> None:
        return None

    async def describe(self) -> None:
        return None

    async def post(self, item: Any) -> None:
        self.posted.append(item)


class Ownership:
    """What gateway.cluster tells the hub, set by the test."""

    node = "a"

    def __init__(self) -> None:
        self.held: set[str] = set()
        self.live = True
        self.holder: str | None = None  # None: acquire succeeds
        self.released: list[str] = []

    def valid(self) -> bool:
        return self.live

    def holds(self, conversation_id: str) -> bool:
        return self.live and conversation_id in self.held

    async def acquire(self, conversation_id: str) -> str | None:
        if self.holder is None:
            self.held.add(conversation_id)
        return self.holder

    def release(self, conversation_id: str) -> None:
        self.released.append(conversation_id)

    def remote(self, conversation_id: str, holder: str) -> ConversationRef:
        return Elsewhere(conversation_id)


def message(key: str) -> MessageFrame:
    return MessageFrame(type="message", client_msg_id=key, text="/sleep 30")


@pytest.fixture
async def hub() -> Any:
    settings = Settings.load({"runner": "fed"}, environ={})
    hub = ConversationHub(
        settings, MemoryStore(), MemoryBus(), RunnerRegistry([Fed("fed")]), Metrics()
    )
    hub.cluster = Ownership()
    hub.start()
    try:
        yield hub
    finally:
        await hub.stop()


async def test_a_batch_fenced_by_a_newer_epoch_is_refused_and_the_actor_stops(
    hub: ConversationHub,
) -> None:
    recorder = Recorder()
    hub.bus.subscribe("c", recorder)
    ack = await asyncio.wait_for(hub.submit("c", message("m1"), "alice"), TIMEOUT)
    actor = hub.actors["c"]
    assert isinstance(actor, ConversationActor)
    assert actor.log.epoch == 1
    stored = await hub.store.last_offset("c")
    assert recorder.offsets == list(range(1, stored + 1))
    assert await hub.store.claim("c") == 2  # another node took the conversation over

    with pytest.raises(SteerwayError) as refused:
        await asyncio.wait_for(hub.submit("c", message("m2"), "alice"), TIMEOUT)
    assert refused.value.code is ErrorCode.INTERNAL
    assert await hub.store.last_offset("c") == stored  # nothing of it was written
    assert await hub.store.find_client_message("c", "m2") is None  # the key stays free
    assert recorder.offsets == list(range(1, stored + 1))  # nothing of it was published
    assert actor.task is not None
    done, _ = await asyncio.wait([actor.task], timeout=TIMEOUT)
    assert done
    assert actor.stopped
    assert "c" not in hub.actors
    assert hub.cluster is not None
    assert hub.cluster.released == []  # fenced: the lease is someone else's, not released
    assert ack.offset == 1


async def test_an_actor_whose_lease_lapsed_writes_nothing_and_the_holder_gets_the_rest(
    hub: ConversationHub,
) -> None:
    await asyncio.wait_for(hub.submit("c", message("m1"), "alice"), TIMEOUT)
    actor = hub.actors["c"]
    stored = await hub.store.last_offset("c")
    ownership = hub.cluster
    assert isinstance(ownership, Ownership)
    ownership.held.clear()  # the lease moved (this node was paused, say)
    ownership.holder = "b"

    ref = await hub.get("c")  # the actor is fenced; the proxy to the holder is returned
    assert isinstance(ref, Elsewhere)
    assert actor.log.conflict is not None
    await ref.post(None)  # type: ignore[arg-type]
    assert ref.posted == [None]
    assert await hub.store.last_offset("c") == stored


async def test_a_lapsed_lease_refuses_new_messages_with_internal(hub: ConversationHub) -> None:
    ownership = hub.cluster
    assert isinstance(ownership, Ownership)
    ownership.live = False  # Redis unreachable for longer than the liveness time
    with pytest.raises(SteerwayError) as refused:
        await hub.submit("c", message("m1"), "alice")
    assert refused.value.code is ErrorCode.INTERNAL
    assert await hub.store.last_offset("c") == 0
