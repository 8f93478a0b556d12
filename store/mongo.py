"""The MongoDB store: PyMongo's async API (`AsyncMongoClient`), portable subset only.

Four collections (docs/storage.md has the schema and the reasons):

- `conversations`: `_id` = conversation id; `head`, `last_activity`, `runner`, `active_run`.
- `events`: the log. A document holds one event, or a run of consecutive events of one
  run written in one commit (`offset`..`last`); `payloads` are their exact JSON texts
  as sent on the wire. A user.message is always alone: it carries the idempotency key.
- `runs`: `_id` = run id; the run document (its `node` names its owner), plus
  `heartbeat` (ms).
- `transcripts`: one document per turn, `_id` = "<conversation id>:<message id>".
- `fences`: `_id` = conversation id; `epoch`, the fencing token of its writer (cluster mode).
- `deliveries`: webhook deliveries, `_id` = "<endpoint>:<conversation id>:<offset>",
  written with the events that cause them (docs/webhooks.md).

Only what MongoDB, nx-27017 and mongoeco all do alike is used: plain, unique and
sparse single-field indexes and plain compound ones, ordered `insert_many`,
`bulk_write` upserts with `$set`/`$max`/`$setOnInsert`, finds with sort, limit and
projection.  No transactions, partial indexes or Decimal128.

A write is idempotent.  Events go first with an ordered `insert_many`, which stops at
its first error: a duplicate key on (conversation, offset) means an earlier try of
the same batch stored that event, so the documents already present are dropped and
the rest inserted again, until none is left.  Runs, conversations and transcripts
are upserts that give the same result when applied twice.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Iterator, Sequence
from operator import itemgetter
from typing import Any

from bson.errors import BSONError
from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, ReturnDocument, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError, CollectionInvalid, OperationFailure, PyMongoError

from store.base import (
    ConversationFilter,
    ConversationRecord,
    DeliveryRecord,
    EventRecord,
    StoreConflict,
    StoreError,
    TurnRecord,
    WriteBatch,
)

Document = dict[str, Any]

DUPLICATE_KEY = 11000
# Packing consecutive events into one document: a streaming run's deltas of one commit
# are one insert, not one per event (nx-27017 spends ~0.4 ms per document inserted).
PACK_EVENTS = 256
PACK_BYTES = 1024 * 1024  # characters: well inside MongoDB's 16 MiB document limit
NAMESPACE_EXISTS = 48
# A conversation's fence read is relied on for this long, for batches made within it.
# A writer stops writing on its own a fifth of its liveness time (at least 100 ms: the
# lease is at least 1 s, liveness half of it) before another node can claim the
# conversation (gateway/cluster/leases.py, SAFETY), so no claim can fall between a
# read this recent and the write of a batch this recent; the unique offset index
# stays the last fence. At 100 batches/s of one conversation, 4 reads in 5 are saved.
FENCE_FRESH_S = 0.05
LIVE = ["queued", "running"]
RUN_EXTRAS = {"_id": 0, "heartbeat": 0}  # stored on a run, not part of it

# name -> (keys, options); created at open, idempotently
INDEXES: dict[str, dict[str, tuple[list[tuple[str, int]], dict[str, Any]]]] = {
    "events": {
        # the log itself: the newest offset; no document starts at an offset twice
        "conversation_offset": (
            [("conversation_id", ASCENDING), ("offset", ASCENDING)],
            {"unique": True},
        ),
        # reads after an offset: the documents whose last event is past it
        "conversation_last": ([("conversation_id", ASCENDING), ("last", ASCENDING)], {}),
        # the idempotency key of user.message. A compound sparse index would index
        # every event (MongoDB indexes a document that has ANY of the keys, so two
        # events without a key would collide on (id, null)): the key is one field,
        # "<conversation id> <client_msg_id>", present only on user.message.
        "client_key": ([("client_key", ASCENDING)], {"unique": True, "sparse": True}),
        # the events of one run
        "conversation_run_offset": (
            [("conversation_id", ASCENDING), ("run_id", ASCENDING), ("offset", ASCENDING)],
            {},
        ),
    },
    "runs": {
        # run_id, not _id, in compound keys: nx-27017 fails every write to a
        # collection with `_id` in a compound index
        "status_run": ([("status", ASCENDING), ("run_id", ASCENDING)], {}),
        "conversation_run": ([("conversation_id", ASCENDING), ("run_id", ASCENDING)], {}),
        "conversation_status": ([("conversation_id", ASCENDING), ("status", ASCENDING)], {}),
    },
    "conversations": {
        "last_activity_conversation": (
            [("last_activity", ASCENDING), ("conversation_id", ASCENDING)],
            {},
        ),
    },
    "transcripts": {
        "conversation_offset": ([("conversation_id", ASCENDING), ("offset", ASCENDING)], {}),
    },
    "fences": {},
    "deliveries": {
        # the due ones, soonest first
        "status_next": ([("status", ASCENDING), ("next_at", ASCENDING)], {}),
        # the head of an endpoint's queue for one conversation
        "queue": (
            [
                ("endpoint", ASCENDING),
                ("conversation_id", ASCENDING),
                ("status", ASCENDING),
                ("offset", ASCENDING),
            ],
            {},
        ),
        # the dashboard: an endpoint's newest
        "endpoint_created": ([("endpoint", ASCENDING), ("created", ASCENDING)], {}),
    },
}


def client_key(conversation_id: str, client_msg_id: str) -> str:
    # a conversation id never contains a space (PROTOCOL.md section 1)
    return f"{conversation_id} {client_msg_id}"


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    if len(text) > 200:
        text = text[:200] + "…"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@contextlib.contextmanager
def _errors(what: str) -> Iterator[None]:
    """Raise every driver error as StoreError."""
    try:
        yield
    except StoreError:
        raise
    except (PyMongoError, BSONError, OverflowError) as exc:
        raise StoreError(f"mongodb {what}: {_short(exc)}") from exc


def _event_document(ev: EventRecord) -> Document:
    doc: Document = {
        "conversation_id": ev.conversation_id,
        "offset": ev.offset,
        "last": ev.offset,
        "type": ev.type,
        "ts": ev.ts,
        "run_id": ev.run_id,
        "payloads": [ev.payload],
    }
    if ev.client_msg_id is not None:  # absent, not null: the sparse index skips it
        doc["client_msg_id"] = ev.client_msg_id
        doc["client_key"] = client_key(ev.conversation_id, ev.client_msg_id)
    return doc


def pack(events: list[EventRecord]) -> list[Document]:
    """The documents of a batch's events, in order: consecutive events of one
    conversation and one run, with contiguous offsets and no idempotency key, share a
    document (at most PACK_EVENTS events, PACK_BYTES of payload). The same events
    always pack the same way, so a retried batch meets its first try's keys."""
    docs: list[Document] = []
    size = 0
    for ev in events:
        prev = docs[-1] if docs else None
        if (
            prev is not None
            and ev.client_msg_id is None
            and "client_key" not in prev
            and prev["conversation_id"] == ev.conversation_id
            and prev["run_id"] == ev.run_id
            and prev["last"] + 1 == ev.offset
            and len(prev["payloads"]) < PACK_EVENTS
            and size + len(ev.payload) <= PACK_BYTES
        ):
            prev["last"] = ev.offset
            prev["payloads"].append(ev.payload)
            size += len(ev.payload)
        else:
            docs.append(_event_document(ev))
            size = len(ev.payload)
    return docs


def _payloads(docs: list[Document], after: int = 0) -> Iterator[str]:
    """The payloads of event documents (in offset order) with offset > after."""
    for doc in docs:
        skip = max(0, after - doc["offset"] + 1)
        yield from doc["payloads"][skip:]


def _conversation(doc: Document) -> ConversationRecord:
    return ConversationRecord(
        conversation_id=doc["_id"],
        head=doc["head"],
        last_activity=doc["last_activity"],
        runner=doc.get("runner"),
        active_run=doc.get("active_run"),
    )


class MongoStore:
    """A Store on MongoDB or a wire-compatible server. Open it with `await MongoStore.open(…)`."""

    def __init__(self, client: AsyncMongoClient[Document], database: str) -> None:
        self.client = client
        self.db: AsyncDatabase[Document] = client[database]
        self._events: AsyncCollection[Document] = self.db["events"]
        self._runs: AsyncCollection[Document] = self.db["runs"]
        self._conversations: AsyncCollection[Document] = self.db["conversations"]
        self._transcripts: AsyncCollection[Document] = self.db["transcripts"]
        self._fences: AsyncCollection[Document] = self.db["fences"]
        self._fenced: dict[str, tuple[int, float]] = {}  # conversation -> (epoch, read at)
        self._deliveries: AsyncCollection[Document] = self.db["deliveries"]

    @classmethod
    async def open(
        cls,
        uri: str,
        database: str = "steerway",
        *,
        timeout_ms: int = 2000,
        socket_timeout_ms: int = 10_000,
    ) -> MongoStore:
        """Connect, create the collections and indexes that are missing, and return
        the store. An unreachable server raises StoreError after about `timeout_ms`."""
        try:
            client: AsyncMongoClient[Document] = AsyncMongoClient(
                uri,
                serverSelectionTimeoutMS=timeout_ms,
                connectTimeoutMS=timeout_ms,
                socketTimeoutMS=socket_timeout_ms,
                # pooled connections a burst opened close once idle: no descriptor stays
                maxIdleTimeMS=10_000,
                appname="steerway",
            )
        except (PyMongoError, ValueError) as exc:
            raise StoreError(f"mongodb uri: {_short(exc)}") from exc
        store = cls(client, database)
        try:
            await store._prepare()
        except BaseException:
            await client.close()
            raise
        return store

    async def _prepare(self) -> None:
        with _errors("create collections and indexes"):
            existing = set(await self.db.list_collection_names())
            for name in INDEXES:
                if name in existing:
                    continue
                try:
                    await self.db.create_collection(name)
                except CollectionInvalid:
                    pass  # created meanwhile by another node
                except OperationFailure as exc:
                    if exc.code != NAMESPACE_EXISTS:
                        raise
            for name, indexes in INDEXES.items():
                for index_name, (keys, options) in indexes.items():
                    await self.db[name].create_index(keys, name=index_name, **options)

    # writes

    async def claim(self, conversation_id: str) -> int:
        with _errors("claim"):
            doc = await self._fences.find_one_and_update(
                {"_id": conversation_id},
                {"$inc": {"epoch": 1}},
                upsert=True,
                return_document=ReturnDocument.AFTER,
            )
        if doc is None:  # an upsert returns the document it made
            raise StoreError(f"mongodb claim: no fence document for {conversation_id}")
        return int(doc["epoch"])

    async def _check_fences(self, fences: dict[str, int], made: float) -> None:
        """One read for the batch's conversations whose fence was not read a moment ago
        (FENCE_FRESH_S). A writer that passes it and is then paused may still insert
        after a newer writer claimed: the unique offset index is the last fence (a
        conflicting event at the same offset)."""
        now = time.monotonic()
        stale = [
            cid
            for cid, epoch in fences.items()
            if not (
                now - made < FENCE_FRESH_S
                and (seen := self._fenced.get(cid)) is not None
                and seen[0] == epoch
                and now - seen[1] < FENCE_FRESH_S
            )
        ]
        if not stale:
            return
        with _errors("read fences"):
            cursor = self._fences.find({"_id": {"$in": stale}}, {"epoch": 1})
            async for doc in cursor:
                if int(doc["epoch"]) > fences[doc["_id"]]:
                    cid = doc["_id"]
                    self._fenced.pop(cid, None)
                    raise StoreConflict(cid, f"{cid}: fenced, epoch {fences[cid]} is stale")
        if len(self._fenced) > 10_000:  # only the recent ones are of use
            self._fenced = {c: v for c, v in self._fenced.items() if now - v[1] < FENCE_FRESH_S}
        for cid in stale:
            self._fenced[cid] = (fences[cid], now)

    async def write(self, batch: WriteBatch) -> None:
        """Events, then webhook deliveries, then runs, then conversations, then
        transcripts: a reader that sees a run or a head also finds the events (and the
        deliveries) behind it."""
        if batch.fences:
            await self._check_fences(batch.fences, batch.made)
        if batch.events:
            await self._insert_events(pack(batch.events))
        if batch.deliveries:  # before the runs: see docs/webhooks.md, "Durability"
            await self._write_deliveries(batch.deliveries)
        if batch.runs:
            await self._write_runs(batch.runs)
        if batch.conversations:
            await self._write_conversations(batch.conversations)
        if batch.turns:
            await self._write_turns(batch.turns)

    async def _insert_events(self, docs: list[Document]) -> None:
        pending = docs
        while pending:
            with _errors("insert events"):
                try:
                    await self._events.insert_many(pending, ordered=True)
                    return
                except BulkWriteError as exc:
                    errors = exc.details.get("writeErrors") or []
                    if not errors or errors[0].get("code") != DUPLICATE_KEY:
                        raise
                    pending = await self._not_stored(pending[errors[0].get("index", 0) :])

    async def _not_stored(self, docs: list[Document]) -> list[Document]:
        """`docs` (the first of which hit a duplicate key) less the events an earlier
        try already stored, however that try packed them: a document partly stored
        is cut to its events not yet stored. An offset stored with another event, or a
        duplicate client_msg_id at a new offset, is a conflict, not a retry: StoreError."""
        ranges: dict[str, tuple[int, int]] = {}
        for doc in docs:
            lo, hi = ranges.get(doc["conversation_id"], (doc["offset"], doc["last"]))
            ranges[doc["conversation_id"]] = (min(lo, doc["offset"]), max(hi, doc["last"]))
        stored: dict[tuple[str, int], str] = {}
        for cid, (lo, hi) in ranges.items():
            cursor = self._events.find(
                {"conversation_id": cid, "last": {"$gte": lo}, "offset": {"$lte": hi}},
                {"_id": 0, "offset": 1, "payloads": 1},
            )
            async for doc in cursor:
                for index, payload in enumerate(doc["payloads"]):
                    stored[(cid, doc["offset"] + index)] = payload
        first = docs[0]
        if (first["conversation_id"], first["offset"]) not in stored:
            raise StoreConflict(
                first["conversation_id"],
                f"{first['conversation_id']}: client_msg_id {first.get('client_msg_id')!r} "
                f"is already stored at another offset than {first['offset']}",
            )
        rest: list[Document] = []
        for doc in docs:
            cid, piece = doc["conversation_id"], None
            for index, payload in enumerate(doc["payloads"]):
                offset = doc["offset"] + index
                before = stored.get((cid, offset))
                if before is None:
                    if piece is None:
                        piece = {k: v for k, v in doc.items() if k != "_id"}
                        piece.update(offset=offset, payloads=[])
                        rest.append(piece)
                    piece["last"] = offset
                    piece["payloads"].append(payload)
                    continue
                if before != payload:
                    raise StoreConflict(
                        cid, f"{cid}: offset {offset} is already stored with another event"
                    )
                piece = None
        return rest

    async def _write_runs(self, runs: list[dict[str, Any]]) -> None:
        heartbeat = time.time_ns() // 1_000_000
        last = {run["run_id"]: run for run in runs}  # the same run twice: the last wins
        # $set of every field, not a replacement: nx-27017's upserting replace ignores
        # the filter's _id. A run document always has the same fields, so it is the same.
        ops = [
            UpdateOne(
                {"_id": run_id},
                {"$set": {**run, "heartbeat": heartbeat}},
                upsert=True,
            )
            for run_id, run in last.items()
        ]
        with _errors("write runs"):
            await self._runs.bulk_write(ops, ordered=True)

    async def _write_conversations(self, conversations: list[ConversationRecord]) -> None:
        last: dict[str, ConversationRecord] = {}
        head: dict[str, int] = {}
        for conv in conversations:
            last[conv.conversation_id] = conv
            head[conv.conversation_id] = max(head.get(conv.conversation_id, 0), conv.head)
        ops = [
            UpdateOne(
                {"_id": cid},
                {
                    "$max": {"head": head[cid]},  # never backwards, even on a stale retry
                    "$set": {
                        "conversation_id": cid,
                        "last_activity": conv.last_activity,
                        "runner": conv.runner,
                        "active_run": conv.active_run,
                    },
                },
                upsert=True,
            )
            for cid, conv in last.items()
        ]
        with _errors("write conversations"):
            await self._conversations.bulk_write(ops, ordered=True)

    async def _write_turns(self, turns: list[TurnRecord]) -> None:
        ops = [
            UpdateOne(
                {"_id": f"{turn.conversation_id}:{turn.message_id}"},
                {
                    "$setOnInsert": {  # a turn is written once: the first write wins
                        "conversation_id": turn.conversation_id,
                        "offset": turn.offset,
                        **turn.document(),
                    }
                },
                upsert=True,
            )
            for turn in turns
        ]
        with _errors("write transcripts"):
            await self._transcripts.bulk_write(ops, ordered=True)

    async def _write_deliveries(self, deliveries: list[DeliveryRecord]) -> None:
        # written once: a retried batch leaves a delivery sent meanwhile as it is
        ops = [
            UpdateOne({"_id": d.id}, {"$setOnInsert": d.document()}, upsert=True)
            for d in deliveries
        ]
        with _errors("write deliveries"):
            await self._deliveries.bulk_write(ops, ordered=True)

    # reads

    async def ping(self) -> None:
        with _errors("ping"):
            await self.client.admin.command("ping")

    async def get_conversation(self, conversation_id: str) -> ConversationRecord | None:
        with _errors("get conversation"):
            doc = await self._conversations.find_one({"_id": conversation_id})
        return None if doc is None else _conversation(doc)

    async def last_offset(self, conversation_id: str) -> int:
        with _errors("last offset"):
            doc = await self._events.find_one(
                {"conversation_id": conversation_id},
                {"_id": 0, "last": 1},
                sort=[("offset", DESCENDING)],
            )
        return 0 if doc is None else int(doc["last"])

    async def read_events(self, conversation_id: str, after: int, limit: int) -> list[str]:
        if limit <= 0:
            return []  # limit(0) means "no limit" to MongoDB
        out: list[str] = []
        with _errors("read events"):
            # each document holds at least one event: `limit` documents are enough
            cursor = (
                self._events.find(
                    {"conversation_id": conversation_id, "last": {"$gt": after}},
                    {"_id": 0, "offset": 1, "payloads": 1},
                )
                .sort("last", ASCENDING)
                .limit(limit)
            )
            async for doc in cursor:
                out.extend(_payloads([doc], after))
                if len(out) >= limit:
                    break
            await cursor.close()
        return out[:limit]

    async def read_pages(
        self, conversation_ids: Sequence[str], after: int, limit: int
    ) -> dict[str, list[str]]:
        found: dict[str, list[Document]] = {cid: [] for cid in conversation_ids}
        if limit <= 0 or not found:
            return {cid: [] for cid in found}
        after = max(after, 0)  # as read_events: from the first event
        with _errors("read pages"):
            # One find for them all: nx-27017 spends ~13 ms of CPU per find, whatever it
            # returns. `$in`, not an `$or` of one filter per conversation (slow on
            # nx-27017), and no sort (nx-27017 sorts slowly): ordered here instead. The
            # documents wanted end past `after` (`last`) and start inside the page
            # (`offset`). On MongoDB that is the (conversation_id, last) index, bounds
            # [ids] x (after, inf], `offset` checked on each document: for a page at a
            # conversation's head (a reconnect's usual page) every key it walks matches,
            # so the planner's trial picks it over (conversation_id, offset), whose
            # bounds start at each conversation's first event.
            cursor = self._events.find(
                {
                    "conversation_id": {"$in": list(found)},
                    "last": {"$gt": after},
                    "offset": {"$lte": after + limit},
                },
                {"_id": 0, "conversation_id": 1, "offset": 1, "payloads": 1},
            )
            async for doc in cursor:
                found[doc["conversation_id"]].append(doc)
        return {
            cid: list(
                itertools.islice(_payloads(sorted(docs, key=itemgetter("offset")), after), limit)
            )
            for cid, docs in found.items()
        }

    async def find_client_message(self, conversation_id: str, client_msg_id: str) -> str | None:
        with _errors("find client message"):
            doc = await self._events.find_one(
                {"client_key": client_key(conversation_id, client_msg_id)},
                {"_id": 0, "payloads": 1},
            )
        return None if doc is None else str(doc["payloads"][0])

    async def transcript(
        self, conversation_id: str, limit: int | None = None, before: int | None = None
    ) -> list[TurnRecord]:
        if limit is not None and limit <= 0:
            return []  # limit(0) means "no limit" to MongoDB
        query: Document = {"conversation_id": conversation_id}
        if before is not None:
            query["offset"] = {"$lt": before}
        with _errors("transcript"):
            cursor = self._transcripts.find(query)
            if limit is None:
                cursor = cursor.sort("offset", ASCENDING)
            else:  # the newest page, read backwards along the index, then turned round
                cursor = cursor.sort("offset", DESCENDING).limit(limit)
            turns = [
                TurnRecord(
                    conversation_id=doc["conversation_id"],
                    role=doc["role"],
                    content=doc["content"],
                    message_id=doc["message_id"],
                    run_id=doc["run_id"],
                    ts=doc["ts"],
                    offset=doc["offset"],
                )
                async for doc in cursor
            ]
        return turns if limit is None else turns[::-1]

    async def list_conversations(
        self, limit: int, before: tuple[int, str] | None, only: ConversationFilter | None = None
    ) -> list[ConversationRecord]:
        if limit <= 0:
            return []
        clauses: list[Document] = []
        if before is not None:
            activity, cid = before
            clauses.append(
                {
                    "$or": [
                        {"last_activity": {"$lt": activity}},
                        {"last_activity": activity, "conversation_id": {"$lt": cid}},
                    ]
                }
            )
        if only is not None:
            # exact ids by `$in` (the index), patterns by one anchored `$regex`
            matching: list[Document] = [{"conversation_id": {"$in": list(only.ids)}}]
            if only.regex is not None:
                matching.append({"conversation_id": {"$regex": only.regex}})
            clauses.append({"$or": matching})
        query: Document = {"$and": clauses} if clauses else {}
        with _errors("list conversations"):
            cursor = (
                self._conversations.find(query)
                .sort([("last_activity", DESCENDING), ("conversation_id", DESCENDING)])
                .limit(limit)
            )
            return [_conversation(doc) async for doc in cursor]

    async def get_run(self, run_id: str) -> dict[str, Any] | None:
        with _errors("get run"):
            return await self._runs.find_one({"_id": run_id}, RUN_EXTRAS)

    async def list_runs(
        self, status: str | None, conversation_id: str | None, limit: int, before: str | None
    ) -> list[dict[str, Any]]:
        if limit <= 0:
            return []
        query: Document = {}
        if status is not None:
            query["status"] = status
        if conversation_id is not None:
            query["conversation_id"] = conversation_id
        if before is not None:
            query["run_id"] = {"$lt": before}
        with _errors("list runs"):
            cursor = self._runs.find(query, RUN_EXTRAS).sort("run_id", DESCENDING).limit(limit)
            return [doc async for doc in cursor]

    async def live_runs(self, conversation_id: str | None) -> list[dict[str, Any]]:
        query: Document = {"status": {"$in": LIVE}}
        if conversation_id is not None:
            query["conversation_id"] = conversation_id
        with _errors("live runs"):
            cursor = self._runs.find(query, RUN_EXTRAS).sort("run_id", ASCENDING)
            return [doc async for doc in cursor]

    async def run_events(self, conversation_id: str, run_id: str) -> list[str]:
        with _errors("run events"):
            cursor = self._events.find(
                {"conversation_id": conversation_id, "run_id": run_id},
                {"_id": 0, "offset": 1, "payloads": 1},
            ).sort("offset", ASCENDING)
            return list(_payloads([doc async for doc in cursor]))

    # webhook deliveries

    async def due_deliveries(self, now: int, limit: int) -> list[dict[str, Any]]:
        if limit <= 0:
            return []
        with _errors("due deliveries"):
            cursor = (
                self._deliveries.find({"status": "pending", "next_at": {"$lte": now}})
                .sort("next_at", ASCENDING)
                .limit(limit)
            )
            return [doc async for doc in cursor]

    def _queue(self, endpoint: str, conversation_id: str, after: int) -> Document:
        return {
            "endpoint": endpoint,
            "conversation_id": conversation_id,
            "status": "pending",
            "offset": {"$gt": after},
        }

    async def delivery_head(self, endpoint: str, conversation_id: str) -> dict[str, Any] | None:
        with _errors("delivery head"):
            return await self._deliveries.find_one(
                self._queue(endpoint, conversation_id, -1), sort=[("offset", ASCENDING)]
            )

    async def claim_delivery(
        self, delivery_id: str, owner: str, now: int, lease_until: int
    ) -> dict[str, Any] | None:
        with _errors("claim delivery"):
            return await self._deliveries.find_one_and_update(
                {"_id": delivery_id, "status": "pending", "lease_until": {"$lte": now}},
                {"$set": {"owner": owner, "lease_until": lease_until}},
                return_document=ReturnDocument.AFTER,
            )

    async def settle_delivery(self, delivery_id: str, owner: str, changes: dict[str, Any]) -> bool:
        with _errors("settle delivery"):
            result = await self._deliveries.update_one(
                {"_id": delivery_id, "owner": owner},
                {"$set": {**changes, "lease_until": 0, "owner": None}},
            )
        return result.matched_count == 1

    async def hold_deliveries(
        self, endpoint: str, conversation_id: str, after: int, until: int
    ) -> None:
        with _errors("hold deliveries"):
            await self._deliveries.update_many(
                self._queue(endpoint, conversation_id, after), {"$max": {"next_at": until}}
            )

    async def wake_deliveries(
        self, endpoint: str, conversation_id: str, after: int, now: int
    ) -> None:
        with _errors("wake deliveries"):
            await self._deliveries.update_many(
                self._queue(endpoint, conversation_id, after), {"$min": {"next_at": now}}
            )

    async def list_deliveries(
        self, endpoint: str, limit: int, status: str | None = None
    ) -> list[dict[str, Any]]:
        if limit <= 0:
            return []
        query: Document = {"endpoint": endpoint}
        if status is not None:
            query["status"] = status
        with _errors("list deliveries"):
            cursor = (
                self._deliveries.find(query)
                .sort([("created", DESCENDING), ("_id", DESCENDING)])
                .limit(limit)
            )
            return [doc async for doc in cursor]

    async def replay_delivery(self, delivery_id: str, now: int) -> dict[str, Any] | None:
        with _errors("replay delivery"):
            return await self._deliveries.find_one_and_update(
                {"_id": delivery_id},
                {
                    "$set": {
                        "status": "pending",
                        "next_at": now,
                        "since": now,
                        "lease_until": 0,
                        "owner": None,
                    }
                },
                return_document=ReturnDocument.AFTER,
            )

    async def close(self) -> None:
        with _errors("close"):
            await self.client.close()
