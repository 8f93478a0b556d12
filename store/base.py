"""The Store interface shared by the memory and MongoDB stores.

The store knows documents, not protocol: an event is stored with the exact
text it was sent with (`payload`), so a replay is byte-identical to the live
frame, and with the few fields its indexes need.  Every write is idempotent:
writing a batch again after a failure stores nothing twice.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(slots=True)
class EventRecord:
    conversation_id: str
    offset: int
    type: str
    ts: int
    payload: str  # the event's JSON text, exactly as it went on the wire
    run_id: str | None = None
    client_msg_id: str | None = None  # user.message only: the idempotency key


@dataclass(slots=True)
class TurnRecord:
    conversation_id: str
    role: str
    content: str
    message_id: str
    run_id: str
    ts: int
    offset: int  # of the event it comes from: transcripts are in offset order

    def document(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "content": self.content,
            "message_id": self.message_id,
            "run_id": self.run_id,
            "ts": self.ts,
        }


@dataclass(slots=True)
class ConversationRecord:
    conversation_id: str
    head: int
    last_activity: int
    runner: str | None = None
    active_run: dict[str, Any] | None = None  # {run_id, status, runner}

    def listing(self) -> dict[str, Any]:
        """The listing item of PROTOCOL.md section 8."""
        return {
            "conversation_id": self.conversation_id,
            "head": self.head,
            "last_activity": self.last_activity,
            "active_run": self.active_run,
        }


_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-")


@dataclass(slots=True)
class DeliveryRecord:
    """A webhook delivery, written in the commit of the event that causes it; the
    dispatcher (gateway/webhooks/dispatcher.py) sends it and records how that went."""

    endpoint: str
    conversation_id: str
    offset: int  # of its event; 0 for conversation.created, which goes first
    type: str
    body: str  # the exact JSON text POSTed
    created: int  # ms

    @property
    def id(self) -> str:
        """Its `_id` and `webhook-id`: the same on every try, and a retried batch stores
        it once."""
        return delivery_id(self.endpoint, self.conversation_id, self.offset)

    def document(self) -> dict[str, Any]:
        return {
            "_id": self.id,
            "endpoint": self.endpoint,
            "conversation_id": self.conversation_id,
            "offset": self.offset,
            "type": self.type,
            "body": self.body,
            "created": self.created,
            "since": self.created,  # given up 24 h after this (a replay restarts it)
            "next_at": self.created,
            "attempts": 0,
            "status": "pending",  # pending, delivered, failed
            "last_error": None,
            "last_status": None,  # the HTTP status of the last try
            "delivered_at": None,
            "lease_until": 0,  # a node sends it until then (cluster mode)
            "owner": None,
        }


def delivery_id(endpoint: str, conversation_id: str, offset: int) -> str:
    return f"{endpoint}:{conversation_id}:{offset}"


@dataclass(frozen=True, slots=True)
class ConversationFilter:
    """Conversation ids matching any of a token's `convs` (ids, or patterns where `*`
    matches any run of characters), as a store can query them: the exact ids, and one
    anchored regular expression for the patterns (None when there are none)."""

    ids: tuple[str, ...]
    regex: str | None

    @classmethod
    def of(cls, patterns: Iterable[str]) -> ConversationFilter:
        ids: list[str] = []
        alternatives: list[str] = []
        for pattern in dict.fromkeys(patterns):
            if not set(pattern) <= _ID_CHARS | {"*"}:
                continue  # a character no conversation id has: it matches nothing
            if "*" not in pattern:
                ids.append(pattern)
            else:
                # `.` is the one id character special in a regex (PCRE, Python, Rust alike)
                alternatives.append(pattern.replace(".", "\\.").replace("*", ".*"))
        regex = f"^(?:{'|'.join(alternatives)})$" if alternatives else None
        return cls(tuple(ids), regex)

    def matches(self, conversation_id: str) -> bool:
        if conversation_id in self.ids:
            return True
        return self.regex is not None and re.search(self.regex, conversation_id) is not None


@dataclass
class WriteBatch:
    """One group commit: events of any conversations, in offset order per conversation."""

    events: list[EventRecord] = field(default_factory=list)
    # run documents, upserted by run_id; each names its `node`, the node that wrote it last
    runs: list[dict[str, Any]] = field(default_factory=list)
    conversations: list[ConversationRecord] = field(default_factory=list)
    turns: list[TurnRecord] = field(default_factory=list)
    # Cluster mode: conversation id -> the writer's fencing epoch (`Store.claim`). The
    # store refuses the whole batch (StoreConflict) when a later epoch was claimed.
    fences: dict[str, int] = field(default_factory=dict)
    deliveries: list[DeliveryRecord] = field(default_factory=list)  # webhooks
    # time.monotonic() when the oldest batch merged into this one was made: a store may
    # rely on a fence it read a moment ago only for a batch made a moment ago
    made: float = field(default_factory=time.monotonic)

    def extend(self, other: WriteBatch) -> None:
        self.made = min(self.made, other.made)
        self.events.extend(other.events)
        self.deliveries.extend(other.deliveries)
        self.runs.extend(other.runs)
        self.conversations.extend(other.conversations)
        self.turns.extend(other.turns)
        self.fences.update(other.fences)

    def conversation_ids(self) -> set[str]:
        return {ev.conversation_id for ev in self.events} | set(self.fences)


class Store(Protocol):
    """Everything the gateway persists. Raises `StoreError` when the backend fails."""

    async def write(self, batch: WriteBatch) -> None:
        """Store a batch, idempotently: a retry after a failure stores nothing twice."""

    async def ping(self) -> None:
        """Return when the backend answers; raise StoreError otherwise."""

    async def claim(self, conversation_id: str) -> int:
        """Take the next fencing epoch of a conversation (cluster mode, on taking it over):
        from then on a batch fenced with an older epoch is refused with StoreConflict."""

    async def get_conversation(self, conversation_id: str) -> ConversationRecord | None:
        """The conversation document as last written (its `head` may lag the events by
        the one batch a crash interrupted: see `last_offset`)."""

    async def last_offset(self, conversation_id: str) -> int:
        """The offset of the conversation's newest stored event; 0 when it has none."""

    async def read_events(self, conversation_id: str, after: int, limit: int) -> list[str]:
        """Payloads of the events with offset > after, ascending, at most `limit`."""

    async def read_pages(
        self, conversation_ids: Sequence[str], after: int, limit: int
    ) -> dict[str, list[str]]:
        """For each conversation, exactly what `read_events(id, after, limit)` returns
        (`[]` for one with no such events), in one query: replays of many conversations
        at once (gateway/replay.py)."""

    async def find_client_message(self, conversation_id: str, client_msg_id: str) -> str | None:
        """The payload of the user.message stored under an idempotency key, if any."""

    async def transcript(
        self, conversation_id: str, limit: int | None = None, before: int | None = None
    ) -> list[TurnRecord]:
        """Turns in offset order: the newest `limit` (all when None) of those whose
        offset is below `before` (all when None)."""

    async def list_conversations(
        self, limit: int, before: tuple[int, str] | None, only: ConversationFilter | None = None
    ) -> list[ConversationRecord]:
        """Most recently active first; `before` is the (last_activity, id) of the last item
        seen; `only`, when given, keeps the conversations it matches (a token's `convs`)."""

    async def get_run(self, run_id: str) -> dict[str, Any] | None: ...

    async def list_runs(
        self, status: str | None, conversation_id: str | None, limit: int, before: str | None
    ) -> list[dict[str, Any]]:
        """Newest first (run ids are time-ordered); `before` is the last run id seen."""

    async def live_runs(self, conversation_id: str | None) -> list[dict[str, Any]]:
        """Run documents with status queued or running (of one conversation, or all),
        oldest first."""

    async def run_events(self, conversation_id: str, run_id: str) -> list[str]:
        """Payloads of every event of one run, ascending by offset."""

    # webhook deliveries (times in ms)

    async def due_deliveries(self, now: int, limit: int) -> list[dict[str, Any]]:
        """Pending deliveries whose `next_at` has come, soonest first, at most `limit`."""

    async def delivery_head(self, endpoint: str, conversation_id: str) -> dict[str, Any] | None:
        """The pending delivery of lowest offset of an endpoint and a conversation: the
        only one of them that may be sent."""

    async def claim_delivery(
        self, delivery_id: str, owner: str, now: int, lease_until: int
    ) -> dict[str, Any] | None:
        """Lease a pending delivery whose lease has lapsed to `owner` until `lease_until`,
        atomically; the delivery, or None when it is not pending or leased meanwhile."""

    async def settle_delivery(self, delivery_id: str, owner: str, changes: dict[str, Any]) -> bool:
        """Set `changes` (and end the lease) if `owner` still holds the delivery."""

    async def hold_deliveries(
        self, endpoint: str, conversation_id: str, after: int, until: int
    ) -> None:
        """Pending deliveries of the pair past offset `after` wait until at least `until`."""

    async def wake_deliveries(
        self, endpoint: str, conversation_id: str, after: int, now: int
    ) -> None:
        """Pending deliveries of the pair past offset `after` are due by `now` at latest."""

    async def list_deliveries(
        self, endpoint: str, limit: int, status: str | None = None
    ) -> list[dict[str, Any]]:
        """An endpoint's deliveries (of one status, or all), newest first."""

    async def replay_delivery(self, delivery_id: str, now: int) -> dict[str, Any] | None:
        """Make a delivery pending and due now, its 24 h starting again; the delivery, or
        None when there is none of that id."""

    async def close(self) -> None: ...


class StoreError(Exception):
    """The backend failed or did not answer."""


class StoreConflict(StoreError):
    """A write that must not be retried: another writer owns the conversation (a later
    fencing epoch was claimed), or an offset it writes is stored with another event."""

    def __init__(self, conversation_id: str, message: str) -> None:
        super().__init__(message)
        self.conversation_id = conversation_id
