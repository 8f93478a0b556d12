"""A conversation's event log: the one place offsets are assigned.

Offsets start at 1 and grow by exactly 1 (PROTOCOL.md section 1).  The log
numbers a batch of events, encodes each once, writes the batch through the
group committer and only then publishes it, so no client ever holds an offset
that the store does not (section 2, durability).  A store- or Redis-backed
allocator for several nodes replaces `_number`; nothing else here changes.
"""

from __future__ import annotations

from gateway.bus import Bus
from gateway.core.conversation import Effects
from gateway.outbox import Frame
from gateway.protocol.frames import MessageCompleted, MessageDelta, UserMessage, encode
from store.base import ConversationRecord, EventRecord, TurnRecord, WriteBatch
from store.commit import GroupCommitter


class EventLog:
    def __init__(
        self, conversation_id: str, head: int, committer: GroupCommitter, bus: Bus, node: str
    ) -> None:
        self.conversation_id = conversation_id
        self._node = node
        self.head = head  # the last offset assigned
        self.published = head  # the last offset stored and handed to the bus
        self._committer = committer
        self._bus = bus

    def _number(self) -> int:
        self.head += 1
        return self.head

    async def append(
        self, fx: Effects, conversation: ConversationRecord | None, born: dict[int, float]
    ) -> list[Frame]:
        """Number, encode, store and publish the effects' events, with the conversation's
        document when given; `born` maps an event's index in `fx.events` to when the
        runner result behind it arrived."""
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
            node=self._node,
            events=records,
            runs=[run.document() for run in fx.runs.values()],
            conversations=[conversation] if conversation is not None else [],
            turns=[
                TurnRecord(
                    cid, t.role, t.content, t.message_id, t.run_id, t.ts, offsets[t.message_id]
                )
                for t in fx.turns
            ],
        )
        await self._committer.write(batch)
        self.published = self.head
        if frames:
            self._bus.publish(cid, frames)
        return frames
