"""A conversation's event log: the one place offsets are assigned.

Offsets start at 1 and grow by exactly 1 (PROTOCOL.md section 1).  The log
numbers a batch of events, encodes each once, hands the batch to the group
committer and publishes it only once it is stored, so no client ever holds an
offset that the store does not (section 2, durability).  The actor does not
wait for that: it goes on with its next inputs while up to PIPELINE_DEPTH
batches are in flight, and each batch is published, and its callbacks run, in
append order.  With many conversations an actor's batch then joins the next
commit instead of the one after.

In cluster mode each batch carries the writer's fencing epoch: once another node
has taken the conversation over, the store refuses the batch (StoreConflict) and
every later one of this log; none of them is published, their `failed` callbacks
run instead, and `on_conflict` tells the actor to stop.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway import tracing
from gateway.bus import Bus
from gateway.core.conversation import Effects
from gateway.core.runs import Run
from gateway.outbox import Frame
from gateway.protocol.frames import MessageCompleted, MessageDelta, UserMessage, encode
from gateway.webhooks.subscriptions import Subscriptions
from store.base import ConversationRecord, EventRecord, StoreConflict, TurnRecord, WriteBatch
from store.commit import GroupCommitter

log = logging.getLogger("steerway.eventlog")

PIPELINE_DEPTH = 8  # batches of one conversation in flight to the store


def run_document(run: Run, node: str) -> dict[str, Any]:
    """A run's document as stored and shown (PROTOCOL.md section 8): the core's, named
    with the node that runs it (in a cluster, the owner of its conversation now)."""
    return {**run.document(), "node": node}


@dataclass(slots=True)
class _InFlight:
    stored: asyncio.Future[None]
    head: int
    frames: list[Frame]
    then: list[Callable[[], None]] = field(default_factory=list)
    failed: list[Callable[[StoreConflict], None]] = field(default_factory=list)
    spans: list[Any] | None = None  # the batch's store commit spans (gateway.tracing)
    deliveries: bool = False  # webhook deliveries are in it


class EventLog:
    def __init__(
        self,
        conversation_id: str,
        head: int,
        committer: GroupCommitter,
        bus: Bus,
        node: str,
        epoch: int | None = None,
        webhooks: Subscriptions | None = None,
    ) -> None:
        self.conversation_id = conversation_id
        self._node = node
        self.head = head  # the last offset assigned
        self.published = head  # the last offset stored and handed to the bus
        self._committer = committer
        self._bus = bus
        self._inflight: deque[_InFlight] = deque()
        self.epoch = epoch  # the fencing epoch (cluster mode), None on a single node
        self.conflict: StoreConflict | None = None  # set once the store refused a batch
        self.on_conflict: Callable[[], None] | None = None
        self._webhooks = webhooks  # the endpoints' deliveries go in the events' commit

    def _number(self) -> int:
        self.head += 1
        return self.head

    @property
    def busy(self) -> bool:
        """Batches are on their way to the store."""
        return bool(self._inflight)

    async def append(
        self, fx: Effects, conversation: ConversationRecord | None, born: dict[int, float]
    ) -> list[Frame]:
        """Number and encode the effects' events and queue them, with the conversation's
        document when given, for the store; they are published once stored. `born` maps
        an event's index in `fx.events` to when the runner result behind it arrived.
        Returns once the batch is queued, after waiting while PIPELINE_DEPTH are.
        Raises the StoreConflict once the store has refused one of this log's batches."""
        if self.conflict is not None:
            raise self.conflict
        cid = self.conversation_id
        frames: list[Frame] = []
        records: list[EventRecord] = []
        for index, event in enumerate(fx.events):
            event.offset = self._number()
            frame = Frame.of(
                encode(event), event.offset, event if isinstance(event, MessageDelta) else None
            )
            frame.born = born.get(index, 0.0)
            frames.append(frame)
            records.append(
                EventRecord(
                    conversation_id=cid,
                    offset=event.offset,
                    type=event.type,
                    ts=event.ts,
                    payload=frame.text,
                    run_id=event.run_id,
                    client_msg_id=event.client_msg_id if isinstance(event, UserMessage) else None,
                )
            )
        # user.message and message.completed carry the message id of their turn
        offsets = {
            event.message_id: event.offset
            for event in fx.events
            if isinstance(event, UserMessage | MessageCompleted)
        }
        if conversation is not None:
            conversation.head = self.head
        batch = WriteBatch(
            events=records,
            runs=[run_document(run, self._node) for run in fx.runs.values()],
            conversations=[conversation] if conversation is not None else [],
            turns=[
                TurnRecord(
                    cid, t.role, t.content, t.message_id, t.run_id, t.ts, offsets[t.message_id]
                )
                for t in fx.turns
            ],
            fences={} if self.epoch is None else {cid: self.epoch},
            deliveries=[] if self._webhooks is None else self._webhooks.deliveries(records),
        )
        traces = tracing.RUNS  # None unless runs are traced: then this is all it costs
        spans = None if traces is None else traces.observe(cid, fx.events)
        while len(self._inflight) >= PIPELINE_DEPTH:
            await asyncio.wait([self._inflight[0].stored])
        stored = await self._committer.submit(batch, writer=self)
        self._inflight.append(
            _InFlight(stored, self.head, frames, spans=spans, deliveries=bool(batch.deliveries))
        )
        stored.add_done_callback(self._stored)
        return frames

    def then(
        self,
        callback: Callable[[], None],
        failed: Callable[[StoreConflict], None] | None = None,
    ) -> None:
        """Run `callback` once every batch appended so far is stored and published
        (at once when none is in flight), or `failed` if the store refused one."""
        if self._inflight:
            self._inflight[-1].then.append(callback)
            if failed is not None:
                self._inflight[-1].failed.append(failed)
        elif self.conflict is not None:
            if failed is not None:
                failed(self.conflict)
        else:
            callback()

    async def flush(self) -> None:
        """Return once every batch appended so far is stored and published."""
        if self._inflight:
            await asyncio.wait([self._inflight[-1].stored])

    def _stored(self, _: asyncio.Future[None]) -> None:
        # Futures may complete in any order; batches are published in append order.
        while self._inflight and self._inflight[0].stored.done():
            batch = self._inflight.popleft()
            if batch.stored.cancelled():  # the committer stopped: nothing more is published
                continue
            exc = batch.stored.exception()
            if batch.spans:
                tracing.stored(batch.spans, exc or self.conflict)
            if exc is not None or self.conflict is not None:
                self._refused(batch, exc)
                continue
            self.published = batch.head
            if batch.frames:
                self._bus.publish(self.conversation_id, batch.frames)
            if batch.deliveries and self._webhooks is not None:
                self._webhooks.wake()
            for callback in batch.then:
                try:
                    callback()
                except Exception:  # one failing reply must not hold back the others
                    log.exception("%s: a callback after a commit failed", self.conversation_id)

    def _refused(self, batch: _InFlight, exc: BaseException | None) -> None:
        """The store refused this batch (or an earlier one of this log): nothing of it
        is published; whoever waited for it is told."""
        first = self.conflict is None
        if first:
            self.conflict = (
                exc
                if isinstance(exc, StoreConflict)
                else StoreConflict(self.conversation_id, f"store write failed: {exc}")
            )
            log.error("%s: this node no longer writes it: %s", self.conversation_id, exc)
        conflict = self.conflict
        assert conflict is not None
        for failed in batch.failed:
            try:
                failed(conflict)
            except Exception:
                log.exception("%s: a callback after a refused commit failed", self.conversation_id)
        if first and self.on_conflict is not None:
            self.on_conflict()
