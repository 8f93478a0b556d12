"""The relay of remote runners across nodes (gateway.cluster.runners), without Redis: the
bus and the forwarder are stand-ins that keep what is sent; the pool is the real one.
What a lost, duplicated, misdirected or oversized relay message does, and the window."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest

from gateway.cluster.runners import BATCH, BATCH_BYTES, WINDOW, ClusterRunners
from gateway.protocol.frames import (
    FrameLimits,
    NodeReply,
    NodeRequest,
    RunAssign,
    RunCancel,
    RunFromRunner,
    RunToRunner,
    SteeringBatch,
    SteeringPullFrame,
    Strict,
    encode,
    parse_node_frame,
)
from gateway.runners.remote import LOST, Lease, RemotePool, RunnerLink
from tests.helpers import TIMEOUT


class Bus:
    def __init__(self) -> None:
        self.sent: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def send(self, channel: bytes, data: bytes) -> None:
        node = channel.decode().rsplit(":", 1)[1]
        self.sent.put_nowait((node, parse_node_frame(data, FrameLimits())))

    async def next(self) -> tuple[str, Any]:
        return await asyncio.wait_for(self.sent.get(), TIMEOUT)


class Forwarder:
    def __init__(self, node: str) -> None:
        self.node = node
        self.bus = Bus()
        self.runners: Callable[[Any], None] | None = None
        self.asked: asyncio.Queue[tuple[str, NodeRequest, Callable[[NodeReply | None], None]]] = (
            asyncio.Queue()
        )

    def ask(
        self, node: str, request: NodeRequest, answer: Callable[[NodeReply | None], None]
    ) -> None:
        self.asked.put_nowait((node, request, answer))


class Leases:
    beat_s = 0.01

    def __init__(self) -> None:
        self.alive: dict[str, bytes] = {}

    async def nodes(self) -> dict[str, bytes]:
        return dict(self.alive)


def info(runners: dict[str, list[Any]]) -> bytes:
    return orjson.dumps({"node": "x", "runners": runners})


class Node:
    """One node's ClusterRunners with stand-ins, and a runner connected to it."""

    def __init__(self, name: str) -> None:
        self.forwarder = Forwarder(name)
        self.leases = Leases()
        self.pool = RemotePool(names=("far",), wait_s=TIMEOUT)
        self.runners = ClusterRunners(self.forwarder, self.leases, self.pool)  # type: ignore[arg-type]
        self.to_runner: list[Strict] = []
        self.link = RunnerLink("far", True, 1, self.to_runner.append)

    def deliver(self, frame: Strict) -> None:
        """A frame on this node's channel, through the encoding."""
        parsed = parse_node_frame(encode(frame), FrameLimits())
        assert self.forwarder.runners is not None
        self.forwarder.runners(parsed)

    async def watched(self) -> None:
        """One beat of the watch loop has run."""
        await asyncio.wait_for(self.runners.changed(), TIMEOUT)


def assign(run_id: str = "run1") -> RunAssign:
    return RunAssign(
        run_id=run_id, conversation_id="conv", trigger_message_ids=[], messages=[], deadline_ms=1
    )


def to(seq: int, frame: Any = None, node: str = "a", taken: int = 0) -> RunToRunner:
    return RunToRunner(run_id="run1", node=node, seq=seq, frame=frame, taken=taken)


def delta(i: int) -> dict[str, Any]:
    return {"type": "message.delta", "data": {"chunk": str(i)}}


def ask_place(request_id: int, run_id: str, name: str) -> NodeRequest:
    return NodeRequest(
        kind="place", id=request_id, reply_to="a", conversation_id="", run_id=run_id, runner=name
    )


@pytest.fixture
async def b() -> Node:
    """The runner's node: a runner of `far` connected, a run of node a placed on it."""
    node = Node("b")
    node.pool.join(node.link)
    node.deliver(
        NodeRequest(
            kind="place", id=7, reply_to="a", conversation_id="", run_id="run1", runner="far"
        )
    )
    where, reply = await node.forwarder.bus.next()
    assert (where, reply) == ("a", NodeReply(id=7, placed=True))
    return node


async def test_a_place_is_taken_only_from_a_free_runner(b: Node) -> None:
    for run_id, name in (("run1", "far"), ("run2", "far"), ("run3", "other")):  # again, busy, none
        b.deliver(
            NodeRequest(
                kind="place", id=8, reply_to="a", conversation_id="", run_id=run_id, runner=name
            )
        )
        assert await b.forwarder.bus.next() == ("a", NodeReply(id=8, placed=False))
    assert b.pool.offered() == {"far": (0, True)}


async def relayed(b: Node, last: Callable[[RunFromRunner], bool]) -> list[RunFromRunner]:
    """What b relays to a, up to the message `last` is true of."""
    got: list[RunFromRunner] = []
    while not got or not last(got[-1]):
        node, message = await b.forwarder.bus.next()
        assert node == "a"
        assert isinstance(message, RunFromRunner)
        got.append(message)
    return got


def ends(message: RunFromRunner) -> bool:
    return bool(message.results) and message.results[-1]["type"] == "run.completed"


async def ended(b: Node) -> None:
    """b's relay of run1 is over (and its place given back)."""
    serving = b.runners.serving.get("run1")
    if serving is not None and serving.task is not None:
        await asyncio.wait({serving.task}, timeout=TIMEOUT)
    assert "run1" not in b.runners.serving


async def test_the_runner_gets_the_owners_frames_and_the_owner_its_results_in_order(
    b: Node,
) -> None:
    b.deliver(to(1, assign()))
    lease = b.link.leases["run1"]
    pull = SteeringPullFrame(type="steering.pull", run_id="run1", request_id="q")
    for item in (delta(1), delta(2), pull):
        await lease.put(item)
    got = await relayed(b, lambda m: m.pull is not None)
    b.deliver(to(2, SteeringBatch(request_id="q", messages=[])))
    assert b.to_runner == [assign(), SteeringBatch(request_id="q", messages=[])]
    lease.finished = True  # as the runner socket marks a run its runner ended
    for item in (delta(3), {"type": "run.completed", "data": {}}):
        await lease.put(item)
    got += await relayed(b, ends)
    assert [m.seq for m in got] == list(range(1, len(got) + 1))
    items = [x for m in got for x in [*m.results, *([m.pull] if m.pull else [])]]
    assert items == [delta(1), delta(2), pull, delta(3), {"type": "run.completed", "data": {}}]
    # the run ended on the runner: its place is free again, late messages are ignored
    await ended(b)
    assert b.pool.offered() == {"far": (1, True)}
    b.deliver(to(3, RunCancel(run_id="run1")))
    assert len(b.to_runner) == 2


async def test_large_results_are_relayed_in_messages_of_about_a_mebibyte(b: Node) -> None:
    """Redis drops a subscriber whose pub/sub buffer passes its limit: a relay message
    holds at most about BATCH_BYTES of results, however large each is."""
    b.deliver(to(1, assign()))
    lease = b.link.leases["run1"]
    big = [{"type": "message.delta", "data": {"chunk": "x" * 300_000}} for _ in range(8)]
    for item in [*big, {"type": "run.completed", "data": {}}]:
        await lease.put(item)
    got = await relayed(b, ends)
    assert [x for m in got for x in m.results] == [*big, {"type": "run.completed", "data": {}}]
    assert len(got) >= 3
    assert all(len(orjson.dumps(m.results)) < BATCH_BYTES + 310_000 for m in got)


async def test_a_lost_or_misdirected_message_to_the_runner(b: Node) -> None:
    b.deliver(to(1, assign()))
    b.deliver(to(2, SteeringBatch(request_id="q", messages=[]), node="c"))  # not the owner
    b.deliver(to(1, SteeringBatch(request_id="q", messages=[])))  # a duplicate
    assert b.to_runner == [assign()]
    b.deliver(to(3, SteeringBatch(request_id="q", messages=[])))  # 2 was lost
    assert await b.forwarder.bus.next() == (
        "a",
        RunFromRunner(run_id="run1", node="b", seq=1, lost=True),
    )
    assert b.to_runner[-1] == RunCancel(run_id="run1")
    assert b.pool.offered() == {"far": (1, True)}


async def test_a_frame_naming_another_run_is_refused(b: Node) -> None:
    b.deliver(to(1, assign("run_other")))
    lost = RunFromRunner(run_id="run1", node="b", seq=1, lost=True)
    assert await b.forwarder.bus.next() == ("a", lost)
    await ended(b)
    assert b.to_runner == []  # the runner never heard of either run


async def test_the_runner_is_read_no_further_than_the_window(b: Node) -> None:
    b.deliver(to(1, assign()))
    lease = b.link.leases["run1"]
    for i in range(WINDOW + 10):
        await lease.put(delta(i))
    sent = 0
    while sent < WINDOW:
        sent += len((await b.forwarder.bus.next())[1].results)
    assert sent < WINDOW + 10
    with pytest.raises(TimeoutError):  # nothing more until the owner has taken some
        await asyncio.wait_for(b.forwarder.bus.sent.get(), 0.2)
    b.deliver(to(2, taken=64))
    while sent < WINDOW + 10:
        sent += len((await b.forwarder.bus.next())[1].results)
    assert sent == WINDOW + 10


async def test_an_unassigned_place_is_given_back_without_troubling_the_runner(b: Node) -> None:
    b.deliver(to(1, RunCancel(run_id="run1")))  # the owner gave up before assigning
    await ended(b)
    assert b.pool.offered() == {"far": (1, True)}
    assert b.to_runner == []


async def test_the_owner_gone_the_runner_is_told_run_cancel(b: Node) -> None:
    b.deliver(to(1, assign()))
    b.leases.alive = {"b": info({})}  # a's liveness key expired
    b.runners.start()
    try:
        await ended(b)
    finally:
        await b.runners.stop()
    assert b.to_runner[-1] == RunCancel(run_id="run1")
    assert b.pool.offered() == {"far": (1, True)}


# --------------------------------------------------------------------------- the owner's side


async def placed(a: Node, answer: NodeReply | None) -> Lease | None:
    """Ask for a place for run1 on b (which offers one), answered `answer`."""
    task = asyncio.create_task(a.runners.place("run1", "far"))
    node, request, reply = await asyncio.wait_for(a.forwarder.asked.get(), TIMEOUT)
    assert (node, request.kind, request.run_id, request.runner) == ("b", "place", "run1", "far")
    reply(answer)
    return await task


@pytest.fixture
async def a() -> AsyncIterator[Node]:
    node = Node("a")
    node.leases.alive = {"a": info({}), "b": info({"far": [1, True]}), "c": b"not json"}
    node.runners.start()
    await node.watched()
    yield node
    await node.runners.stop()


def came(seq: int, *results: Any, node: str = "b", lost: bool = False) -> RunFromRunner:
    return RunFromRunner(run_id="run1", node=node, seq=seq, results=list(results), lost=lost)


async def test_names_offered_on_other_nodes_are_known_and_steer_if_all_do() -> None:
    a = Node("a")
    assert a.pool.spec("near") is None
    a.leases.alive = {
        "b": info({"near": [0, True], "both": [1, True]}),
        "c": info({"both": [0, False]}),
        "d": info({"bad": "not a pair"}),
    }
    a.runners.start()
    try:
        await a.watched()
    finally:
        await a.runners.stop()
    near, both = a.pool.spec("near"), a.pool.spec("both")
    assert near is not None
    assert near.supports_steering
    assert both is not None
    assert not both.supports_steering
    assert a.pool.spec("bad") is None
    assert a.runners.offers["d"] == {}


async def test_the_owner_places_on_a_node_that_offers_and_takes_its_results(a: Node) -> None:
    lease = await placed(a, NodeReply(id=1, placed=True))
    assert lease is not None
    lease.link.send(assign())
    assert await a.forwarder.bus.next() == ("b", to(1, assign()))
    a.deliver(came(1, delta(1)))
    a.deliver(came(1, delta(9)))  # duplicated
    a.deliver(came(2, delta(9), node="c"))  # not from b
    a.deliver(came(2, delta(2), {"type": "run.completed", "data": {}}))
    assert [await lease.get() for _ in range(3)] == [
        delta(1), delta(2), {"type": "run.completed", "data": {}},
    ]  # fmt: skip
    assert lease.finished
    assert not lease.lost


async def test_a_lost_result_fails_the_owners_run_and_stops_the_runner(a: Node) -> None:
    lease = await placed(a, NodeReply(id=1, placed=True))
    assert lease is not None
    a.deliver(came(2, delta(2)))  # 1 was lost
    assert await lease.get() is LOST
    assert await a.forwarder.bus.next() == ("b", to(1, RunCancel(run_id="run1")))


async def test_a_relay_past_the_window_fails_the_run(a: Node) -> None:
    lease = await placed(a, NodeReply(id=1, placed=True))
    assert lease is not None
    a.deliver(came(1, *[delta(i) for i in range(WINDOW + BATCH + 1)]))
    assert await lease.get() is LOST


async def test_the_owner_sends_what_it_took(a: Node) -> None:
    lease = await placed(a, NodeReply(id=1, placed=True))
    assert lease is not None
    a.deliver(came(1, *[delta(i) for i in range(WINDOW // 4)]))
    for _ in range(WINDOW // 4):
        await lease.get()
    assert await a.forwarder.bus.next() == ("b", to(1, taken=WINDOW // 4))


async def test_no_answer_or_no_place_asks_nobody_else(a: Node) -> None:
    assert await placed(a, None) is None
    assert await a.runners.place("run1", "far") is None  # b is not asked again this beat
    assert a.forwarder.asked.empty()


async def test_a_place_given_up_on_goes_back(a: Node) -> None:
    task = asyncio.create_task(a.runners.place("run1", "far"))
    _, _, reply = await asyncio.wait_for(a.forwarder.asked.get(), TIMEOUT)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    reply(NodeReply(id=1, placed=True))
    assert await a.forwarder.bus.next() == ("b", to(1, RunCancel(run_id="run1")))


async def test_the_runners_node_gone_the_run_fails(a: Node) -> None:
    lease = await placed(a, NodeReply(id=1, placed=True))
    assert lease is not None
    a.leases.alive = {"a": info({})}
    assert await asyncio.wait_for(lease.get(), TIMEOUT) is LOST


async def test_the_pool_takes_a_place_elsewhere_once_one_is_offered() -> None:
    a = Node("a")
    a.leases.alive = {"a": info({})}
    a.runners.start()
    got: asyncio.Future[Lease] = asyncio.get_running_loop().create_future()
    over = asyncio.Event()

    async def run() -> None:
        async with a.pool.place("run1", "far") as lease:
            got.set_result(lease)
            await over.wait()

    task = asyncio.create_task(run())
    try:
        await a.watched()  # nobody offers `far`: the run waits here
        assert list(a.pool.assignment.waiting["far"]) == ["run1"]
        a.leases.alive = {"a": info({}), "b": info({"far": [2, True]})}
        _, request, reply = await asyncio.wait_for(a.forwarder.asked.get(), TIMEOUT)
        reply(NodeReply(id=request.id, placed=True))
        lease = await asyncio.wait_for(got, TIMEOUT)
        assert a.pool.assignment.waiting == {}  # no longer waiting here
        assert a.pool.leases == {"run1": lease}
        over.set()  # the run is over before the runner ended it: b is told run.cancel
        await task
        assert a.pool.leases == {}
        assert await a.forwarder.bus.next() == ("b", to(1, RunCancel(run_id="run1")))
    finally:
        task.cancel()
        await a.runners.stop()
