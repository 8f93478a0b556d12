"""Fan-out: who receives a conversation's events.

The `Bus` interface is small so that a Redis-backed bus can replace the
in-process one when several gateway nodes serve one conversation: publish is
called once per stored batch with frames encoded once, and every subscriber
receives those same objects.
"""

from __future__ import annotations

from typing import Protocol

from gateway.outbox import Frame


class Subscriber(Protocol):
    def deliver(self, frames: list[Frame]) -> None:
        """Take frames without blocking: the subscriber queues (or drops) them itself."""


class Bus(Protocol):
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

    def count(self, conversation_id: str) -> int:
        """Subscribers of a conversation on this node."""


class MemoryBus:
    """The in-process bus: a set of subscribers per conversation."""

    def __init__(self) -> None:
        self._subs: dict[str, dict[Subscriber, None]] = {}

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

    def count(self, conversation_id: str) -> int:
        return len(self._subs.get(conversation_id, ()))
