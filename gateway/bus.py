"""Fan-out: who receives a conversation's events.

The `Bus` interface is small so that a Redis-backed bus can replace the
in-process one when several gateway nodes serve one conversation: publish is
called once per stored batch with frames encoded once, and every subscriber
receives those same objects.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from gateway.outbox import Frame


class Subscriber(Protocol):
    def deliver(self, frames: list[Frame]) -> None:
        """Take frames without blocking: the subscriber queues (or drops) them itself."""


class Bus(Protocol):
    # Frames another node broadcast (presence): set by the presence board, called after
    # they reached this node's subscribers. A single process never calls it.
    on_broadcast: Callable[[str, list[Frame]], None] | None

    async def join(self, conversation_id: str) -> None:
        """Before subscribing: make this node receive the conversation's events (a
        cluster's channel, subscribed and caught up); `leave` undoes it."""

    def leave(self, conversation_id: str) -> None: ...

    def head(self, conversation_id: str) -> int | None:
        """The last offset this node's subscribers were handed, where the bus knows it
        (a joined cluster channel); None: ask the conversation's actor."""

    def subscribe(self, conversation_id: str, subscriber: Subscriber) -> None: ...

    def unsubscribe(self, conversation_id: str, subscriber: Subscriber) -> None: ...

    def publish(self, conversation_id: str, frames: list[Frame]) -> None: ...

    def broadcast(self, conversation_id: str, frames: list[Frame], here: bool = True) -> None:
        """Ephemeral frames (no offset, never stored) to every subscriber of the
        conversation on every node, this one too unless `here` is False: at most once,
        never gap-filled, never holding back or held back by events."""

    def count(self, conversation_id: str) -> int:
        """Subscribers of a conversation on this node."""


class MemoryBus:
    """The in-process bus: a set of subscribers per conversation."""

    def __init__(self) -> None:
        self._subs: dict[str, dict[Subscriber, None]] = {}
        self.on_broadcast: Callable[[str, list[Frame]], None] | None = None

    async def join(self, conversation_id: str) -> None:
        return None  # one process: the actor publishes here

    def leave(self, conversation_id: str) -> None:
        return None

    def head(self, conversation_id: str) -> int | None:
        return None

    def subscribe(self, conversation_id: str, subscriber: Subscriber) -> None:
        subs = self._subs.setdefault(conversation_id, {})
        subs[subscriber] = None

    def unsubscribe(self, conversation_id: str, subscriber: Subscriber) -> None:
        subs = self._subs.get(conversation_id)
        if subs is None or subscriber not in subs:
            return
        del subs[subscriber]
        if not subs:
            del self._subs[conversation_id]

    def publish(self, conversation_id: str, frames: list[Frame]) -> None:
        subs = self._subs.get(conversation_id)
        if subs:
            for sub in tuple(subs):
                sub.deliver(frames)

    def broadcast(self, conversation_id: str, frames: list[Frame], here: bool = True) -> None:
        if here:
            self.publish(conversation_id, frames)

    def count(self, conversation_id: str) -> int:
        return len(self._subs.get(conversation_id, ()))
