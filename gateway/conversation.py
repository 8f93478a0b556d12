"""The conversation actor: the single writer of one conversation, and the hub of actors.

Everything that changes a conversation arrives in the actor's bounded mailbox
(user messages and cancels from the edges, results, pulls and deadlines from
the run drivers).  The actor takes what is waiting as one batch, feeds it to
the pure `ConversationMachine` and appends the resulting events through the
event log (one store write per batch).  It stops the drivers of ended runs at
once; it answers the senders and starts new runs' drivers once the batch is
stored, while it already takes its next inputs.  Actors start on demand and
stop when their conversation is idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from gateway.bus import Bus, Subscriber
from gateway.config import Settings
from gateway.core.conversation import ConversationMachine, Effects
from gateway.core.ids import now_ms
from gateway.core.recovery import Recovered, rebuild
from gateway.core.routing import Refusal
from gateway.core.runs import RunStatus, UserText
from gateway.dashboard import DashboardFeed
from gateway.errors import RoutingError, SteerwayError, StoreUnavailable
from gateway.eventlog import EventLog, run_document
from gateway.metrics import Metrics
from gateway.orchestrator import (
    DriverInput,
    RunAssigned,
    RunDriver,
    RunFinished,
    RunOutput,
    RunTimeout,
    SteeringPull,
)
from gateway.presence import PresenceBoard
from gateway.protocol.codes import ErrorCode
from gateway.protocol.frames import Ack, MessageFrame, RunError, RunSummary, UserMessage
from gateway.runners.base import TranscriptMessage, context_messages
from gateway.runners.registry import RunnerRegistry
from gateway.webhooks.subscriptions import Subscriptions
from store.base import (
    ConversationRecord,
    EventRecord,
    Store,
    StoreConflict,
    StoreError,
    WriteBatch,
)
from store.commit import GroupCommitter

log = logging.getLogger("steerway.conversation")

MAILBOX_SIZE = 1024
BATCH_INPUTS = 256
CONVERSATION_EVERY_MS = 1000  # a streaming conversation's document, at most this often
REMEMBERED_KEYS = 4096  # acks and ended runs kept in memory; older ones come from the store


@dataclass(slots=True)
class Submit:
    frame: MessageFrame
    author: str
    reply: Callable[[Ack | SteerwayError], None]


@dataclass(slots=True)
class Cancel:
    run_id: str | None
    reply: Callable[[SteerwayError | None], None]


@dataclass(slots=True)
class Recover:
    """The first input of an actor whose conversation a stopped gateway left live;
    `reason` ends what it was running (`gateway_restart`, or `node_lost` in a cluster)."""

    state: Recovered
    reason: str = "gateway_restart"


@dataclass(slots=True)
class Shutdown:
    """From `ConversationHub.end_runs`: with `end`, the active run ends `failed`/`shutdown`
    (ConversationMachine.shutdown); `reply` says, once the inputs before it are handled,
    whether a run is running (not one waiting for a remote runner: none is placed now)."""

    end: bool
    reply: asyncio.Future[bool]


Input = Submit | Cancel | Recover | Shutdown | DriverInput
Reply = tuple[Input, Callable[[], None]]  # an input and what answers it once its batch is stored


class _Idle:
    """Put in an empty mailbox by the idle watch: the actor looks whether it may stop."""


IDLE = _Idle()


class ConversationRef(Protocol):
    """What the edges hold of a conversation: its actor on this node, or (cluster mode) a
    proxy that forwards to the node running it."""

    conversation_id: str

    @property
    def stopped(self) -> bool: ...

    @property
    def published(self) -> int:
        """The last offset stored and handed to the bus."""

    @property
    def queued_runs(self) -> int: ...

    def summary(self) -> RunSummary | None: ...

    async def describe(self) -> None:
        """Bring `published`, `queued_runs` and `summary()` up to date (a proxy asks)."""

    async def post(self, item: Submit | Cancel) -> None:
        """Hand a message or cancel over; its `reply` is called with the outcome."""


class Ownership(Protocol):
    """Cluster mode: which node runs each conversation's actor (gateway/cluster)."""

    node: str

    def valid(self) -> bool:
        """This node may write: its leases are live."""

    def holds(self, conversation_id: str) -> bool:
        """This node holds the conversation's lease, and may write it."""

    async def acquire(self, conversation_id: str) -> str | None:
        """Take the conversation's lease: None when this node holds it now, else the node
        that does. Raises StoreUnavailable when the cluster cannot be asked."""

    def release(self, conversation_id: str) -> None:
        """Give up the lease of a conversation whose actor stopped (in the background)."""

    def remote(self, conversation_id: str, holder: str) -> ConversationRef:
        """A proxy for a conversation another node runs."""


def _ack(event: UserMessage, duplicate: bool = False) -> Ack:
    return Ack(
        client_msg_id=event.client_msg_id,
        offset=event.offset,
        message_id=event.message_id,
        route=event.route,
        run_id=event.run_id or "",
        duplicate=duplicate,
    )


class _Lru(OrderedDict[str, Any]):
    def remember(self, key: str, value: Any) -> None:
        self[key] = value
        self.move_to_end(key)
        if len(self) > REMEMBERED_KEYS:
            self.popitem(last=False)


class ConversationActor:
    def __init__(
        self, hub: ConversationHub, record: ConversationRecord, epoch: int | None = None
    ) -> None:
        self.hub = hub
        self.conversation_id = record.conversation_id
        self.record = record
        settings = hub.settings
        self.machine = ConversationMachine(
            record.conversation_id,
            hub.runners.spec,
            settings.runner,
            record.runner,
            max_queued_runs=settings.max_queued_runs,
            max_steering=settings.max_steering,
        )
        self.log = EventLog(
            record.conversation_id,
            record.head,
            hub.committer,
            hub.bus,
            hub.node,
            epoch,
            hub.webhooks,
        )
        self.log.on_conflict = self._conflicted
        self.mailbox: asyncio.Queue[Input | _Idle] = asyncio.Queue(MAILBOX_SIZE)
        self.drivers: dict[str, RunDriver] = {}
        self._acks: _Lru = _Lru()
        self._ended: _Lru = _Lru()
        self.stopped = False
        self._waiting = False  # for the mailbox, between steps
        self._steps = 0  # steps taken, for the idle watch
        # what the conversation document says of the runner and the active run, as a key
        self._documented: tuple[str | None, tuple[str, RunStatus, str] | None] | None = None
        self._idle_watch: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ edges

    async def post(self, item: Input) -> None:
        await self.mailbox.put(item)

    @property
    def published(self) -> int:
        return self.log.published

    @property
    def queued_runs(self) -> int:
        return len(self.machine.queue)

    async def describe(self) -> None:
        return None  # the actor's own state is always current

    def fence(self) -> None:
        """Cluster mode: this node no longer holds the lease; stop writing at once."""
        if self.log.conflict is None:
            self.log.conflict = StoreConflict(self.conversation_id, "the lease moved")
            self._conflicted()

    def _conflicted(self) -> None:
        """The store refused a batch: another node runs this conversation now. Stop (at
        once if waiting for input, else after the step under way: its inputs are
        answered); nothing more of this actor is written or published."""
        if self.task is not None and self._waiting:
            self.task.cancel()

    def summary(self) -> RunSummary | None:
        run = self.machine.active
        if run is None:
            return None
        return RunSummary(run_id=run.run_id, status=run.status.value, runner=run.runner)

    # ------------------------------------------------------------------ loop

    def _idle(self) -> bool:
        return (
            self.machine.idle
            and not self.drivers
            and not self.log.busy
            and self.mailbox.empty()
            and self.hub.bus.count(self.conversation_id) == 0
        )

    async def run(self) -> None:
        self._watch_idle(-1)
        try:
            while self.log.conflict is None:
                self._waiting = True
                try:
                    first = await self.mailbox.get()
                finally:
                    self._waiting = False
                if isinstance(first, _Idle):
                    if self._idle():
                        return
                    continue
                batch = [first]
                while len(batch) < BATCH_INPUTS and not self.mailbox.empty():
                    item = self.mailbox.get_nowait()
                    if not isinstance(item, _Idle):
                        batch.append(item)
                self._steps += 1
                await self._step(batch)
        finally:
            self.stopped = True
            if self._idle_watch is not None:
                self._idle_watch.cancel()
            self.hub.forget(self)
            for driver in self.drivers.values():
                driver.stop()
            if self.log.conflict is not None:  # inputs no one will handle here: refused
                while not self.mailbox.empty():
                    item = self.mailbox.get_nowait()
                    if not isinstance(item, _Idle):
                        _fail(item, self.log.conflict)

    def _watch_idle(self, steps: int) -> None:
        """Every `actor_idle_s`: an actor that took no input since the last look and has
        nothing left to do is woken to stop. (One timer per actor, not one per input:
        it stops between one and two idle times after its last input.)"""
        if self._waiting and self._steps == steps and self._idle():
            self.mailbox.put_nowait(IDLE)  # empty, or _idle() would have said no
        self._idle_watch = asyncio.get_running_loop().call_later(
            self.hub.settings.actor_idle_s, self._watch_idle, self._steps
        )

    async def _step(self, batch: list[Input]) -> None:
        replies: list[Reply] = []
        born: dict[int, float] = {}
        pending: dict[str, UserMessage] = {}
        for item in batch:
            try:
                await self._handle(item, replies, born, pending)
            except StoreError as exc:
                log.warning("conversation %s: store unavailable: %s", self.conversation_id, exc)
                _fail(item, exc)
            except Exception as exc:  # a bug must not take the actor down
                log.exception("conversation %s: input %s failed", self.conversation_id, item)
                _fail(item, exc)
        fx = self.machine.take_effects()
        cluster = self.hub.cluster
        if fx and cluster is not None and not cluster.holds(self.conversation_id):
            # The lease may have lapsed (Redis unreachable): another node may run this
            # conversation by now, so nothing more is written here; the actor stops.
            lapsed = StoreConflict(self.conversation_id, "this node's lease lapsed")
            self.log.conflict = lapsed
            _refuse(replies, lapsed)
            return
        if fx:
            try:
                await self._append(fx, born)
            except StoreConflict as exc:  # an earlier batch was refused: this one is not sent
                _refuse(replies, exc)
                return
        for key, event in pending.items():
            self._acks.remember(key, event)
        for run_id in fx.stop:
            driver = self.drivers.pop(run_id, None)
            if driver is not None:
                driver.stop()
        # running, or queued for a remote runner
        started = [run.run_id for run in fx.start if run is self.machine.active]
        # Acks only once the batch is stored (section 3); a new run's driver then too,
        # so the transcript it reads from the store holds its trigger messages.
        self.log.then(lambda: self._stored(replies, started), lambda exc: _refuse(replies, exc))

    def _stored(self, replies: list[Reply], started: list[str]) -> None:
        for _, reply in replies:
            reply()
        for run_id in started:
            self._start_driver(run_id)

    async def _append(self, fx: Effects, born: dict[int, float]) -> None:
        record, now = self.record, now_ms()
        # The conversation document goes with a batch that changes runs or the active run,
        # else at most once a second: a streaming run's batches are then one write of
        # events alone. Its `head` may lag the log by that second; `last_offset` does not.
        write = bool(fx.runs)
        run = self.machine.active
        key = (self.machine.runner, None if run is None else (run.run_id, run.status, run.runner))
        if write or key != self._documented:  # else the document says it already
            active = self.summary()
            state = (self.machine.runner, active.model_dump() if active else None)
            write = write or state != (record.runner, record.active_run)
            if write:
                record.runner, record.active_run = state
            self._documented = key
        write = write or now - record.last_activity >= CONVERSATION_EVERY_MS
        if write:
            record.last_activity = now
        await self.log.append(fx, record if write else None, born)
        docs = [run_document(run, self.hub.node) for run in fx.runs.values()]  # as stored
        self.log.then(lambda: self.hub.dashboard.appended(self.conversation_id, docs))
        metrics = self.hub.metrics
        counts = metrics.events.counts
        for event in fx.events:
            counts[event.type] += 1
        for run in fx.runs.values():
            if run.status.terminal:
                self._ended.remember(run.run_id, True)
                metrics.runs.labels(run.status.value).inc()
        for outcome, count in fx.steering.items():
            metrics.steering.labels(outcome).inc(count)

    async def _handle(
        self,
        item: Input,
        replies: list[Reply],
        born: dict[int, float],
        pending: dict[str, UserMessage],
    ) -> None:
        now = now_ms()
        machine = self.machine
        if isinstance(item, RunOutput):
            start = len(machine.fx.events)
            machine.result(item.run_id, item.result, now)
            for index in range(start, len(machine.fx.events)):
                born[index] = item.born
        elif isinstance(item, Submit):
            await self._submit(item, replies, pending, now)
        elif isinstance(item, SteeringPull):
            taken = machine.pull(item.run_id, item.mode, item.limit, now)
            replies.append((item, _resolver(item.reply, taken)))
        elif isinstance(item, Cancel):
            await self._cancel(item, replies, now)
        elif isinstance(item, RunTimeout):
            machine.timeout(item.run_id, item.reason, now)
        elif isinstance(item, RunFinished):
            machine.runner_finished(item.run_id, item.error, now)
        elif isinstance(item, RunAssigned):
            machine.assigned(item.run_id, now)
        elif isinstance(item, Recover):
            machine.restore(item.state, now, item.reason)
        elif isinstance(item, Shutdown):
            if item.end:
                machine.shutdown(now)
            running = machine.active is not None and machine.active.status is RunStatus.RUNNING
            replies.append((item, lambda: _settle(item.reply, running)))

    async def _submit(
        self,
        item: Submit,
        replies: list[Reply],
        pending: dict[str, UserMessage],
        now: int,
    ) -> None:
        reply = item.reply
        key = item.frame.client_msg_id
        if not self.hub.committer.healthy:
            reply(
                StoreUnavailable("the store is unavailable; nothing was stored", client_msg_id=key)
            )
            return
        first: UserMessage | None = pending.get(key) or self._acks.get(key)
        if first is None:
            # One indexed read per new message: also how a store outage is noticed
            # before anything is routed (section 3, `internal`: nothing stored).
            payload = await self.hub.store.find_client_message(self.conversation_id, key)
            if payload is not None:
                first = UserMessage.model_validate(orjson.loads(payload))
        if first is not None:
            ack = first
            replies.append((item, lambda: reply(_ack(ack, duplicate=True))))
            return
        routed = self.machine.message(item.frame, item.author, now)
        if isinstance(routed, Refusal):
            reply(RoutingError(routed.message, code=routed.code, client_msg_id=key))
            return
        event = routed[0]
        pending[key] = event
        replies.append((item, lambda: reply(_ack(event))))

    async def _cancel(self, item: Cancel, replies: list[Reply], now: int) -> None:
        reply = item.reply
        if self.machine.cancel(item.run_id, now):
            replies.append((item, lambda: reply(None)))
            return
        run_id = item.run_id
        if run_id is None:
            reply(RoutingError("no run is active", code=ErrorCode.NO_ACTIVE_RUN))
            return
        known = run_id in self._ended
        if not known:
            doc = await self.hub.store.get_run(run_id)
            known = doc is not None and doc.get("conversation_id") == self.conversation_id
        if known:
            reply(RoutingError(f"run {run_id} already ended", code=ErrorCode.NO_ACTIVE_RUN))
        else:
            reply(
                RoutingError("no run of that id in this conversation", code=ErrorCode.UNKNOWN_RUN)
            )

    def _start_driver(self, run_id: str) -> None:
        run = self.machine.active
        if self.stopped or run is None or run.run_id != run_id or run_id in self.drivers:
            return  # it ended (a cancel, say) while its start was being stored
        runner = self.hub.runners.get(run.runner)
        if runner is None:  # the runner went away between routing and start
            self.mailbox.put_nowait(
                RunFinished(
                    run_id,
                    RunError(
                        code="runner_unavailable",
                        message=f"no runner named {run.runner!r}",
                        retryable=True,
                    ),
                )
            )
            return
        settings = self.hub.settings
        driver = RunDriver(
            run,
            runner,
            self.post,
            lambda: self._transcript(run_id),
            deadline_s=settings.run_deadline_s,
            idle_s=settings.run_idle_s,
        )
        self.drivers[run_id] = driver
        driver.start()

    async def _transcript(self, run_id: str) -> list[TranscriptMessage]:
        turns = await self.hub.store.transcript(self.conversation_id)
        messages = [
            TranscriptMessage(t.message_id, t.role, t.content, t.run_id, t.ts)  # type: ignore[arg-type]
            for t in turns
        ]
        machine = self.machine
        run = machine.live_run(run_id)
        if run is None:
            return messages
        pending = {m.message_id for queued in machine.queue for m in queued.triggers}
        pending.update(m.message_id for m in run.steering)
        return context_messages(messages, run.trigger_message_ids, pending)


def _resolver(future: asyncio.Future[list[UserText]], value: list[UserText]) -> Callable[[], None]:
    def resolve() -> None:
        if not future.done():  # the driver may have been stopped meanwhile
            future.set_result(value)

    return resolve


def _settle(future: asyncio.Future[bool], value: bool) -> None:
    if not future.done():
        future.set_result(value)


def _refuse(replies: list[Reply], exc: StoreConflict) -> None:
    """The store refused the batch these inputs were in: each is told, nothing stored."""
    for item, _ in replies:
        _fail(item, exc)


def _fail(item: Input, exc: Exception) -> None:
    error = (
        StoreUnavailable("the store is unavailable; nothing was stored")
        if isinstance(exc, StoreError)
        else SteerwayError("internal error", code=ErrorCode.INTERNAL)
    )
    if isinstance(item, Submit):
        error.client_msg_id = item.frame.client_msg_id
        item.reply(error)
    elif isinstance(item, Cancel):
        item.reply(error)
    elif isinstance(item, SteeringPull) and not item.reply.done():
        item.reply.set_result([])
    elif isinstance(item, Shutdown):
        _settle(item.reply, False)


class ConversationHub:
    """All conversation actors of this node, with what they share."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        bus: Bus,
        runners: RunnerRegistry,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.store = store
        self.bus = bus
        self.runners = runners
        self.metrics = metrics
        self.committer = GroupCommitter(store)
        self.node = settings.node or f"{socket.gethostname()}:{os.getpid()}"
        self.cluster: Ownership | None = None  # set by gateway.cluster in cluster mode
        self.webhooks: Subscriptions | None = None  # set by gateway.app when configured
        self.actors: dict[str, ConversationActor] = {}
        self.dashboard = DashboardFeed(self)
        liveness_s = settings.ws_ping_interval_s + settings.ws_ping_timeout_s
        self.presence = PresenceBoard(bus, liveness_s, self.dashboard.presence_changed)
        self._loading: dict[str, asyncio.Future[ConversationRef]] = {}
        self._ending: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.committer.start()

    async def shutdown(self, grace_s: float) -> None:
        """The gateway stops: `end_runs`, then stop every actor and flush every write."""
        await self.end_runs(grace_s)
        await self.stop()

    async def end_runs(self, grace_s: float) -> None:
        """The gateway stops (SIGTERM; it no longer accepts): no run is placed on a remote
        runner any more, active runs may go on for `grace_s` seconds, queued runs and
        follow-ups starting as usual meanwhile; then every run still running ends
        `failed`/`shutdown` and its runner is stopped (a remote one told `run.cancel`),
        queued runs are left for the next gateway. The first call starts it and every
        caller waits for it: the runner sockets, kept open meanwhile, start it as the
        server shuts down (gateway.runnersocket); the lifespan's `shutdown` waits for it."""
        if self._ending is None:
            self._ending = asyncio.create_task(self._end_runs(grace_s), name="end-runs")
        await asyncio.shield(self._ending)

    async def _end_runs(self, grace_s: float) -> None:
        if self.runners.remote is not None:
            self.runners.remote.stop_placing()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while (left := deadline - loop.time()) > 0 and await self._ask_actors(end=False):
            drivers = self._drivers()
            if not drivers:
                break
            # RunDriver.wait returns within a second: a stuck runner is looked at again
            waits = [asyncio.ensure_future(d.wait()) for d in drivers]
            _, pending = await asyncio.wait(waits, timeout=left, return_when="FIRST_COMPLETED")
            for wait in pending:
                wait.cancel()
        drivers = self._drivers()
        await self._ask_actors(end=True)
        # the runners of the runs just ended are stopped, each remote one sent `run.cancel`,
        # before a runner socket closes behind it
        kept = set(self._drivers())
        await asyncio.gather(*(d.wait() for d in drivers if d not in kept))

    def _drivers(self) -> list[RunDriver]:
        return [d for a in list(self.actors.values()) for d in a.drivers.values()]

    async def _ask_actors(self, end: bool) -> bool:
        """`Shutdown` to every actor; whether any still has a running run."""
        loop = asyncio.get_running_loop()
        replies: list[asyncio.Future[bool]] = []
        for actor in list(self.actors.values()):
            if not actor.stopped:
                reply: asyncio.Future[bool] = loop.create_future()
                await actor.post(Shutdown(end, reply))
                replies.append(reply)
        return any(await asyncio.gather(*replies))

    async def stop(self) -> None:
        """Stop every actor and the runs it drives, then flush pending writes."""
        for actor in list(self.actors.values()):
            drivers = list(actor.drivers.values())
            if actor.task is not None:
                actor.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await actor.task
            for driver in drivers:
                await driver.wait()
        await self.presence.stop()
        await self.committer.stop()

    async def get(self, conversation_id: str) -> ConversationRef:
        """The conversation's actor, started (and its state loaded) on first use; in a
        cluster, a proxy when another node runs it."""
        actor = self.actors.get(conversation_id)
        if actor is not None and not actor.stopped and actor.log.conflict is None:
            if self.cluster is None or self.cluster.holds(conversation_id):
                return actor
            actor.fence()  # its lease lapsed or moved: it writes nothing more
        loading = self._loading.get(conversation_id)
        if loading is not None:
            return await asyncio.shield(loading)
        future: asyncio.Future[ConversationRef] = asyncio.get_running_loop().create_future()
        self._loading[conversation_id] = future
        try:
            cluster, epoch, reason = self.cluster, None, "gateway_restart"
            if cluster is not None:
                holder = await cluster.acquire(conversation_id)
                if holder is not None:
                    remote = cluster.remote(conversation_id, holder)
                    future.set_result(remote)
                    return remote
                reason = "node_lost"
            try:
                if cluster is not None:  # fence first: a writer before us is refused from now
                    epoch = await self.store.claim(conversation_id)
                record, recovered = await self._load(conversation_id)
            except StoreError as exc:
                if cluster is not None:
                    cluster.release(conversation_id)
                raise StoreUnavailable(f"the store is unavailable: {exc}") from None
            actor = ConversationActor(self, record, epoch)
            if recovered:
                actor.mailbox.put_nowait(Recover(recovered, reason))
            self.actors[conversation_id] = actor
            actor.task = asyncio.create_task(actor.run(), name=f"conversation-{conversation_id}")
            future.set_result(actor)
            return actor
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters get it through their own await
            raise
        finally:
            del self._loading[conversation_id]

    async def _load(self, conversation_id: str) -> tuple[ConversationRecord, Recovered]:
        """A conversation's record, and what a stopped gateway left live in it: its live
        runs, and the runs named by events that its documents do not reflect yet."""
        store = self.store
        record = await store.get_conversation(conversation_id)
        head = await store.last_offset(conversation_id)
        if record is None:
            record = ConversationRecord(conversation_id, head=0, last_activity=now_ms())
        docs = {doc["run_id"]: doc for doc in await store.live_runs(conversation_id)}
        candidates = set(docs)
        after = record.head
        tail: list[EventRecord] = []
        while after < head:  # the tail a crash left ahead of the documents: one batch at most
            page = await store.read_events(conversation_id, after, head - after)
            if not page:
                break
            for text in page:
                ev = orjson.loads(text)
                if ev.get("run_id") is not None:
                    candidates.add(ev["run_id"])
                tail.append(EventRecord(conversation_id, ev["offset"], ev["type"], ev["ts"], text))
            after += len(page)
        if self.webhooks is not None and tail:
            # a crash between a commit's events and its deliveries: written now, once
            deliveries = self.webhooks.deliveries(tail)
            if deliveries:
                await store.write(WriteBatch(deliveries=deliveries))
        record.head = head
        events = {
            run_id: [orjson.loads(p) for p in await store.run_events(conversation_id, run_id)]
            for run_id in candidates
        }
        return record, rebuild(events, docs, self.settings.runner)

    async def recover(self) -> None:
        """Take over every conversation a stopped gateway left with live runs, so that
        queued runs and waiting steering run without waiting for a client."""
        try:
            live = await self.store.live_runs(None)
        except StoreError as exc:
            log.error("recovery deferred, the store is unavailable: %s", exc)
            return
        for conversation_id in dict.fromkeys(doc["conversation_id"] for doc in live):
            try:
                await self.get(conversation_id)
            except SteerwayError as exc:
                log.error("conversation %s: recovery failed: %s", conversation_id, exc)

    async def follow(
        self, conversation_id: str, subscriber: Subscriber
    ) -> tuple[ConversationRef, int]:
        """Subscribe to a conversation's events: its ref, and `head`, such that every event
        up to `head` is in the store and every one after it reaches `subscriber` (PROTOCOL.md
        section 2). `unfollow` undoes it."""
        ref = await self.get(conversation_id)
        await self.bus.join(conversation_id)
        try:
            await ref.describe()
        except BaseException:
            self.bus.leave(conversation_id)
            raise
        # No await from here: nothing is published between the subscription and the head.
        self.bus.subscribe(conversation_id, subscriber)
        head = self.bus.head(conversation_id)
        return ref, ref.published if head is None else head

    def unfollow(self, conversation_id: str, subscriber: Subscriber) -> None:
        self.bus.unsubscribe(conversation_id, subscriber)
        self.bus.leave(conversation_id)

    def forget(self, actor: ConversationActor) -> None:
        if self.actors.get(actor.conversation_id) is actor:
            del self.actors[actor.conversation_id]
            if self.cluster is not None and actor.log.conflict is None:
                self.cluster.release(actor.conversation_id)

    def check_writable(self) -> None:
        """Refuse new messages at once while store writes are failing (the actor is busy
        retrying, and an ack could take as long as the outage), or while this cluster
        node cannot renew its leases."""
        if not self.committer.healthy:
            raise StoreUnavailable("the store is unavailable; nothing was stored")
        if self.cluster is not None and not self.cluster.valid():
            raise StoreUnavailable("the cluster's Redis is unavailable; nothing was stored")

    async def submit(self, conversation_id: str, frame: MessageFrame, author: str) -> Ack:
        """Submit a message and wait for its ack (REST)."""
        self.check_writable()
        actor = await self.get(conversation_id)
        done: asyncio.Future[Ack | SteerwayError] = asyncio.get_running_loop().create_future()
        await actor.post(Submit(frame, author, done.set_result))
        outcome = await done
        if isinstance(outcome, SteerwayError):
            raise outcome
        return outcome

    async def cancel(self, conversation_id: str, run_id: str | None) -> None:
        actor = await self.get(conversation_id)
        done: asyncio.Future[SteerwayError | None] = asyncio.get_running_loop().create_future()
        await actor.post(Cancel(run_id, done.set_result))
        outcome = await done
        if outcome is not None:
            raise outcome
