"""The dashboard: a live feed of runs, conversations and clients (PROTOCOL.md section 9).

`DashboardFeed` is told by the conversation actors when a batch changed run
documents or a conversation's head, and by the WebSocket edge when a
conversation's client count changed.  With no dashboard connected each hook
returns at once.  Otherwise each frame is encoded once and the same `Frame`
goes to every dashboard's bounded outbox; `conversation.updated` is sent at
most 4 times a second per conversation and reads the conversation's state
when it is sent, so the last change is never lost to the throttle.

`DashboardSocket` serves `GET /ws/dashboard`: it subscribes first, then reads
the snapshot from the store and sends it, then the frames queued meanwhile.
A frame queued during the read may carry an older run document than the
snapshot, but the last frame queued for a run is its newest document, so the
dashboard ends up current.  A dashboard that falls behind is closed with 4008
and starts again from a new snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from gateway import auth
from gateway.core.ids import now_ms
from gateway.core.limits import ConnectionSlots
from gateway.errors import FrameError, SteerwayError
from gateway.outbox import Frame, Outbox
from gateway.protocol.codes import CloseCode, ErrorCode
from gateway.protocol.frames import (
    ClientsUpdated,
    ConversationListing,
    ConversationUpdated,
    ErrorFrame,
    NodeInfo,
    PingFrame,
    Pong,
    PresenceUpdated,
    RunUpdated,
    Snapshot,
    encode,
    parse_client_frame,
)
from store.base import StoreError

if TYPE_CHECKING:
    from gateway.conversation import ConversationActor, ConversationHub

log = logging.getLogger("steerway.dashboard")

THROTTLE_S = 0.25  # conversation.updated: at most 4 a second per conversation
SNAPSHOT_RUNS = 200  # the newest runs in a snapshot, besides every live one
SNAPSHOT_CONVERSATIONS = 200
FORGET_AFTER = 1024  # throttle entries kept before the expired ones are dropped

Scope = dict[str, Any]


def listing(actor: ConversationActor) -> ConversationListing:
    """A loaded conversation as listed: its published head, its active run now."""
    return ConversationListing(
        conversation_id=actor.conversation_id,
        head=actor.log.published,
        last_activity=actor.record.last_activity,
        active_run=actor.summary(),
    )


class DashboardFeed:
    """Every dashboard of this node, and what changes they are told of."""

    def __init__(self, hub: ConversationHub) -> None:
        self.hub = hub
        self.started_at = now_ms()
        self._outboxes: dict[Outbox, None] = {}
        self._sent: dict[str, float] = {}  # conversation -> loop time of its last update
        self._due: dict[str, asyncio.TimerHandle] = {}  # conversation -> its next update
        self._presence_due: dict[str, asyncio.TimerHandle] = {}  # presence.updated, likewise

    def subscribe(self, outbox: Outbox) -> None:
        self._outboxes[outbox] = None

    def unsubscribe(self, outbox: Outbox) -> None:
        self._outboxes.pop(outbox, None)
        if not self._outboxes:
            for timer in [*self._due.values(), *self._presence_due.values()]:
                timer.cancel()
            self._due.clear()
            self._presence_due.clear()
            self._sent.clear()

    # ------------------------------------------------------------------ hooks

    def appended(self, conversation_id: str, runs: Iterable[dict[str, Any]]) -> None:
        """A batch of the conversation is stored and published; `runs` are the run
        documents it changed."""
        if not self._outboxes:
            return
        self._publish([Frame.of(encode(RunUpdated(run=doc))) for doc in runs])
        self._changed(conversation_id)

    def clients_changed(self, conversation_id: str) -> None:
        """A client of the conversation connected or went away."""
        if not self._outboxes:
            return
        count = self.hub.bus.count(conversation_id)
        frame = ClientsUpdated(conversation_id=conversation_id, count=count)
        self._publish([Frame.of(encode(frame))])
        self._changed(conversation_id)

    def presence_changed(self, conversation_id: str) -> None:
        """Someone came, went, or started or stopped typing or steering: the people of
        the conversation, at most 4 times a second, as they are when sent."""
        if not self._outboxes or conversation_id in self._presence_due:
            return
        loop = asyncio.get_running_loop()
        self._presence_due[conversation_id] = loop.call_later(
            THROTTLE_S, self._emit_presence, conversation_id
        )

    def _emit_presence(self, conversation_id: str) -> None:
        self._presence_due.pop(conversation_id, None)
        people = self.hub.presence.people(conversation_id)
        frame = PresenceUpdated(conversation_id=conversation_id, people=people)
        self._publish([Frame.of(encode(frame))])

    # ------------------------------------------------------------------ throttle

    def _changed(self, conversation_id: str) -> None:
        if conversation_id in self._due:
            return  # an update is due: it reads the conversation's state when it goes
        loop = asyncio.get_running_loop()
        wait = self._sent.get(conversation_id, -math.inf) + THROTTLE_S - loop.time()
        if wait <= 0:
            self._emit(conversation_id)
        else:
            self._due[conversation_id] = loop.call_later(wait, self._emit, conversation_id)

    def _emit(self, conversation_id: str) -> None:
        self._due.pop(conversation_id, None)
        actor = self.hub.actors.get(conversation_id)
        if actor is None or not self._outboxes:
            return
        now = asyncio.get_running_loop().time()
        self._sent[conversation_id] = now
        if len(self._sent) > FORGET_AFTER:
            self._sent = {c: t for c, t in self._sent.items() if now - t < THROTTLE_S}
        self._publish([Frame.of(encode(ConversationUpdated(conversation=listing(actor))))])

    def _publish(self, frames: list[Frame]) -> None:
        if frames:
            for outbox in tuple(self._outboxes):
                outbox.deliver(frames)

    # ------------------------------------------------------------------ snapshot

    async def snapshot(self) -> Snapshot:
        """Active and recent runs, conversations and client counts, as of now."""
        hub, store = self.hub, self.hub.store
        runs = {
            doc["run_id"]: doc for doc in await store.list_runs(None, None, SNAPSHOT_RUNS, None)
        }
        for doc in await store.live_runs(None):
            runs.setdefault(doc["run_id"], doc)
        records = await store.list_conversations(SNAPSHOT_CONVERSATIONS, None)
        # No await from here on: the loaded conversations' state is newer than their
        # documents (a streaming conversation's document is written once a second).
        conversations = {
            r.conversation_id: ConversationListing.model_validate(r.listing()) for r in records
        }
        for cid, actor in hub.actors.items():
            conversations[cid] = listing(actor)
        return Snapshot(
            runs=[runs[run_id] for run_id in sorted(runs, reverse=True)],
            conversations=sorted(
                conversations.values(),
                key=lambda c: (c.last_activity, c.conversation_id),
                reverse=True,
            ),
            clients={cid: n for cid in hub.actors if (n := hub.bus.count(cid))},
            presence={cid: hub.presence.people(cid) for cid in hub.presence.rooms()},
            node=NodeInfo(name=hub.node, started_at=self.started_at, conversations=len(hub.actors)),
        )


class DashboardSocket:
    """The ASGI app of `GET /ws/dashboard`."""

    def __init__(self, hub: ConversationHub, slots: ConnectionSlots) -> None:
        self.hub = hub
        self.slots = slots  # the per-process connection limit, shared by every endpoint

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        try:  # an admin token, or no secret (PROTOCOL.md section 7)
            auth.admit(scope, self.hub.settings, auth.for_admin)
            auth.take_slot(self.slots)
        except auth.Refused as exc:
            await auth.refuse(send, exc)
            return
        try:
            await self._serve(receive, send)
        finally:
            self.slots.release(None)

    async def _serve(self, receive: Any, send: Any) -> None:
        hub = self.hub
        await send({"type": "websocket.accept"})
        outbox = Outbox(hub.settings.outbox_frames, hub.settings.outbox_bytes)
        hub.dashboard.subscribe(outbox)  # before the snapshot's read: nothing falls between
        gauge = hub.metrics.connections.labels("dashboard")
        gauge.inc()
        writer = asyncio.create_task(self._write(send, outbox))
        try:
            await self._read(receive, outbox)
        finally:
            hub.dashboard.unsubscribe(outbox)
            gauge.dec()
            outbox.close()
            await writer

    async def _write(self, send: Any, outbox: Outbox) -> None:
        try:
            try:
                snapshot = await self.hub.dashboard.snapshot()
            except StoreError as exc:
                log.warning("dashboard: no snapshot, the store is unavailable: %s", exc)
                error = ErrorFrame(code=ErrorCode.INTERNAL, message="the store is unavailable")
                await send({"type": "websocket.send", "text": encode(error).decode()})
                await send({"type": "websocket.close", "code": 1011, "reason": "store"})
                return
            await send({"type": "websocket.send", "text": encode(snapshot).decode()})
            while (frame := await outbox.get()) is not None:
                await send(frame.message)
            if outbox.overflowed:
                self.hub.metrics.slow_consumers.inc()
                await send(
                    {
                        "type": "websocket.close",
                        "code": CloseCode.SLOW_CONSUMER,
                        "reason": "slow_consumer",
                    }
                )
        except OSError:  # the dashboard went away
            pass
        except Exception:
            log.exception("dashboard: writer failed")
            with contextlib.suppress(Exception):
                await send({"type": "websocket.close", "code": 1011, "reason": "internal error"})

    @staticmethod
    async def _read(receive: Any, outbox: Outbox) -> None:
        """The dashboard sends nothing but `ping`; anything else gets an error frame."""
        while True:
            message = await receive()
            if message["type"] != "websocket.receive":
                return
            text = message.get("text")
            try:
                if text is None:
                    raise FrameError("binary frames are not accepted; send JSON text")
                frame = parse_client_frame(text)
                if not isinstance(frame, PingFrame):
                    raise FrameError("the dashboard takes only `ping` frames")
                reply: Pong | ErrorFrame = Pong(nonce=frame.nonce)
            except SteerwayError as exc:
                reply = ErrorFrame(code=exc.code, message=exc.message)
            outbox.put(Frame.of(encode(reply)))
