"""Persistence: the Store interface and its implementations. Never imports the gateway."""

from store.base import (
    ConversationFilter,
    ConversationRecord,
    EventRecord,
    Store,
    TurnRecord,
    WriteBatch,
)

__all__ = [
    "ConversationFilter",
    "ConversationRecord",
    "EventRecord",
    "Store",
    "TurnRecord",
    "WriteBatch",
]
