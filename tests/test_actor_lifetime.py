"""A conversation's actor stops once idle (`actor_idle_s` with nothing to do: no run, no
client, nothing in its mailbox or on its way to the store), and not before."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from gateway.bus import MemoryBus
from gateway.config import Settings
from gateway.conversation import ConversationHub
from gateway.metrics import Metrics
from gateway.outbox import Frame
from gateway.protocol.frames import MessageFrame
from gateway.runners.registry import RunnerRegistry
from store.memory import MemoryStore
from tests.helpers import END, TIMEOUT, Fed

IDLE_S = 0.05


class Client:
    def deliver(self, frames: list[Frame]) -> None:
        pass


@pytest.fixture
async def hub() -> AsyncIterator[ConversationHub]:
    settings = Settings.load({"runner": "fed", "actor_idle_s": IDLE_S}, environ={})
    hub = ConversationHub(
        settings, MemoryStore(), MemoryBus(), RunnerRegistry([Fed("fed")]), Metrics()
    )
    hub.start()
    try:
        yield hub
    finally:
        await hub.stop()


def message(key: str) -> MessageFrame:
    return MessageFrame(type="message", client_msg_id=key, text="hi")


async def stopped(hub: ConversationHub, cid: str) -> None:
    actor = hub.actors[cid]
    assert actor.task is not None
    await asyncio.wait_for(asyncio.shield(actor.task), TIMEOUT)
    assert not actor.task.cancelled()  # it returned: an idle stop, not a cancel
    assert cid not in hub.actors


async def test_an_actor_stops_once_idle_and_not_while_a_run_is_active(
    hub: ConversationHub,
) -> None:
    runner = hub.runners.get("fed")
    assert isinstance(runner, Fed)
    await asyncio.wait_for(hub.submit("c", message("m1"), "alice"), TIMEOUT)
    await asyncio.wait_for(runner.contexts.get(), TIMEOUT)
    actor = hub.actors["c"]
    await asyncio.sleep(6 * IDLE_S)  # the behaviour under test: several idle times pass
    assert hub.actors.get("c") is actor  # its run is active: it stays
    runner.put(END)
    await stopped(hub, "c")
    # the next message starts a new actor from the store: nothing was lost
    ack = await asyncio.wait_for(hub.submit("c", message("m2"), "alice"), TIMEOUT)
    assert hub.actors["c"] is not actor
    assert ack.offset > 1


async def test_an_actor_with_a_client_stays(hub: ConversationHub) -> None:
    runner = hub.runners.get("fed")
    assert isinstance(runner, Fed)
    client = Client()
    hub.bus.subscribe("c", client)
    await asyncio.wait_for(hub.submit("c", message("m1"), "alice"), TIMEOUT)
    runner.put(END)
    actor = hub.actors["c"]
    await asyncio.wait_for(actor.log.flush(), TIMEOUT)
    await asyncio.sleep(6 * IDLE_S)  # the behaviour under test: several idle times pass
    assert hub.actors.get("c") is actor
    hub.bus.unsubscribe("c", client)
    await stopped(hub, "c")
