"""One Store suite over every backend: the memory store, nx-27017, mongoeco, and a real
MongoDB when STEERWAY_MONGODB_URI is set.  Each server is started here on a free port
and stopped by its pid; each test gets a database of its own.  Then the embedded
launcher: restarts, `kill -9` and its stale pid file, a gateway that dies.

mongoeco needs Python 3.13: `make mongoeco` makes `.venv-mongoeco` (the
`pytest` target does it first); STEERWAY_MONGOECO_PYTHON names another interpreter.
Without one, its tests are skipped, except under CI where that is a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from store import embedded
from store.base import (
    ConversationFilter,
    ConversationRecord,
    DeliveryRecord,
    EventRecord,
    Store,
    StoreConflict,
    StoreError,
    TurnRecord,
    WriteBatch,
)
from store.embedded import EmbeddedMongo, EmbeddedMongoError, free_port
from store.memory import MemoryStore
from store.mongo import INDEXES, PACK_BYTES, PACK_EVENTS, MongoStore, pack
from tests.processes import alive

ROOT = Path(__file__).resolve().parent.parent
MONGOECO_SERVER = ROOT / "tests" / "mongoeco_server.py"
TIMEOUT = 20.0
OUTAGE_WITHIN = 8.0  # a call on a dead server fails in about serverSelectionTimeoutMS (2 s)

T = TypeVar("T")

# PyMongo (4.20 and before, PYTHON-5867) does not close the socket of a connection
# attempt that a client's close() cancels: a client closed while its monitor retries
# a dead server (the outage and unreachable tests) can leave one unconnected socket
# to the garbage collector, which warns. Collect after each test, so it is warned
# here, and let only that warning pass: an unconnected socket to 127.0.0.1, no peer.
pytestmark = pytest.mark.filterwarnings(
    r"ignore:Exception ignored in. <socket\.socket fd=\d+, family=2, type=1, proto=6, "
    r"laddr=\('127\.0\.0\.1', \d+\)>:pytest.PytestUnraisableExceptionWarning"
)


@pytest.fixture(autouse=True)
def _collect_garbage() -> Iterator[None]:
    yield
    gc.collect()


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on a private loop, for session fixtures: no current loop is set
    or reset, and the calling (main) thread forks the servers."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()


# servers


@dataclass
class Process:
    """A server child process, stopped by its pid."""

    popen: subprocess.Popen[bytes]
    uri: str

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.popen.pid, signal.SIGKILL)
                self.popen.wait(10)
        if self.popen.stdout is not None:
            self.popen.stdout.close()


def mongoeco_python() -> str:
    name = os.environ.get("STEERWAY_MONGOECO_PYTHON") or str(
        ROOT / ".venv-mongoeco" / "bin" / "python"
    )
    found = shutil.which(name)
    if found is None:
        message = f"no Python with mongoeco at {name}: run `make mongoeco`"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def start_mongoeco(directory: Path) -> Process:
    """tests/mongoeco_server.py on a free port; it prints `listening <port>` when ready."""
    python = mongoeco_python()
    log = directory / "mongoeco.err"
    with log.open("wb") as err:
        popen = subprocess.Popen(
            [python, str(MONGOECO_SERVER), "--port", "0"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
        )
    assert popen.stdout is not None
    line = b""
    deadline = time.monotonic() + TIMEOUT
    try:
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            ready, _, _ = select.select([popen.stdout], [], [], max(left, 0))
            chunk = os.read(popen.stdout.fileno(), 256) if ready else b""
            if not chunk:
                raise RuntimeError(
                    f"mongoeco did not start: {line!r}\n{log.read_text(errors='replace')}"
                )
            line += chunk
        kind, port = line.decode().split()
        assert kind == "listening", line
    except BaseException:
        Process(popen, "").stop()
        raise
    return Process(popen, f"mongodb://127.0.0.1:{int(port)}/?directConnection=true")


@pytest.fixture(scope="session")
def nx_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    mongo = run_sync(EmbeddedMongo.start(tmp_path_factory.mktemp("nx")))
    try:
        yield mongo.uri
    finally:
        run_sync(mongo.stop())


@pytest.fixture(scope="session")
def mongoeco_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = start_mongoeco(tmp_path_factory.mktemp("mongoeco"))
    try:
        yield server.uri
    finally:
        server.stop()


@pytest.fixture(scope="session")
def mongodb_uri() -> str:
    uri = os.environ.get("STEERWAY_MONGODB_URI")
    if not uri:
        pytest.skip("STEERWAY_MONGODB_URI is not set")
    return uri


@dataclass
class Backend:
    kind: str  # memory, nx, mongoeco or mongodb
    uri: str | None  # of its server; None for the memory store


@pytest.fixture(params=["memory", "nx", "mongoeco", "mongodb"])
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "memory":
        return Backend("memory", None)
    return Backend(request.param, request.getfixturevalue(f"{request.param}_uri"))


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[Store]:
    if backend.uri is None:
        yield MemoryStore()
        return
    mongo = await MongoStore.open(backend.uri, f"steerway_test_{uuid.uuid4().hex[:12]}")
    try:
        yield mongo
    finally:
        with contextlib.suppress(StoreError):
            await mongo.client.drop_database(mongo.db.name)
        await mongo.close()


# records


def payload(cid: str, offset: int, **fields: Any) -> str:
    # unsorted keys, non-ASCII and escapes: a payload comes back byte for byte
    return orjson.dumps(
        {"type": "x", "offset": offset, "conversation_id": cid, "text": 'é "✓"\n\\', **fields}
    ).decode()


def event(cid: str, offset: int, *, run: str | None = None, key: str | None = None) -> EventRecord:
    kind = "user.message" if key else "x"
    return EventRecord(cid, offset, kind, 1000 + offset, payload(cid, offset, run=run), run, key)


def run_doc(run_id: str, cid: str, status: str = "running", **fields: Any) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "conversation_id": cid,
        "runner": "echo",
        "status": status,
        "reason": None,
        "error": None,
        "trigger_message_ids": ["msg_1", "msg_2"],
        "created_at": 1_700_000_000_000,
        "started_at": None,
        "ended_at": None,
        "usage": {"input_tokens": 3, "cost": 0.25},
        "steering": {"queued": 1, "absorbed": 0, "dropped": 0},
        **fields,
    }


def conv(cid: str, head: int, last_activity: int, **fields: Any) -> ConversationRecord:
    return ConversationRecord(cid, head, last_activity, **fields)


def turn(cid: str, message_id: str, offset: int, content: str = "hi") -> TurnRecord:
    role = "user" if message_id.startswith("u") else "assistant"
    return TurnRecord(cid, role, content, message_id, "run_1", 1000 + offset, offset)


def payloads(events: list[EventRecord]) -> list[str]:
    return [ev.payload for ev in events]


async def count(store: Store, collection: str) -> int | None:
    """Documents in a collection of a MongoStore (None for the memory store)."""
    if not isinstance(store, MongoStore):
        return None
    return await store.db[collection].count_documents({})


# packing events into documents (pure)


@st.composite
def event_runs(draw: st.DrawFn) -> list[EventRecord]:
    """Events of two conversations, interleaved, with runs, keys and big payloads."""
    heads = {"c1": 0, "c2": 0}
    out = []
    for cid, run, kind, size in draw(
        st.lists(
            st.tuples(
                st.sampled_from(["c1", "c2"]),
                st.sampled_from([None, "run_1", "run_2"]),
                st.sampled_from(["plain", "plain", "plain", "key"]),
                st.sampled_from([1, 10, PACK_BYTES // 3]),
            ),
            max_size=600,
        )
    ):
        heads[cid] += 1
        key = f"k{heads[cid]}" if kind == "key" else None
        out.append(EventRecord(cid, heads[cid], "x", 1, "p" * size, run, key))
    return out


@given(event_runs())
def test_pack_keeps_every_event_in_order(events: list[EventRecord]) -> None:
    docs = pack(events)
    assert pack(events) == docs  # a retry packs alike
    flat = [
        (doc["conversation_id"], doc["offset"] + i, doc["run_id"], p)
        for doc in docs
        for i, p in enumerate(doc["payloads"])
    ]
    assert flat == [(ev.conversation_id, ev.offset, ev.run_id, ev.payload) for ev in events]
    for doc in docs:
        assert doc["last"] - doc["offset"] + 1 == len(doc["payloads"]) <= PACK_EVENTS
        assert len(doc["payloads"]) == 1 or sum(map(len, doc["payloads"])) <= PACK_BYTES
        assert ("client_key" in doc) == ("client_msg_id" in doc)
        if "client_key" in doc:  # the idempotency key's event is always alone
            assert len(doc["payloads"]) == 1
    # nothing that could share a document is split without a reason
    for a, b in itertools.pairwise(docs):
        mergeable = (
            a["conversation_id"] == b["conversation_id"]
            and a["run_id"] == b["run_id"]
            and a["last"] + 1 == b["offset"]
            and "client_key" not in a
            and "client_key" not in b
        )
        full = len(a["payloads"]) == PACK_EVENTS or (
            sum(map(len, a["payloads"])) + len(b["payloads"][0]) > PACK_BYTES
        )
        assert not mergeable or full


# the suite


async def test_empty_store(store: Store) -> None:
    await store.ping()
    assert await store.get_conversation("c1") is None
    assert await store.last_offset("c1") == 0
    assert await store.read_events("c1", 0, 10) == []
    assert await store.find_client_message("c1", "k1") is None
    assert await store.transcript("c1") == []
    assert await store.list_conversations(10, None) == []
    assert await store.get_run("run_1") is None
    assert await store.list_runs(None, None, 10, None) == []
    assert await store.live_runs(None) == []
    assert await store.run_events("c1", "run_1") == []
    await store.write(WriteBatch())  # an empty batch is a no-op


async def test_events(store: Store) -> None:
    c1 = [event("c1", n, run="run_1" if n % 2 else None) for n in range(1, 8)]
    c2 = [event("c2", n, run="run_2") for n in range(1, 4)]
    await store.write(WriteBatch(events=c1[:3] + c2))
    await store.write(WriteBatch(events=c1[3:]))
    assert await store.read_events("c1", 0, 100) == payloads(c1)
    assert await store.read_events("c1", 2, 3) == payloads(c1[2:5])
    assert await store.read_events("c1", 6, 100) == payloads(c1[6:])
    assert await store.read_events("c1", 7, 100) == []
    assert await store.read_events("c1", 50, 100) == []
    assert await store.read_events("c1", -5, 2) == payloads(c1[:2])
    assert await store.read_events("c1", 0, 0) == []
    assert await store.read_events("c2", 0, 100) == payloads(c2)
    assert await store.last_offset("c1") == 7
    assert await store.last_offset("c2") == 3
    assert await store.last_offset("c3") == 0
    assert await store.run_events("c1", "run_1") == payloads(c1[0::2])
    assert await store.run_events("c2", "run_2") == payloads(c2)
    assert await store.run_events("c1", "run_2") == []
    # c2's three events of one run, written together, are one document
    assert await count(store, "events") in (None, 8)


async def test_rewriting_a_batch_stores_nothing_twice(store: Store) -> None:
    events = [event("c1", 1, key="k1"), event("c1", 2, run="run_1"), event("c2", 1, key="k1")]
    batch = WriteBatch(
        events=events,
        runs=[run_doc("run_1", "c1")],
        conversations=[conv("c1", 2, 500), conv("c2", 1, 400)],
        turns=[turn("c1", "u1", 1), turn("c2", "u2", 1)],
    )
    for _ in range(3):
        await store.write(batch)
    assert await store.read_events("c1", 0, 100) == payloads(events[:2])
    assert await store.read_events("c2", 0, 100) == payloads(events[2:])
    assert await store.run_events("c1", "run_1") == [events[1].payload]
    assert await store.find_client_message("c1", "k1") == events[0].payload
    assert await store.list_runs(None, None, 10, None) == [run_doc("run_1", "c1")]
    assert await store.list_conversations(10, None) == [conv("c1", 2, 500), conv("c2", 1, 400)]
    assert await store.transcript("c1") == [turn("c1", "u1", 1)]
    assert [await count(store, c) for c in INDEXES] in ([None] * 6, [3, 1, 2, 2, 0, 0])


@pytest.mark.parametrize("written", ["prefix", "one conversation", "all events"])
async def test_a_partial_batch_is_completed_by_its_retry(store: Store, written: str) -> None:
    """A failure after part of a batch was stored: the retry of the same batch stores
    the rest, nothing twice, with no gap."""
    c1 = [event("c1", n, run="run_1", key=f"k{n}") for n in range(1, 5)]
    c2 = [event("c2", n) for n in range(1, 4)]
    interleaved = [c1[0], c2[0], c1[1], c2[1], c1[2], c2[2], c1[3]]
    batch = WriteBatch(
        events=interleaved,
        runs=[run_doc("run_1", "c1")],
        conversations=[conv("c1", 4, 900), conv("c2", 3, 800)],
        turns=[turn("c1", "u1", 1)],
    )
    done = {"prefix": interleaved[:3], "one conversation": c2, "all events": interleaved}
    await store.write(WriteBatch(events=done[written]))
    await store.write(batch)
    await store.write(batch)
    assert await store.read_events("c1", 0, 100) == payloads(c1)
    assert await store.read_events("c2", 0, 100) == payloads(c2)
    assert await store.last_offset("c1") == 4
    assert await store.run_events("c1", "run_1") == payloads(c1)
    assert [await store.find_client_message("c1", f"k{n}") for n in range(1, 5)] == payloads(c1)
    assert await store.get_run("run_1") == run_doc("run_1", "c1")
    assert await store.get_conversation("c2") == conv("c2", 3, 800)
    # the retry cuts what was stored as one document out of its own, packed otherwise
    assert await count(store, "events") in (None, 5 if written == "one conversation" else 7)


async def test_packed_events_read_back_at_every_cursor(store: Store) -> None:
    """One run's 600 events in one batch are three documents on MongoDB (256, 256, 88);
    every read is the same as one event per document would give."""
    key = event("c1", 1, key="k1")
    streamed = [event("c1", n, run="run_1") for n in range(2, 602)]
    everything = [key, *streamed]
    await store.write(WriteBatch(events=everything))
    assert await count(store, "events") in (None, 4)
    assert await store.last_offset("c1") == 601
    assert await store.run_events("c1", "run_1") == payloads(streamed)
    assert await store.find_client_message("c1", "k1") == key.payload
    for after in (0, 1, 2, 200, 256, 257, 258, 513, 514, 600, 601, 700):
        for limit in (1, 7, 256, 1000):
            want = payloads(everything[after : after + limit])
            assert await store.read_events("c1", after, limit) == want, (after, limit)


async def test_pages_of_many_conversations_in_one_read(store: Store) -> None:
    """`read_pages` gives each conversation what `read_events` gives it: packed documents
    cut at `after` and at `limit`, conversations of every length, none for one unknown."""
    logs = {
        "a": [event("a", 1, key="k1"), *(event("a", n, run="run_1") for n in range(2, 602))],
        "b": [event("b", n, key=f"k{n}") for n in range(1, 6)],
        "c": [event("c", n, run="run_2") for n in range(1, 300)],
    }
    # written interleaved: a conversation's documents are not stored together
    await store.write(WriteBatch(events=logs["a"][:300] + logs["b"][:2]))
    await store.write(WriteBatch(events=logs["c"][:150] + logs["b"][2:]))
    await store.write(WriteBatch(events=logs["a"][300:] + logs["c"][150:]))
    # a: 1, 256, 43, 256, 45 events; b: 1 each (keys); c: 150, 149
    assert await count(store, "events") in (None, 12)
    ids = ["c", "nobody", "a", "b", "a"]  # a duplicate is read once
    for after in (-3, 0, 1, 2, 5, 200, 256, 257, 258, 299, 300, 513, 600, 601, 700):
        for limit in (1, 7, 256, 500):
            want = {
                cid: payloads(logs.get(cid, [])[max(after, 0) : max(after, 0) + limit])
                for cid in ids
            }
            assert await store.read_pages(ids, after, limit) == want, (after, limit)
    assert await store.read_pages(ids, 0, 0) == {cid: [] for cid in ids}
    assert await store.read_pages([], 0, 10) == {}


@pytest.mark.parametrize("sizes", [[1, 1, 1, 1, 1], [3, 9], [4, 4, 4, 3], [20]])
async def test_a_retry_packed_otherwise_stores_each_event_once(
    store: Store, sizes: list[int]
) -> None:
    """Whatever prefix of a run an earlier try stored, however it was packed, the retry
    stores only the rest; an offset stored with another event is a conflict."""
    events = [event("c1", n, run="run_1") for n in range(1, 21)]
    start = 0
    for size in sizes:
        await store.write(WriteBatch(events=events[start : start + size]))
        start += size
    await store.write(WriteBatch(events=events))
    assert await store.read_events("c1", 0, 100) == payloads(events)
    assert await store.last_offset("c1") == 20
    assert await store.run_events("c1", "run_1") == payloads(events)
    changed = EventRecord("c1", 21, "x", 5, payload("c1", 21))
    await store.write(WriteBatch(events=[changed]))
    other = EventRecord("c1", 21, "x", 5, payload("c1", 21, other=True))
    with pytest.raises(StoreError, match="offset 21"):
        await store.write(WriteBatch(events=[event("c1", 20, run="run_1"), other]))


async def test_an_offset_is_never_overwritten(store: Store) -> None:
    first = event("c1", 1)
    await store.write(WriteBatch(events=[first]))
    other = EventRecord("c1", 1, "x", 5, payload("c1", 1, other=True))
    with pytest.raises(StoreError):
        await store.write(WriteBatch(events=[other, event("c1", 2)]))
    assert await store.read_events("c1", 0, 100) == [first.payload]


async def test_a_conflict_is_a_store_conflict_naming_the_conversation(store: Store) -> None:
    await store.write(WriteBatch(events=[event("c1", 1)]))
    other = EventRecord("c1", 1, "x", 5, payload("c1", 1, other=True))
    with pytest.raises(StoreConflict) as raised:
        await store.write(WriteBatch(events=[other]))
    assert raised.value.conversation_id == "c1"


async def test_fences_refuse_a_writer_whose_epoch_is_stale(store: Store) -> None:
    """Cluster mode (issue 12, item 2): each take-over claims a new epoch; a batch fenced
    with an older one is refused whole, and a conversation no one claimed is open."""
    assert await store.claim("c1") == 1
    assert await store.claim("c1") == 2
    assert await store.claim("c2") == 1
    await store.write(WriteBatch(events=[event("c1", 1)], fences={"c1": 2}))
    stale = WriteBatch(events=[event("c1", 2)], runs=[run_doc("run_9", "c1")], fences={"c1": 1})
    with pytest.raises(StoreConflict) as raised:
        await store.write(stale)
    assert raised.value.conversation_id == "c1"
    assert await store.read_events("c1", 0, 10) == [event("c1", 1).payload]
    assert await store.get_run("run_9") is None  # nothing of the refused batch
    await store.write(WriteBatch(events=[event("c3", 1)], fences={"c3": 7}))  # unclaimed
    assert await store.last_offset("c3") == 1


async def test_a_fence_read_a_moment_ago_is_not_relied_on_for_an_old_batch(
    store: Store,
) -> None:
    """A store may skip re-reading a fence it read a moment ago, but only for a batch made
    a moment ago: a batch that waited is checked against the fence as it is now."""
    assert await store.claim("c1") == 1
    await store.write(WriteBatch(events=[event("c1", 1)], fences={"c1": 1}))
    assert await store.claim("c1") == 2  # another node took the conversation over
    waited = WriteBatch(events=[event("c1", 2)], fences={"c1": 1})
    waited.made -= 1.0  # it waited a second in the writer's queue
    with pytest.raises(StoreConflict):
        await store.write(waited)
    assert await store.last_offset("c1") == 1


async def test_client_msg_id(store: Store) -> None:
    # without a key, any number of events (the sparse index skips them)
    plain = [event("c1", n) for n in range(1, 6)]
    keyed = [event("c1", 6, key="k1"), event("c1", 7, key="k2"), event("c2", 1, key="k1")]
    await store.write(WriteBatch(events=plain + keyed))
    await store.write(WriteBatch(events=[event("c2", 2), event("c2", 3)]))
    assert await store.find_client_message("c1", "k1") == keyed[0].payload
    assert await store.find_client_message("c1", "k2") == keyed[1].payload
    assert await store.find_client_message("c2", "k1") == keyed[2].payload  # per conversation
    assert await store.find_client_message("c2", "k2") is None
    assert await store.find_client_message("c3", "k1") is None
    if isinstance(store, MongoStore):  # absent, not null, where there is no key
        doc = await store.db["events"].find_one({"conversation_id": "c1", "offset": 1})
        assert doc is not None
        assert "client_msg_id" not in doc
        assert "client_key" not in doc
        doc = await store.db["events"].find_one({"conversation_id": "c1", "offset": 6})
        assert doc is not None
        assert doc["client_msg_id"] == "k1"

    # a key is unique in its conversation: the database refuses it at another offset
    again = event("c1", 9, key="k1")
    with pytest.raises(StoreError, match="client_msg_id"):
        await store.write(WriteBatch(events=[event("c1", 8), again]))
    assert await store.last_offset("c1") == 8  # what came before it is stored, no gap
    assert await store.find_client_message("c1", "k1") == keyed[0].payload


async def test_runs(store: Store) -> None:
    run = run_doc("run_1", "c1", status="queued", node="node-a")
    await store.write(WriteBatch(runs=[run]))
    # equal, not in the same field order: MongoDB's $set applies fields in name order;
    # the node that runs it is part of the document (the dashboard names it)
    assert await store.get_run("run_1") == run
    assert await store.list_runs(None, None, 10, None) == [run]
    assert await store.live_runs("c1") == [run]
    if isinstance(store, MongoStore):
        raw = await store.db["runs"].find_one({"_id": "run_1"})
        assert raw is not None
        assert abs(raw["heartbeat"] - time.time() * 1000) < 60_000

    ended = run_doc(
        "run_1",
        "c1",
        status="failed",
        reason="gateway_restart",
        error={"code": "internal", "message": "é"},
        ended_at=1_700_000_000_500,
        usage={"input_tokens": 3, "output_tokens": 7, "cost": 0.5},
        node="node-b",
    )
    # the same run twice in one batch: the last one wins (taken over by another node)
    await store.write(WriteBatch(runs=[run, ended]))
    assert await store.get_run("run_1") == ended
    assert await store.get_run("run_2") is None


async def test_list_runs_pages_newest_first(store: Store) -> None:
    statuses = ["completed", "running", "queued", "failed", "completed", "queued", "cancelled"]
    runs = [
        run_doc(f"run_{n:03d}", "c1" if n % 2 else "c2", status=status)
        for n, status in enumerate(statuses)
    ]
    await store.write(WriteBatch(runs=runs[3:]))
    await store.write(WriteBatch(runs=runs[:3]))
    newest = runs[::-1]
    assert await store.list_runs(None, None, 100, None) == newest
    pages, before = [], None
    while page := await store.list_runs(None, None, 3, before):
        pages.append(page)
        before = page[-1]["run_id"]
    assert pages == [newest[:3], newest[3:6], newest[6:]]
    assert await store.list_runs("completed", None, 100, None) == [runs[4], runs[0]]
    assert await store.list_runs("queued", None, 1, None) == [runs[5]]
    assert await store.list_runs("queued", None, 1, "run_005") == [runs[2]]
    assert await store.list_runs(None, "c1", 100, None) == [runs[5], runs[3], runs[1]]
    assert await store.list_runs(None, "c1", 2, "run_005") == [runs[3], runs[1]]
    assert await store.list_runs("queued", "c2", 100, None) == [runs[2]]
    assert await store.list_runs("queued", "c3", 100, None) == []
    assert await store.list_runs(None, None, 0, None) == []
    assert await store.list_runs(None, None, 10, "run_000") == []


async def test_live_runs_and_their_events(store: Store) -> None:
    runs = [
        run_doc("run_1", "c1", status="completed"),
        run_doc("run_2", "c1", status="running"),
        run_doc("run_3", "c2", status="queued"),
        run_doc("run_4", "c1", status="queued"),
        run_doc("run_5", "c2", status="timeout"),
    ]
    await store.write(WriteBatch(runs=runs[::-1]))
    assert await store.live_runs(None) == [runs[1], runs[2], runs[3]]  # oldest first
    assert await store.live_runs("c1") == [runs[1], runs[3]]
    assert await store.live_runs("c2") == [runs[2]]
    assert await store.live_runs("c3") == []
    events = [event("c1", n, run=["run_1", "run_2", None][n % 3]) for n in range(1, 10)]
    await store.write(WriteBatch(events=events))
    assert await store.run_events("c1", "run_2") == payloads(events[0::3])
    assert await store.run_events("c1", "run_1") == payloads(events[2::3])
    await store.write(WriteBatch(runs=[run_doc("run_2", "c1", status="completed")]))
    assert await store.live_runs("c1") == [runs[3]]


async def test_conversations(store: Store) -> None:
    active = {"run_id": "run_1", "status": "running", "runner": "echo"}
    await store.write(WriteBatch(conversations=[conv("c1", 5, 100, runner="echo")]))
    assert await store.get_conversation("c1") == conv("c1", 5, 100, runner="echo")
    await store.write(WriteBatch(conversations=[conv("c1", 6, 200, active_run=active)]))
    assert await store.get_conversation("c1") == conv("c1", 6, 200, active_run=active)
    # a head never goes back, though the rest is as written
    await store.write(WriteBatch(conversations=[conv("c1", 3, 300, runner="other")]))
    assert await store.get_conversation("c1") == conv("c1", 6, 300, runner="other")
    await store.write(WriteBatch(conversations=[conv("c1", 9, 400), conv("c1", 8, 500)]))
    assert await store.get_conversation("c1") == conv("c1", 9, 500)
    assert await store.get_conversation("c2") is None


async def test_list_conversations_pages_most_recent_first(store: Store) -> None:
    activity = {"c_a": 100, "c_b": 200, "c_c": 200, "c_d": 200, "c_e": 50, "c_f": 300}
    await store.write(WriteBatch(conversations=[conv(cid, 1, at) for cid, at in activity.items()]))
    expected = [conv(cid, 1, activity[cid]) for cid in ["c_f", "c_d", "c_c", "c_b", "c_a", "c_e"]]
    assert await store.list_conversations(100, None) == expected
    pages, before = [], None
    while page := await store.list_conversations(2, before):
        pages.append(page)
        before = (page[-1].last_activity, page[-1].conversation_id)
    assert pages == [expected[:2], expected[2:4], expected[4:]]
    assert await store.list_conversations(10, (200, "c_c")) == expected[3:]
    assert await store.list_conversations(10, (200, "c_a")) == expected[4:]
    assert await store.list_conversations(0, None) == []


async def test_list_conversations_of_a_token_pages_through_its_own(store: Store) -> None:
    """Issue 11, item 7: only what `convs` covers, ids exact, `*` patterns, `.` literal."""
    activity = {
        "team.a": 100,
        "teamXa": 600,  # `team.*` must not match it: `.` is not "any character"
        "team.b": 500,
        "c1": 300,
        "c10": 700,
        "other": 800,
        "x-team.c": 900,
        "team.": 200,
    }
    await store.write(WriteBatch(conversations=[conv(cid, 1, at) for cid, at in activity.items()]))
    mine = ConversationFilter.of(["team.*", "c1", "c1", "no such one", "(.*)", "^.*$"])
    assert mine == ConversationFilter(("c1",), "^(?:team\\..*)$")  # hostile ones match nothing
    expected = [conv(cid, 1, activity[cid]) for cid in ["team.b", "c1", "team.", "team.a"]]
    assert await store.list_conversations(100, None, mine) == expected
    pages, before = [], None
    while page := await store.list_conversations(3, before, mine):
        pages.append(page)
        before = (page[-1].last_activity, page[-1].conversation_id)
    assert pages == [expected[:3], expected[3:]]  # full pages: filtered by the query
    assert await store.list_conversations(100, (300, "c1"), mine) == expected[2:]
    only_ids = ConversationFilter.of(["other", "team.a"])
    assert only_ids.regex is None
    assert await store.list_conversations(100, None, only_ids) == [
        conv("other", 1, 800),
        conv("team.a", 1, 100),
    ]
    patterns = ConversationFilter.of(["*-team*", "c1*"])
    assert [c.conversation_id for c in await store.list_conversations(100, None, patterns)] == [
        "x-team.c",
        "c10",
        "c1",
    ]
    everything = await store.list_conversations(100, None, ConversationFilter.of(["*"]))
    assert everything == await store.list_conversations(100, None)
    assert len(everything) == len(activity)
    assert await store.list_conversations(100, None, ConversationFilter.of([])) == []


async def test_transcripts_in_offset_order(store: Store) -> None:
    await store.write(WriteBatch(turns=[turn("c1", "a7", 7), turn("c1", "u2", 2)]))
    await store.write(WriteBatch(turns=[turn("c1", "u5", 5), turn("c2", "u1", 1)]))
    # a turn is written once: a later write of the same message does not change it
    await store.write(WriteBatch(turns=[turn("c1", "u5", 5, content="changed")]))
    expected = [turn("c1", "u2", 2), turn("c1", "u5", 5), turn("c1", "a7", 7)]
    assert await store.transcript("c1") == expected
    assert await store.transcript("c2") == [turn("c2", "u1", 1)]
    assert await store.transcript("c3") == []
    # pages: the newest `limit` below `before`, in order
    assert await store.transcript("c1", 2) == expected[-2:]
    assert await store.transcript("c1", 2, expected[-2].offset) == expected[-4:-2]
    assert await store.transcript("c1", 100, expected[1].offset) == expected[:1]
    assert await store.transcript("c1", None, expected[2].offset) == expected[:2]
    assert await store.transcript("c1", 0) == []
    assert await store.transcript("c1", 5, 0) == []


# webhook deliveries


def delivery(cid: str, offset: int, endpoint: str = "hook", created: int = 1000) -> DeliveryRecord:
    body = orjson.dumps({"type": "run.ended", "data": {"offset": offset, "text": "é ✓"}})
    return DeliveryRecord(endpoint, cid, offset, "run.ended", body.decode(), created + offset)


async def test_deliveries_are_written_once_with_their_batch(store: Store) -> None:
    d1, d2 = delivery("c1", 1), delivery("c1", 2)
    batch = WriteBatch(events=[event("c1", 1), event("c1", 2)], deliveries=[d1, d2])
    await store.write(batch)
    claimed = await store.claim_delivery(d1.id, "n1", 5000, 9000)
    assert claimed is not None
    assert claimed["body"] == d1.body
    assert claimed["owner"] == "n1"
    assert await store.settle_delivery(d1.id, "n1", {"status": "delivered", "attempts": 1})
    await store.write(batch)  # a retried batch leaves the delivered one as it is
    listed = await store.list_deliveries("hook", 10)
    assert [(d["_id"], d["status"]) for d in listed] == [(d2.id, "pending"), (d1.id, "delivered")]
    assert listed[0] == {**d2.document()}
    assert await count(store, "deliveries") in (None, 2)


async def test_due_deliveries_and_the_head_of_each_queue(store: Store) -> None:
    records = [delivery("c1", 3), delivery("c1", 0), delivery("c2", 1), delivery("c1", 5, "other")]
    await store.write(WriteBatch(deliveries=records))
    due = await store.due_deliveries(1003, 10)
    assert [d["_id"] for d in due] == ["hook:c1:0", "hook:c2:1", "hook:c1:3"]
    assert await store.due_deliveries(1003, 0) == []
    assert [d["_id"] for d in await store.due_deliveries(2000, 2)] == ["hook:c1:0", "hook:c2:1"]
    head = await store.delivery_head("hook", "c1")
    assert head is not None
    assert head["_id"] == "hook:c1:0"
    assert await store.delivery_head("hook", "c3") is None
    # held behind the head, then woken once it is done
    await store.hold_deliveries("hook", "c1", 0, 7000)
    assert [d["_id"] for d in await store.due_deliveries(6999, 10)] == [
        "hook:c1:0",
        "hook:c2:1",
        "other:c1:5",
    ]
    await store.hold_deliveries("hook", "c1", 0, 4000)  # never brought forward by a hold
    assert [d["next_at"] for d in await store.list_deliveries("hook", 10)] == [7000, 1001, 1000]
    assert await store.claim_delivery("hook:c1:0", "n1", 2000, 3000) is not None
    assert await store.settle_delivery("hook:c1:0", "n1", {"status": "failed", "attempts": 9})
    assert (await store.delivery_head("hook", "c1") or {}).get("_id") == "hook:c1:3"
    await store.wake_deliveries("hook", "c1", 0, 2500)
    await store.wake_deliveries("hook", "c1", 0, 2600)  # never put back by a wake
    due = await store.due_deliveries(2500, 10)
    assert [d["_id"] for d in due] == ["hook:c2:1", "other:c1:5", "hook:c1:3"]
    assert [d["_id"] for d in await store.list_deliveries("hook", 10, "failed")] == ["hook:c1:0"]
    assert await store.list_deliveries("nobody", 10) == []
    assert await store.list_deliveries("hook", 0) == []


async def test_a_delivery_is_leased_to_one_owner_at_a_time(store: Store) -> None:
    d = delivery("c1", 1)
    await store.write(WriteBatch(deliveries=[d]))
    assert await store.claim_delivery("hook:nothing:1", "n1", 2000, 3000) is None
    assert await store.claim_delivery(d.id, "n1", 2000, 3000) is not None
    assert await store.claim_delivery(d.id, "n2", 2999, 4000) is None  # leased
    assert not await store.settle_delivery(d.id, "n2", {"attempts": 1})  # not its lease
    taken = await store.claim_delivery(d.id, "n2", 3000, 4000)  # the lease lapsed
    assert taken is not None
    assert taken["owner"] == "n2"
    assert not await store.settle_delivery(d.id, "n1", {"status": "delivered"})
    assert await store.settle_delivery(d.id, "n2", {"next_at": 9000, "attempts": 1})
    after = (await store.list_deliveries("hook", 1))[0]
    assert (after["owner"], after["lease_until"], after["next_at"]) == (None, 0, 9000)
    assert await store.claim_delivery(d.id, "n1", 3500, 4500) is not None  # leases end
    assert await store.settle_delivery(d.id, "n1", {"status": "delivered"})
    assert await store.claim_delivery(d.id, "n1", 5000, 6000) is None  # not pending


async def test_replaying_a_delivery(store: Store) -> None:
    d = delivery("c1", 1)
    await store.write(WriteBatch(deliveries=[d]))
    assert await store.claim_delivery(d.id, "n1", 2000, 3000) is not None
    assert await store.settle_delivery(d.id, "n1", {"status": "failed", "attempts": 4})
    assert await store.due_deliveries(10_000, 10) == []
    replayed = await store.replay_delivery(d.id, 10_000)
    assert replayed is not None
    assert (replayed["status"], replayed["next_at"]) == ("pending", 10_000)
    assert replayed["since"] == 10_000
    assert replayed["attempts"] == 4  # its history stays
    assert [x["_id"] for x in await store.due_deliveries(10_000, 10)] == [d.id]
    assert await store.replay_delivery("hook:c9:1", 10_000) is None


async def test_mongo_collections_and_indexes(backend: Backend) -> None:
    if backend.uri is None:
        pytest.skip("MongoDB stores only")
    name = f"steerway_test_{uuid.uuid4().hex[:12]}"
    first = await MongoStore.open(backend.uri, name)
    second = await MongoStore.open(backend.uri, name)  # idempotent
    try:
        assert set(INDEXES) <= set(await second.db.list_collection_names())
        for collection, indexes in INDEXES.items():
            found = {
                tuple(index["key"].items()): index
                async for index in await second.db[collection].list_indexes()
            }
            for index_name, (keys, options) in indexes.items():
                index = found[tuple(keys)]
                assert index.get("unique", False) == options.get("unique", False)
                if backend.kind != "nx":  # nx-27017 names its indexes itself, reports no sparse
                    assert index["name"] == index_name
                    assert index.get("sparse", False) == options.get("sparse", False)
    finally:
        await first.client.drop_database(name)
        await first.close()
        await second.close()


async def test_open_unreachable_raises_store_error() -> None:
    started = time.monotonic()
    with pytest.raises(StoreError):
        await MongoStore.open(f"mongodb://127.0.0.1:{free_port()}/?directConnection=true")
    assert time.monotonic() - started < OUTAGE_WITHIN


@contextlib.asynccontextmanager
async def server_of(kind: str, directory: Path) -> AsyncIterator[tuple[str, Any]]:
    """A dedicated server, to be stopped by the test: (uri, stop coroutine function)."""
    if kind == "nx":
        mongo = await EmbeddedMongo.start(directory)
        try:
            yield mongo.uri, mongo.stop
        finally:
            await mongo.stop()
    else:
        server = await asyncio.to_thread(start_mongoeco, directory)

        async def stop() -> None:
            await asyncio.to_thread(server.stop)

        try:
            yield server.uri, stop
        finally:
            await stop()


@pytest.mark.parametrize("kind", ["memory", "nx", "mongoeco"])
async def test_store_error_when_the_server_is_gone(kind: str, tmp_path: Path) -> None:
    batch = WriteBatch(events=[event("c1", 2)], runs=[run_doc("run_1", "c1")])
    calls = [
        lambda s: s.ping(),
        lambda s: s.write(batch),
        lambda s: s.read_events("c1", 0, 10),
        lambda s: s.read_pages(["c1", "c2"], 0, 10),
        lambda s: s.last_offset("c1"),
        lambda s: s.find_client_message("c1", "k1"),
        lambda s: s.get_conversation("c1"),
        lambda s: s.list_runs(None, None, 10, None),
        lambda s: s.live_runs(None),
        lambda s: s.transcript("c1"),
    ]

    async def all_fail(store: Store) -> None:
        started = time.monotonic()
        async with asyncio.timeout(OUTAGE_WITHIN):
            results = await asyncio.gather(*(c(store) for c in calls), return_exceptions=True)
        assert all(isinstance(r, StoreError) for r in results), results
        assert time.monotonic() - started < OUTAGE_WITHIN

    if kind == "memory":
        memory = MemoryStore()
        await memory.write(WriteBatch(events=[event("c1", 1)]))
        memory.fail = True
        await all_fail(memory)
        return
    async with server_of(kind, tmp_path) as (uri, stop):
        store = await MongoStore.open(uri, "outage")
        try:
            await store.write(WriteBatch(events=[event("c1", 1)]))
            await stop()
            await all_fail(store)
        finally:
            await store.close()


# the embedded server


async def write_and_close(uri: str, batch: WriteBatch) -> None:
    store = await MongoStore.open(uri)
    try:
        await store.write(batch)
    finally:
        await store.close()


async def read_and_close(uri: str, cid: str) -> list[str]:
    store = await MongoStore.open(uri)
    try:
        return await store.read_events(cid, 0, 100)
    finally:
        await store.close()


async def test_embedded_data_persists_across_restarts(tmp_path: Path) -> None:
    events = [event("c1", n) for n in range(1, 4)]
    async with await EmbeddedMongo.start(tmp_path) as mongo:
        pid = mongo.pid
        assert pid is not None
        assert mongo.pid_file.read_text().strip() == str(pid)
        await write_and_close(mongo.uri, WriteBatch(events=events))
    assert not alive(pid)
    assert not mongo.pid_file.exists()
    assert (tmp_path / "db" / "steerway.db").exists()
    async with EmbeddedMongo(tmp_path) as again:
        assert await read_and_close(again.uri, "c1") == payloads(events)


@pytest.mark.parametrize("reaped", [False, True], ids=["zombie", "reaped"])
async def test_embedded_start_after_kill_9(tmp_path: Path, reaped: bool) -> None:
    """`kill -9` of nx-27017 leaves its pid file; the next start removes it."""
    events = [event("c1", n) for n in range(1, 4)]
    killed = await EmbeddedMongo.start(tmp_path)
    try:
        await write_and_close(killed.uri, WriteBatch(events=events))
        assert killed.process is not None
        pid = killed.process.pid
        os.kill(pid, signal.SIGKILL)
        if reaped:
            await asyncio.to_thread(killed.process.wait, TIMEOUT)
        else:  # dead, but a zombie until its parent waits: os.kill(pid, 0) still works
            await asyncio.to_thread(os.waitid, os.P_PID, pid, os.WEXITED | os.WNOWAIT)
            assert alive(pid)
        assert killed.pid_file.read_text().strip() == str(pid)
        async with await EmbeddedMongo.start(tmp_path) as mongo:
            assert mongo.pid != pid
            assert await read_and_close(mongo.uri, "c1") == payloads(events)
            await killed.stop()  # reaps the old one, leaves the new one's pid file
            assert mongo.pid_file.read_text().strip() == str(mongo.pid)
            assert await read_and_close(mongo.uri, "c1") == payloads(events)
    finally:
        await killed.stop()


async def test_embedded_pid_file_of_another_process_is_stale(tmp_path: Path) -> None:
    (tmp_path / "nx-27017.pid").write_text(f"{os.getpid()}\n")  # alive, but not nx-27017
    async with await EmbeddedMongo.start(tmp_path) as mongo:
        assert mongo.pid_file.read_text().strip() == str(mongo.pid)
    (tmp_path / "nx-27017.pid").write_text("garbage")
    async with await EmbeddedMongo.start(tmp_path) as mongo:
        await read_and_close(mongo.uri, "c1")


async def test_embedded_refuses_a_directory_in_use(tmp_path: Path) -> None:
    async with await EmbeddedMongo.start(tmp_path) as mongo:
        started = time.monotonic()
        with pytest.raises(EmbeddedMongoError, match=f"pid {mongo.pid}"):
            await EmbeddedMongo.start(tmp_path, busy_wait=0.3)
        assert time.monotonic() - started >= 0.3  # it waited for the server to go away
        assert await read_and_close(mongo.uri, "c1") == []  # not disturbed
        assert mongo.pid_file.read_text().strip() == str(mongo.pid)


async def test_embedded_reports_a_failed_start(tmp_path: Path) -> None:
    # python with nx-27017's arguments exits at once, complaining about them
    with pytest.raises(EmbeddedMongoError, match=r"(?s)exited with status 2.*--host"):
        await EmbeddedMongo.start(tmp_path, executable=sys.executable)


async def test_embedded_retries_a_port_taken_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = iter([port])
        monkeypatch.setattr(embedded, "free_port", lambda: next(ports, None) or free_port())
        async with await EmbeddedMongo.start(tmp_path) as mongo:
            assert mongo.port != port
            await read_and_close(mongo.uri, "c1")
        # a port asked for is not changed: its failure is reported
        with pytest.raises(EmbeddedMongoError, match="address already in use"):
            await EmbeddedMongo.start(tmp_path, port=port)


LAUNCHER = """
import asyncio, sys
from store.embedded import EmbeddedMongo

async def main():
    mongo = await EmbeddedMongo.start(sys.argv[1])
    print(mongo.pid, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="Linux only (PR_SET_PDEATHSIG)")
async def test_embedded_server_stops_when_the_gateway_is_killed(tmp_path: Path) -> None:
    """`kill -9` of the process that started nx-27017 stops it too, and the next start
    on the same directory (at once: it waits for the old server to exit) works."""
    events = [event("c1", 1)]
    gateway = await asyncio.create_subprocess_exec(
        sys.executable, "-c", LAUNCHER, str(tmp_path), cwd=ROOT, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert gateway.stdout is not None
        old_pid = int(await asyncio.wait_for(gateway.stdout.readline(), TIMEOUT))
        pidfd = os.pidfd_open(old_pid)
    finally:
        gateway.kill()
        await gateway.wait()
    try:
        async with await EmbeddedMongo.start(tmp_path) as mongo:
            # the pidfd is readable once the old nx-27017 has exited
            ready, _, _ = await asyncio.to_thread(select.select, [pidfd], [], [], TIMEOUT)
            assert ready, "nx-27017 outlived the process that started it"
            assert mongo.pid_file.read_text().strip() == str(mongo.pid)
            await write_and_close(mongo.uri, WriteBatch(events=events))
            assert await read_and_close(mongo.uri, "c1") == payloads(events)
    finally:
        os.close(pidfd)
