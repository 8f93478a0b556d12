"""What each stored event owes the webhook endpoints: the deliveries that go into the
same commit as the event (gateway/eventlog.py), built without I/O on the actor's path."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, datetime

from gateway.webhooks.endpoints import CREATED, Endpoint
from store.base import DeliveryRecord, EventRecord


def body(event_type: str, ts_ms: int, payload: str) -> str:
    """`{"type", "timestamp", "data"}` (Standard Webhooks), `data` the event as stored:
    spliced in, not re-encoded, so it is the same text the clients got."""
    stamp = datetime.fromtimestamp(ts_ms / 1000, UTC).isoformat(timespec="milliseconds")
    stamp = stamp.replace("+00:00", "Z")
    return f'{{"type":"{event_type}","timestamp":"{stamp}","data":{payload}}}'


class Subscriptions:
    """The configured endpoints by the event types they want."""

    def __init__(self, endpoints: Iterable[Endpoint]) -> None:
        self.endpoints = {e.name: e for e in endpoints}
        self._by_type: dict[str, list[Endpoint]] = {}
        for endpoint in self.endpoints.values():
            for event_type in endpoint.events:
                self._by_type.setdefault(event_type, []).append(endpoint)
        # the dispatcher's: called once deliveries are stored or replayed
        self.wake: Callable[[], None] = lambda: None

    def deliveries(self, records: Iterable[EventRecord]) -> list[DeliveryRecord]:
        """The deliveries of some events, in offset order: `conversation.created` (offset
        0, so it goes first) with the conversation's first event."""
        out: list[DeliveryRecord] = []
        for ev in records:
            if ev.offset == 1:
                for endpoint in self._by_type.get(CREATED, ()):
                    out.append(self._delivery(endpoint, ev, CREATED, 0))
            for endpoint in self._by_type.get(ev.type, ()):
                out.append(self._delivery(endpoint, ev, ev.type, ev.offset))
        return out

    @staticmethod
    def _delivery(endpoint: Endpoint, ev: EventRecord, kind: str, offset: int) -> DeliveryRecord:
        return DeliveryRecord(
            endpoint.name, ev.conversation_id, offset, kind, body(kind, ev.ts, ev.payload), ev.ts
        )
