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

In a cluster (`peers`, gateway/cluster/dashboard.py) each node also hands its
frames and its client counts to the other nodes, whether or not a dashboard is
open (a node cannot know in time that one opens elsewhere), and fans theirs out
to its own dashboards: a dashboard on any node sees every node's runs and
clients.  While a dashboard is open, `nodes.updated` lists every node's figures
once a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

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
    NodesUpdated,
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
NODES_S = 1.0  # nodes.updated, while a dashboard is open
RATE_S = 1.0  # events per second are measured over at least this

Scope = dict[str, Any]


def listing(actor: ConversationActor) -> ConversationListing:
    """A loaded conversation as listed: its published head, its active run now."""
    return ConversationListing(
        conversation_id=actor.conversation_id,
        head=actor.log.published,
        last_activity=actor.record.last_activity,
        active_run=actor.summary(),
    )


class Peers(Protocol):
    """The other nodes of a cluster, as the feed sees them (gateway/cluster/dashboard.py)."""

    def relay(self, frames: list[Frame]) -> None:
        """Hand this node's `run.updated`/`conversation.updated` frames to the others."""

    def relay_clients(self, conversation_id: str, count: int) -> None:
        """Tell the others this node's client count of a conversation."""

    async def nodes(self) -> list[NodeInfo] | None:
        """Every live node's figures as of its last heartbeat; None: not known now."""


class DashboardFeed:
    """Every dashboard of this node, and what changes they are told of."""

    def __init__(self, hub: ConversationHub) -> None:
        self.hub = hub
        self.started_at = now_ms()
        self.peers: Peers | None = None  # set in cluster mode
        self._outboxes: dict[Outbox, None] = {}
        self._sent: dict[str, float] = {}  # conversation -> loop time of its last update
        self._due: dict[str, asyncio.TimerHandle] = {}  # conversation -> its next update
        self.local: dict[str, int] = {}  # conversation -> its sockets on this node, if any
        self._remote: dict[str, dict[str, int]] = {}  # node -> conversation -> its sockets
        self._nodes: asyncio.Task[None] | None = None
        self._rate = (0.0, 0.0, 0.0)  # (monotonic time, events total) then, rate since
        self._presence_due: dict[str, asyncio.TimerHandle] = {}  # presence.updated, likewise

    def subscribe(self, outbox: Outbox) -> None:
        self._outboxes[outbox] = None
        if self._nodes is None:
            self._nodes = asyncio.create_task(self._tell_nodes(), name="dashboard-nodes")

    def unsubscribe(self, outbox: Outbox) -> None:
        self._outboxes.pop(outbox, None)
        if not self._outboxes:
            if self._nodes is not None:
                self._nodes.cancel()
                self._nodes = None
            if self.peers is None:  # in a cluster the other nodes' dashboards still want them
                for timer in self._due.values():
                    timer.cancel()
                self._due.clear()
                self._sent.clear()
            for timer in self._presence_due.values():
                timer.cancel()
            self._presence_due.clear()

    @property
    def _watched(self) -> bool:
        return bool(self._outboxes) or self.peers is not None

    # ------------------------------------------------------------------ hooks

    def appended(self, conversation_id: str, runs: Iterable[dict[str, Any]]) -> None:
        """A batch of the conversation is stored and published; `runs` are the run
        documents it changed."""
        if not self._watched:
            return
        frames = [Frame.of(encode(RunUpdated(run=doc))) for doc in runs]
        self._publish(frames)
        if frames and self.peers is not None:
            self.peers.relay(frames)
        self._changed(conversation_id)

    def clients_changed(self, conversation_id: str) -> None:
        """A client of the conversation connected or went away."""
        count = self.hub.bus.count(conversation_id)
        if count:
            self.local[conversation_id] = count
        else:
            self.local.pop(conversation_id, None)
        if self.peers is not None:
            self.peers.relay_clients(conversation_id, count)
        if not self._watched:
            return
        self._publish_clients([conversation_id])
        self._changed(conversation_id)

    # ------------------------------------------------------------------ other nodes

    def received(self, frames: list[Frame]) -> None:
        """Another node's `run.updated`/`conversation.updated` frames."""
        self._publish(frames)

    def received_clients(self, node: str, counts: dict[str, int], full: bool) -> None:
        """Another node's client counts: some that changed, or all of them (`full`)."""
        table = self._remote.setdefault(node, {})
        changed = set(counts)
        if full:
            changed |= set(table)
            table.clear()
        for cid, count in counts.items():
            if count > 0:
                table[cid] = count
            else:
                table.pop(cid, None)
        if not table:
            del self._remote[node]
        self._publish_clients(sorted(changed))

    def _forget_nodes(self, live: set[str]) -> None:
        """A node that is gone has no clients any more."""
        for node in [n for n in self._remote if n not in live]:
            self.received_clients(node, {}, full=True)

    def clients(self, conversation_id: str) -> int:
        """The conversation's sockets on every node this node knows of."""
        remote = sum(t.get(conversation_id, 0) for t in self._remote.values())
        return self.local.get(conversation_id, 0) + remote

    def _publish_clients(self, conversation_ids: list[str]) -> None:
        if self._outboxes:
            self._publish(
                [
                    Frame.of(encode(ClientsUpdated(conversation_id=cid, count=self.clients(cid))))
                    for cid in conversation_ids
                ]
            )

    # ------------------------------------------------------------------ nodes

    def figures(self) -> NodeInfo:
        """This node now (its liveness info in a cluster, docs/deployment.md)."""
        actors = self.hub.actors
        return NodeInfo(
            name=self.hub.node,
            started_at=self.started_at,
            conversations=len(actors),
            runs=sum(1 for a in list(actors.values()) if a.machine.active is not None),
            clients=sum(self.local.values()),
            events_per_s=self._events_per_s(),
        )

    def _events_per_s(self) -> float:
        """Events appended per second, over the time since the last measure (at least
        `RATE_S`: every caller sees the same figure within it)."""
        then, before, rate = self._rate
        now = asyncio.get_running_loop().time()
        if now - then >= RATE_S:
            total = self.hub.metrics.events.counts.total()
            rate = 0.0 if then == 0.0 else round((total - before) / (now - then), 1)
            self._rate = (now, total, rate)
        return rate

    async def nodes(self) -> list[NodeInfo]:
        """Every live node by name, this one as it is now."""
        here = self.figures()
        known = await self.peers.nodes() if self.peers is not None else None
        if known is None:
            return [here]
        self._forget_nodes({n.name for n in known})
        by_name = {n.name: n for n in known}
        by_name[here.name] = here
        return [by_name[name] for name in sorted(by_name)]

    async def _tell_nodes(self) -> None:
        while True:
            await asyncio.sleep(NODES_S)
            nodes = await self.nodes()
            self._publish([Frame.of(encode(NodesUpdated(nodes=nodes)))])

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
        if actor is None or not self._watched:
            return
        now = asyncio.get_running_loop().time()
        self._sent[conversation_id] = now
        if len(self._sent) > FORGET_AFTER:
            self._sent = {c: t for c, t in self._sent.items() if now - t < THROTTLE_S}
        frames = [Frame.of(encode(ConversationUpdated(conversation=listing(actor))))]
        self._publish(frames)
        if self.peers is not None:
            self.peers.relay(frames)

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
        nodes = await self.nodes()
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
            clients={
                cid: n for cid in self._conversations_with_clients() if (n := self.clients(cid))
            },
            presence={cid: hub.presence.people(cid) for cid in hub.presence.rooms()},
            node=next(n for n in nodes if n.name == hub.node),
            nodes=nodes,
        )

    def _conversations_with_clients(self) -> set[str]:
        return set(self.local).union(*self._remote.values())


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
