"""Remote runners across nodes: a run of a conversation this node owns may be served by a
remote runner connected to another node, and this node's runners serve runs that other
nodes own (docs/runners.md, "Remote runners in a cluster").

- Each node says in its liveness info, every beat, which runner names are connected
  to it and how many free places they have (`offered`). Every node reads the others'
  once a beat (`_watch`): it learns their names (a conversation may then use them) and
  where to ask for a place.
- The owner's pool, with no free runner of the name here, asks a node that has one
  (`place`, a NodeRequest on that node's channel). That node takes one of its runners
  only if one is free now (`RemotePool.take`) and answers. Then the owner's RunDriver
  goes on as with a runner connected to it: its `Lease` is fed by `run.from` messages
  (results, steering pulls, the runner's loss), and what it sends the runner
  (`run.assign` with the transcript, `steering.batch`, `run.cancel`) goes as `run.to`.
- Order and loss: the bus publishes in order but drops what its queue cannot hold, so
  each direction of a run is numbered: a gap fails the run, a duplicate is ignored (`runner_lost`,
  retryable; the runner is told `run.cancel`). Results keep their order and go through
  the owner's result rules as any runner's.
- Flow: the runner's node relays at most WINDOW results and pulls ahead of what the
  owner's run has taken (`taken`, sent back every CREDIT_EVERY); beyond, it reads the
  runner's socket no further, as for a run of its own. An owner more than that behind
  (a peer that ignores the window) fails the run rather than queueing without bound.
- Liveness, checked once a beat: a run whose runner's node is gone fails `runner_lost`
  on its owner; a run whose owner is gone is cancelled on the runner (the conversation's
  new owner ends it `node_lost`). A runner that disconnects fails its runs `runner_lost`
  on their owners, as on one node.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import orjson
from redis.exceptions import RedisError

from gateway.cluster.forwarding import FORWARD_TIMEOUT_S, Forwarder
from gateway.cluster.leases import Leases
from gateway.cluster.redisbus import node_channel
from gateway.protocol.frames import (
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
)
from gateway.runners.remote import LEASE_ITEMS, LOST, Lease, RemotePool, RunnerLink, is_terminal

log = logging.getLogger("steerway.cluster")

WINDOW = LEASE_ITEMS  # results and pulls relayed ahead of what the owner's run took
CREDIT_EVERY = WINDOW // 4
BATCH = 64  # results in one `run.from` message
# ... and about this many bytes of them: far below Redis's pub/sub output buffer limits
# (8 MiB soft, 32 MiB hard by default), whatever the runner sends (up to 2 MiB a frame)
BATCH_BYTES = 1024 * 1024
ASSIGN_TIMEOUT_S = 2 * FORWARD_TIMEOUT_S  # a place taken for a run whose owner said no more


class _Placed(RunnerLink):
    """Owner side: one run on a runner of another node, as the pool sees a runner."""

    def __init__(self, runners: ClusterRunners, node: str, run_id: str, name: str) -> None:
        super().__init__(name, True, 1, self._to_runner)
        self.runners = runners
        self.node = node
        self.run_id = run_id
        self.sent = 0  # `run.to` messages sent
        self.got = 0  # `run.from` messages received
        self.broken = False
        self.lease: _RelayedLease = _RelayedLease(self, run_id)
        self.leases[run_id] = self.lease

    def _to_runner(self, frame: Strict) -> None:
        assert isinstance(frame, RunAssign | SteeringBatch | RunCancel)
        self._send(frame=frame)

    def _send(
        self, frame: RunAssign | SteeringBatch | RunCancel | None = None, taken: int = 0
    ) -> None:
        self.sent += 1
        message = RunToRunner(
            run_id=self.run_id, node=self.runners.node, seq=self.sent, frame=frame, taken=taken
        )
        self.runners.send(self.node, message)

    def fail(self, why: str) -> None:
        """The relay broke: the run ends `runner_lost`, its runner is told to stop."""
        if self.broken:
            return
        self.broken = True
        log.warning("run %s on node %s: %s; it fails runner_lost", self.run_id, self.node, why)
        if not (self.lease.finished or self.lease.lost):
            self._send(frame=RunCancel(run_id=self.run_id))
        self.lease.lose()

    def forget(self, run_id: str) -> None:
        super().forget(run_id)
        if self.runners.placed.get(run_id) is self:
            del self.runners.placed[run_id]


class _RelayedLease(Lease):
    """The owner's lease of a run on another node: what it took goes back as credit."""

    def __init__(self, placed: _Placed, run_id: str) -> None:
        super().__init__(placed, run_id)
        self.placed = placed
        self.taken = 0

    async def get(self) -> object:
        item = await super().get()
        if item is not LOST:
            self.taken += 1
            if self.taken % CREDIT_EVERY == 0 and not self.placed.broken:
                self.placed._send(taken=self.taken)
        return item


class _Serving:
    """Runner side: one run of another node on a runner connected here."""

    def __init__(self, owner: str, lease: Lease) -> None:
        self.owner = owner
        self.lease = lease
        self.sent = 0  # `run.from` messages sent
        self.got = 0  # `run.to` messages received
        self.relayed = 0  # results and pulls sent
        self.taken = 0  # of which the owner's run took
        self.room = asyncio.Event()
        self.assigned = asyncio.Event()
        self.failed = False  # tell the owner the run is lost
        self.task: asyncio.Task[None] | None = None

    def end(self, failed: bool = False) -> None:
        self.failed = self.failed or failed
        if self.task is not None:
            self.task.cancel()


class ClusterRunners:
    """This node's part of remote runners across the cluster: the pool's `Elsewhere`."""

    def __init__(self, forwarder: Forwarder, leases: Leases, pool: RemotePool) -> None:
        self.forwarder = forwarder
        self.bus = forwarder.bus
        self.node = forwarder.node
        self.leases = leases
        self.pool = pool
        self.placed: dict[str, _Placed] = {}  # runs of this node on other nodes' runners
        self.serving: dict[str, _Serving] = {}  # other nodes' runs on runners here
        self.offers: dict[str, dict[str, tuple[int, bool]]] = {}  # node -> name -> free, steers
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        pool.elsewhere = self
        forwarder.runners = self.on_frame

    def offered(self) -> dict[str, tuple[int, bool]]:
        """What this node's runners offer, for its liveness info."""
        return self.pool.offered()

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch(), name="cluster-runners")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for placed in list(self.placed.values()):
            placed.fail("this node leaves the cluster")
        tasks = [s.task for s in self.serving.values() if s.task is not None]
        for serving in list(self.serving.values()):
            serving.end(failed=True)
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def send(self, node: str, message: Strict) -> None:
        self.bus.send(node_channel(node), encode(message))

    # ------------------------------------------------------------------ the owner's side

    async def place(self, run_id: str, name: str) -> Lease | None:
        """A place on a free runner of `name` of another node, most free places first."""
        offers = sorted(
            ((o[name][0], node) for node, o in self.offers.items() if o.get(name, (0,))[0] > 0),
            reverse=True,
        )
        for _, node in offers:
            if await self._ask(node, run_id, name):
                placed = self.placed[run_id] = _Placed(self, node, run_id, name)
                return placed.lease
            with contextlib.suppress(KeyError):  # busy by now: not asked again until it says
                self.offers[node][name] = (0, self.offers[node][name][1])
        return None

    async def _ask(self, node: str, run_id: str, name: str) -> bool:
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

        def answer(reply: NodeReply | None) -> None:
            placed = reply is not None and reply.placed
            if not done.done():
                done.set_result(placed)
            elif placed:  # given up meanwhile: the place goes back
                cancel = RunToRunner(
                    run_id=run_id, node=self.node, seq=1, frame=RunCancel(run_id=run_id)
                )
                self.send(node, cancel)

        request = NodeRequest(
            kind="place", id=0, reply_to="", conversation_id="", run_id=run_id, runner=name
        )
        self.forwarder.ask(node, request, answer)
        return await done

    async def changed(self) -> None:
        await self._changed.wait()

    def _from_runner(self, frame: RunFromRunner) -> None:
        placed = self.placed.get(frame.run_id)
        if placed is None or placed.node != frame.node or placed.broken:
            return  # over already: late news
        if frame.seq <= placed.got:
            return  # a duplicate
        if frame.seq > placed.got + 1:
            placed.fail(f"relay message {placed.got + 1} was lost")
            return
        placed.got = frame.seq
        lease = placed.lease
        items: list[object] = [*frame.results]
        if frame.pull is not None:
            items.append(frame.pull)
        if any(is_terminal(r) for r in frame.results):
            lease.finished = True
        if items and not lease.offer(items, WINDOW + BATCH):
            placed.fail("the relay got ahead of the window")
            return
        if frame.lost:
            lease.lose()

    # ------------------------------------------------------------------ the runner's side

    def _place(self, request: NodeRequest) -> None:
        run_id, name = request.run_id, request.runner
        lease = None
        if run_id is not None and name is not None and run_id not in self.serving:
            with contextlib.suppress(ValueError):  # a run id this node has placed already
                lease = self.pool.take(run_id, name)
        if run_id is not None and lease is not None:
            serving = self.serving[run_id] = _Serving(request.reply_to, lease)
            serving.task = asyncio.create_task(self._serve(serving), name=f"relay-{run_id}")
            serving.task.add_done_callback(lambda task: self._served(serving, task))
        self.send(request.reply_to, NodeReply(id=request.id, placed=lease is not None))

    def _to_runner(self, frame: RunToRunner) -> None:
        serving = self.serving.get(frame.run_id)
        if serving is None or serving.owner != frame.node:
            return
        if frame.seq <= serving.got:
            return  # a duplicate
        if frame.seq > serving.got + 1:
            log.warning("run %s of node %s: relay message lost", frame.run_id, frame.node)
            serving.end(failed=True)
            return
        serving.got = frame.seq
        if frame.taken > serving.taken:
            serving.taken = frame.taken
            serving.room.set()
        sent = frame.frame
        if isinstance(sent, RunAssign | RunCancel) and sent.run_id != frame.run_id:
            log.warning("run %s of node %s: a frame for another run", frame.run_id, frame.node)
            serving.end(failed=True)
            return
        if isinstance(sent, RunCancel):
            serving.end()  # the pool tells the runner `run.cancel`
        elif sent is not None:
            if isinstance(sent, RunAssign):
                serving.assigned.set()
            serving.lease.link.send(sent)

    async def _serve(self, serving: _Serving) -> None:
        """Relay the runner's results and pulls to the owner, in order, within the window."""
        lease = serving.lease
        try:
            async with asyncio.timeout(ASSIGN_TIMEOUT_S):
                await serving.assigned.wait()
            while True:
                item = await lease.get()
                if item is LOST:
                    self._relay(serving, lost=True)
                    return
                results: list[Any] = []
                pull = item if isinstance(item, SteeringPullFrame) else None
                if pull is None:
                    results.append(item)
                    size = len(orjson.dumps(item))
                    while (
                        lease.items
                        and len(results) < BATCH
                        and size < BATCH_BYTES
                        and not is_terminal(results[-1])
                        and not isinstance(lease.items[0], SteeringPullFrame)
                    ):
                        results.append(await lease.get())
                        size += len(orjson.dumps(results[-1]))
                while serving.relayed - serving.taken >= WINDOW:
                    serving.room.clear()
                    await serving.room.wait()
                serving.relayed += len(results) + (pull is not None)
                self._relay(serving, results=results, pull=pull)
                if results and is_terminal(results[-1]):
                    return
        except TimeoutError:
            log.warning("run %s: node %s never assigned it", lease.run_id, serving.owner)

    def _served(self, serving: _Serving, task: asyncio.Task[None]) -> None:
        """The relay's end, however it came (a done callback: it runs even for a task
        cancelled before it started): the runner's place goes back."""
        lease = serving.lease
        if not task.cancelled() and task.exception() is not None:
            log.error("run %s: the relay failed: %r", lease.run_id, task.exception())
            serving.failed = True
        if not serving.assigned.is_set():
            lease.finished = True  # the runner never heard of it: nothing to cancel
        if serving.failed and not lease.lost:
            self._relay(serving, lost=True)
        if self.serving.get(lease.run_id) is serving:
            del self.serving[lease.run_id]
        self.pool.finish(lease)

    def _relay(
        self,
        serving: _Serving,
        results: list[Any] | None = None,
        pull: SteeringPullFrame | None = None,
        lost: bool = False,
    ) -> None:
        serving.sent += 1
        message = RunFromRunner(
            run_id=serving.lease.run_id,
            node=self.node,
            seq=serving.sent,
            results=results or [],
            pull=pull,
            lost=lost,
        )
        self.send(serving.owner, message)

    # ------------------------------------------------------------------ both

    def on_frame(self, frame: NodeRequest | RunToRunner | RunFromRunner) -> None:
        """A `place` request or a relay message on this node's channel (in order)."""
        try:
            if isinstance(frame, RunFromRunner):
                self._from_runner(frame)
            elif isinstance(frame, RunToRunner):
                self._to_runner(frame)
            else:
                self._place(frame)
        except Exception:  # never the end of the bus's reader
            log.exception("cluster runners: a %s frame failed", frame.kind)

    async def _watch(self) -> None:
        """Once a beat: what the other nodes' runners offer, and which nodes are gone."""
        while True:
            await asyncio.sleep(self.leases.beat_s)
            try:
                nodes = await self.leases.nodes()
            except (RedisError, OSError) as exc:
                log.debug("cluster runners: nodes unknown this beat: %s", exc)
                continue
            offers: dict[str, dict[str, tuple[int, bool]]] = {}
            for node, info in nodes.items():
                if node != self.node:
                    offers[node] = _offers(info)
            steering: dict[str, bool] = {}
            for offer in offers.values():
                for name, (_, steers) in offer.items():
                    steering[name] = steering.get(name, True) and steers
            for name, steers in steering.items():
                self.pool.learn(name, steers)
            self.offers = offers
            changed, self._changed = self._changed, asyncio.Event()
            changed.set()
            for placed in list(self.placed.values()):
                if placed.node not in nodes:
                    placed.fail(f"node {placed.node} is gone")
            for serving in list(self.serving.values()):
                if serving.owner not in nodes:
                    log.warning("run %s: its node %s is gone", serving.lease.run_id, serving.owner)
                    serving.end()


def _offers(info: bytes) -> dict[str, tuple[int, bool]]:
    """The runners a node's liveness info offers; nothing from an info it cannot read."""
    try:
        runners = orjson.loads(info).get("runners") or {}
        return {str(name): (int(free), bool(steers)) for name, (free, steers) in runners.items()}
    except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
        return {}
