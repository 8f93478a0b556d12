"""Persistence: the Store interface and its implementations. Never imports the gateway."""

from store.base import (
    ConversationRecord,
    EventRecord,
    Store,
    TurnRecord,
    WriteBatch,
)

__all__ = ["ConversationRecord", "EventRecord", "Store", "TurnRecord", "WriteBatch"]
