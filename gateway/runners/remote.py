"""Remote runners (PROTOCOL.md section 10), the engine side.

`RemotePool` knows the connected runners (`RunnerLink`, one per `/ws/runners`
connection; gateway/runnersocket.py is the socket edge) and places runs on them
with the pure `gateway.core.assignment`.  A remote name is served by a
`RemoteRunner`, which the run driver treats like any runner: `place(ctx)` waits
(bounded) for a free runner of the name, then `run(ctx)` sends `run.assign` and
yields the results the runner sends, in order, answering its `steering.pull`
requests in between.  So a remote result takes the very path of an in-process
one (the driver's result rules, then the conversation actor), and a cancel,
deadline or interrupt closes the generator, which tells the runner `run.cancel`.
In cluster mode the pool's `elsewhere` (gateway.cluster.runners) places a run that
finds no free runner here on another node's, behind a `Lease` of the same shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal, Protocol

from gateway.core.assignment import Assignment, Outcome
from gateway.core.conversation import RunnerSpec
from gateway.errors import RunnerUnavailable
from gateway.protocol.frames import (
    RunAssign,
    RunCancel,
    SteeringBatch,
    SteeringItem,
    SteeringPullFrame,
    Strict,
    TranscriptItem,
)
from gateway.runners.base import Result, RunContext, run_failed
from gateway.runners.options import RunnerOptions

log = logging.getLogger("steerway.runners.remote")

LEASE_ITEMS = 256  # a run's results and pulls received but not yet taken by its driver
ENDED_KEPT = 1024  # ended runs a link remembers, so late results are ignored quietly
TERMINAL = frozenset({"run.completed", "run.failed"})


class _Lost:
    """What a run's driver gets when its runner went away."""


LOST = _Lost()


class Lease:
    """One run on one runner connection: what the runner sent for it, in order."""

    def __init__(self, link: RunnerLink, run_id: str) -> None:
        self.link = link
        self.run_id = run_id
        self.items: deque[object] = deque()
        self._ready = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self.finished = False  # the runner sent its terminal result
        self.lost = False  # the runner went away
        self.closed = False  # the run is over for the gateway

    async def put(self, item: object) -> None:
        """Queue an item; waits while the run's driver is LEASE_ITEMS behind (the runner's
        socket is then read no further: TCP pushes back on it)."""
        while len(self.items) >= LEASE_ITEMS and not self.closed:
            self._room.clear()
            await self._room.wait()
        if not self.closed:
            self.items.append(item)
            self._ready.set()

    async def get(self) -> object:
        while not self.items:
            if self.lost:
                return LOST
            self._ready.clear()
            await self._ready.wait()
        self._room.set()
        return self.items.popleft()

    def offer(self, items: list[object], limit: int) -> bool:
        """Queue items without waiting (cluster mode: relayed from another node, which
        keeps within `limit`); False, and nothing queued, when they would pass it."""
        if self.closed:
            return True
        if len(self.items) + len(items) > limit:
            return False
        self.items.extend(items)
        self._ready.set()
        return True

    def lose(self) -> None:
        self.lost = True
        self._ready.set()

    def close(self) -> None:
        self.closed = True
        self.items.clear()
        self._room.set()


class RunnerLink:
    """A connected remote runner, as the pool sees it; `send` queues a frame to it."""

    def __init__(
        self,
        name: str,
        supports_steering: bool,
        max_concurrency: int,
        send: Callable[[Strict], None],
    ) -> None:
        self.runner_id = 0  # set by the pool
        self.name = name
        self.supports_steering = supports_steering
        self.max_concurrency = max_concurrency
        self.send = send
        self.leases: dict[str, Lease] = {}
        self._ended: OrderedDict[str, None] = OrderedDict()

    def held(self, run_id: str) -> Lease | Literal["ended"] | None:
        """The lease of a run this runner holds; "ended" for one it held lately."""
        lease = self.leases.get(run_id)
        if lease is not None:
            return lease
        return "ended" if run_id in self._ended else None

    def forget(self, run_id: str) -> None:
        self.leases.pop(run_id, None)
        self._ended[run_id] = None
        if len(self._ended) > ENDED_KEPT:
            self._ended.popitem(last=False)


class Elsewhere(Protocol):
    """Cluster mode: the remote runners connected to other nodes (gateway.cluster.runners)."""

    async def place(self, run_id: str, name: str) -> Lease | None:
        """A place for the run on a free runner of `name` of another node, if any."""

    async def changed(self) -> None:
        """Return when what the other nodes' runners offer may have changed."""


class RemotePool:
    """Every connected remote runner, and the runs waiting for one."""

    def __init__(
        self,
        options: dict[str, RunnerOptions] | None = None,
        *,
        wait_s: float = 30.0,
        max_waiting: int = 256,
        names: tuple[str, ...] = (),
    ) -> None:
        self.options = dict(options or {})
        self.wait_s = wait_s
        self.assignment = Assignment(max_waiting)
        self.links: dict[int, RunnerLink] = {}
        self.leases: dict[str, Lease] = {}
        # Names remote runners serve: configured, the gateway's default, or announced
        # since start (with whether the last runner announcing it could steer).
        self.known: dict[str, bool] = {name: True for name in (*self.options, *names)}
        self._waiting: dict[str, asyncio.Future[Lease]] = {}
        self._runners: dict[str, RemoteRunner] = {}
        self._ids = itertools.count(1)
        self.elsewhere: Elsewhere | None = None  # set in cluster mode

    # ------------------------------------------------------------------ names

    def spec(self, name: str) -> RunnerSpec | None:
        if name not in self.known:
            return None
        options = self.options.get(name) or RunnerOptions()
        connected = [link.supports_steering for link in self.links.values() if link.name == name]
        steers = all(connected) if connected else self.known[name]
        if options.supports_steering is not None:
            steers = steers and options.supports_steering
        return RunnerSpec(name, steers, options.leftover_steering or "follow_up", remote=True)

    def learn(self, name: str, supports_steering: bool) -> None:
        """A runner of `name` is connected to another node (cluster mode)."""
        if not any(link.name == name for link in self.links.values()):
            self.known[name] = supports_steering

    def offered(self) -> dict[str, tuple[int, bool]]:
        """Per name of the runners connected here: free places, whether all steer."""
        steers: dict[str, bool] = {}
        for link in self.links.values():
            steers[link.name] = steers.get(link.name, True) and link.supports_steering
        return {name: (free, steers[name]) for name, free in self.assignment.free().items()}

    def runner(self, name: str) -> RemoteRunner | None:
        if name not in self.known:
            return None
        runner = self._runners.get(name)
        if runner is None:
            runner = self._runners[name] = RemoteRunner(self, name, self.options.get(name))
        return runner

    # ------------------------------------------------------------------ connections

    def join(self, link: RunnerLink) -> None:
        link.runner_id = next(self._ids)
        self.links[link.runner_id] = link
        self.known[link.name] = link.supports_steering
        self._wake(self.assignment.join(link.runner_id, link.name, link.max_concurrency))

    def leave(self, link: RunnerLink) -> None:
        """The runner went away: each run it held fails `runner_lost`."""
        if self.links.pop(link.runner_id, None) is None:
            return
        for run_id in self.assignment.leave(link.runner_id):
            lease = link.leases.get(run_id)
            if lease is not None:
                lease.lose()

    def stop_placing(self) -> None:
        """The gateway shuts down: the runs placed go on, no other run is placed."""
        self.assignment.stop()

    # ------------------------------------------------------------------ runs

    @contextlib.asynccontextmanager
    async def place(self, run_id: str, name: str) -> AsyncIterator[Lease]:
        """Hold a place for a run on a runner of `name`, waiting at most `wait_s`."""
        lease: Lease | None = None
        waiting: asyncio.Future[Lease] | None = None
        try:
            outcome = self.assignment.request(run_id, name)
            if outcome is Outcome.FULL:
                raise RunnerUnavailable(
                    f"{self.assignment.max_waiting} runs already wait for a runner named {name!r}"
                )
            if outcome is Outcome.WAITING:
                waiting = self._waiting[run_id] = asyncio.get_running_loop().create_future()
                try:
                    async with asyncio.timeout(self.wait_s):
                        lease = await self._wait(run_id, name, waiting)
                except TimeoutError:
                    raise RunnerUnavailable(
                        f"no runner named {name!r} was free within {self.wait_s:g} s"
                    ) from None
            else:
                lease = self._lease(run_id, outcome)
            yield lease
        finally:
            self._waiting.pop(run_id, None)
            if lease is None and waiting is not None and waiting.done() and not waiting.cancelled():
                lease = waiting.result()  # placed as the wait gave up: give it back
            if lease is None:
                self.assignment.withdraw(run_id, name)
            else:
                self.finish(lease)

    async def _wait(self, run_id: str, name: str, waiting: asyncio.Future[Lease]) -> Lease:
        """Wait for a runner here; in cluster mode, take a free one of another node as
        soon as one is heard of instead."""
        elsewhere = self.elsewhere
        while elsewhere is not None and not waiting.done() and not self.assignment.stopped:
            lease = await elsewhere.place(run_id, name)
            if lease is not None:
                if self.assignment.withdraw(run_id, name):
                    self.leases[run_id] = lease
                    return lease
                self.finish(lease)  # placed here meanwhile: the other place goes back
                break
            changed = asyncio.ensure_future(elsewhere.changed())
            try:
                await asyncio.wait((waiting, changed), return_when=asyncio.FIRST_COMPLETED)
            finally:
                changed.cancel()
        return await waiting

    def take(self, run_id: str, name: str) -> Lease | None:
        """A free runner of `name` now, or None: nothing waits (cluster mode: a run of
        another node, which asks elsewhere or waits there)."""
        if self.assignment.free().get(name, 0) <= 0:
            return None
        runner_id = self.assignment.request(run_id, name)
        assert isinstance(runner_id, int)
        return self._lease(run_id, runner_id)

    def _lease(self, run_id: str, runner_id: int) -> Lease:
        link = self.links[runner_id]
        lease = link.leases[run_id] = self.leases[run_id] = Lease(link, run_id)
        return lease

    def _wake(self, placements: list[tuple[str, int]]) -> None:
        pending = deque(placements)
        while pending:
            run_id, runner_id = pending.popleft()
            waiting = self._waiting.pop(run_id, None)
            if waiting is None or waiting.done():  # it gave up meanwhile: the next one
                pending.extend(self.assignment.release(run_id))
                continue
            waiting.set_result(self._lease(run_id, runner_id))

    def finish(self, lease: Lease) -> None:
        """The run is over for the gateway: tell the runner if it did not end it itself,
        and give its place to the next run waiting."""
        link, run_id = lease.link, lease.run_id
        if not (lease.finished or lease.lost):
            link.send(RunCancel(run_id=run_id))
        lease.close()
        link.forget(run_id)
        if self.leases.get(run_id) is lease:
            del self.leases[run_id]
        if self.links.get(link.runner_id) is link:  # not a runner of another node
            self._wake(self.assignment.release(run_id))


class RemoteRunner:
    """The runner of a remote name, as the run driver sees it."""

    def __init__(self, pool: RemotePool, name: str, options: RunnerOptions | None) -> None:
        options = options or RunnerOptions()
        self.name = name
        self._pool = pool
        self.leftover_steering: Literal["follow_up", "drop"] = (
            options.leftover_steering or "follow_up"
        )
        self.deadline_s = options.deadline_s
        self.idle_s = options.idle_s
        # Routing asks the pool (RemotePool.spec): it depends on the runners connected.
        self.supports_steering = True

    @contextlib.asynccontextmanager
    async def place(self, ctx: RunContext) -> AsyncIterator[None]:
        async with self._pool.place(ctx.run_id, self.name):
            yield

    async def run(self, ctx: RunContext) -> AsyncIterator[Result]:
        lease = self._pool.leases[ctx.run_id]
        lease.link.send(
            RunAssign(
                run_id=ctx.run_id,
                conversation_id=ctx.conversation_id,
                trigger_message_ids=[t.message_id for t in ctx.triggers],
                messages=[
                    TranscriptItem(
                        message_id=m.message_id,
                        role=m.role,
                        content=m.content,
                        run_id=m.run_id,
                        ts=m.ts,
                    )
                    for m in ctx.messages
                ],
                deadline_ms=ctx.deadline_ms,
                traceparent=ctx.traceparent,
            )
        )
        while True:
            item = await lease.get()
            if item is LOST:
                yield run_failed(
                    f"the remote runner serving {self.name!r} disconnected",
                    "runner_lost",
                    retryable=True,
                )
                return
            if isinstance(item, SteeringPullFrame):
                taken = await ctx.steering.pull(item.mode, item.limit)
                batch = [
                    SteeringItem(message_id=m.message_id, text=m.text, author=m.author, ts=m.ts)
                    for m in taken
                ]
                lease.link.send(SteeringBatch(request_id=item.request_id, messages=batch))
                continue
            yield item  # type: ignore[misc]  # checked by the driver's result rules
            if is_terminal(item):
                return


def is_terminal(result: Any) -> bool:
    """Whether a raw result ends its run: the runner's part of the run is then over."""
    return isinstance(result, dict) and result.get("type") in TERMINAL
