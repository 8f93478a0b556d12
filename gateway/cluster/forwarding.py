"""Forwarding: a message or cancel that reaches a node which does not run the
conversation goes to the node that does, and its outcome comes back.

Each node reads requests on its own channel, in order, and hands them to its actor
as if a local client had sent them: the ack comes back once the `user.message` is
durably stored, as on one node. A request unanswered within the timeout, or
answered `moved` (the lease changed hands meanwhile), is asked again of whoever
holds the lease now, once: `client_msg_id` makes a resent message safe (PROTOCOL.md
section 3, idempotency). Then the sender gets `internal`: nothing is lost silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway.cluster.redisbus import RedisBus, node_channel
from gateway.conversation import Cancel, ConversationActor, ConversationHub, Submit
from gateway.errors import SteerwayError, StoreUnavailable
from gateway.protocol.frames import (
    Ack,
    ErrorFrame,
    FrameLimits,
    NodeReply,
    NodeRequest,
    RunFromRunner,
    RunSummary,
    RunToRunner,
    encode,
    parse_node_frame,
)

if TYPE_CHECKING:
    from gateway.conversation import ConversationRef

log = logging.getLogger("steerway.cluster")

FORWARD_TIMEOUT_S = 5.0
MAX_PENDING = 10_000  # requests of this node waiting for their answer
INBOX = 4096  # requests from other nodes waiting for this node's actors


class Forwarder:
    def __init__(self, hub: ConversationHub, bus: RedisBus, timeout_s: float = FORWARD_TIMEOUT_S):
        self.hub = hub
        self.bus = bus
        self.node = hub.node
        self.timeout_s = timeout_s
        settings = hub.settings
        self._limits = FrameLimits(settings.max_text_chars, settings.max_metadata_bytes)
        self._ids = itertools.count(1)
        self._pending: dict[int, Callable[[NodeReply | None], None]] = {}
        self._inbox: asyncio.Queue[NodeRequest] = asyncio.Queue(INBOX)
        self._task: asyncio.Task[None] | None = None
        # `place` requests and run relays (remote runners across nodes, set by
        # gateway.cluster.runners): handled as they come, never behind the inbox
        self.runners: Callable[[NodeRequest | RunToRunner | RunFromRunner], None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._serve(), name="forwarding-inbox")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for answer in list(self._pending.values()):
            answer(None)

    # ------------------------------------------------------------------ asking

    def ask(
        self, node: str, request: NodeRequest, answer: Callable[[NodeReply | None], None]
    ) -> None:
        """Send `request` to `node`; `answer` gets the reply, or None after the timeout."""
        if len(self._pending) >= MAX_PENDING:
            answer(None)
            return
        request.id = next(self._ids)
        request.reply_to = self.node
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.timeout_s, self._answer, request.id, None)

        def settle(reply: NodeReply | None) -> None:
            timer.cancel()
            answer(reply)

        self._pending[request.id] = settle
        self.bus.send(node_channel(node), encode(request))

    def _answer(self, request_id: int, reply: NodeReply | None) -> None:
        answer = self._pending.pop(request_id, None)
        if answer is not None:
            answer(reply)

    # ------------------------------------------------------------------ answering

    def on_message(self, data: bytes) -> None:
        """A frame on this node's channel (the bus's reader calls this)."""
        try:
            frame = parse_node_frame(data, self._limits)
        except Exception as exc:  # a peer on another version, say: never the reader's end
            log.warning("cluster: an unreadable node frame: %s", str(exc)[:200])
            return
        if isinstance(frame, NodeReply):
            self._answer(frame.id, frame)
            return
        if isinstance(frame, RunToRunner | RunFromRunner) or frame.kind == "place":
            if self.runners is not None:
                self.runners(frame)
            return
        try:
            self._inbox.put_nowait(frame)
        except asyncio.QueueFull:  # the asker times out and asks again
            log.warning("cluster: inbox full, a request from %s is dropped", frame.reply_to)

    async def _serve(self) -> None:
        """Requests in the order they came, so one client's messages keep their order."""
        while True:
            request = await self._inbox.get()
            try:
                await self._handle(request)
            except Exception:
                log.exception("cluster: a forwarded %s failed", request.kind)

    def _reply(self, request: NodeRequest, reply: NodeReply) -> None:
        reply.id = request.id
        self.bus.send(node_channel(request.reply_to), encode(reply))

    async def _handle(self, request: NodeRequest) -> None:
        cid = request.conversation_id
        try:
            ref = await self.hub.get(cid)
        except SteerwayError as exc:
            self._reply(request, NodeReply(id=0, error=_error(exc)))
            return
        if not isinstance(ref, ConversationActor):
            self._reply(request, NodeReply(id=0, moved=True))
            return
        if request.kind == "describe":
            reply = NodeReply(
                id=0,
                published=ref.published,
                active_run=ref.summary(),
                queued_runs=ref.queued_runs,
            )
            self._reply(request, reply)
        elif request.kind == "submit" and request.frame is not None:
            await ref.post(
                Submit(request.frame, request.author, lambda out: self._outcome(request, out))
            )
        elif request.kind == "cancel":
            await ref.post(Cancel(request.run_id, lambda out: self._outcome(request, out)))

    def _outcome(self, request: NodeRequest, outcome: Ack | SteerwayError | None) -> None:
        if isinstance(outcome, SteerwayError):
            self._reply(request, NodeReply(id=0, error=_error(outcome)))
        else:
            self._reply(request, NodeReply(id=0, ack=outcome))


def _error(exc: SteerwayError) -> ErrorFrame:
    return ErrorFrame(code=exc.code, message=exc.message, client_msg_id=exc.client_msg_id)


def _steerway_error(frame: ErrorFrame) -> SteerwayError:
    return SteerwayError(frame.message, code=frame.code, client_msg_id=frame.client_msg_id)


class RemoteConversation:
    """A conversation another node runs, as the edges see it (`ConversationRef`)."""

    def __init__(self, forwarder: Forwarder, conversation_id: str, holder: str) -> None:
        self.forwarder = forwarder
        self.conversation_id = conversation_id
        self.holder = holder
        self._published = 0
        self._summary: RunSummary | None = None
        self._queued = 0

    @property
    def stopped(self) -> bool:
        return False

    @property
    def published(self) -> int:
        return self._published

    @property
    def queued_runs(self) -> int:
        return self._queued

    def summary(self) -> RunSummary | None:
        return self._summary

    async def describe(self) -> None:
        done: asyncio.Future[NodeReply | None] = asyncio.get_running_loop().create_future()
        request = NodeRequest(
            kind="describe", id=0, reply_to="", conversation_id=self.conversation_id
        )
        self.forwarder.ask(self.holder, request, lambda r: _settle(done, r))
        reply = await done
        if reply is None or reply.moved or reply.error is not None:
            return  # the stream itself is right; only `ready`'s run summary may be stale
        self._published = reply.published
        self._summary = reply.active_run
        self._queued = reply.queued_runs

    async def post(self, item: Submit | Cancel) -> None:
        self._forward(item, retry=True)

    def _forward(self, item: Submit | Cancel, retry: bool) -> None:
        cid = self.conversation_id
        if isinstance(item, Submit):
            request = NodeRequest(
                kind="submit",
                id=0,
                reply_to="",
                conversation_id=cid,
                frame=item.frame,
                author=item.author,
            )
        else:
            request = NodeRequest(
                kind="cancel", id=0, reply_to="", conversation_id=cid, run_id=item.run_id
            )

        def answer(reply: NodeReply | None) -> None:
            if reply is None or reply.moved:
                if retry:
                    asyncio.get_running_loop().create_task(self._again(item))
                else:
                    _give_up(item)
            elif reply.error is not None:
                item.reply(_steerway_error(reply.error))
            elif isinstance(item, Submit):
                if reply.ack is not None:
                    item.reply(reply.ack)
            else:
                item.reply(None)

        self.forwarder.ask(self.holder, request, answer)

    async def _again(self, item: Submit | Cancel) -> None:
        """Ask whoever holds the lease now (this node, perhaps), once more."""
        try:
            ref: ConversationRef = await self.forwarder.hub.get(self.conversation_id)
        except SteerwayError:
            _give_up(item)
            return
        if isinstance(ref, RemoteConversation):
            ref._forward(item, retry=False)
        else:
            await ref.post(item)


def _give_up(item: Submit | Cancel) -> None:
    error = StoreUnavailable("the node running this conversation did not answer; try again")
    if isinstance(item, Submit):
        error.client_msg_id = item.frame.client_msg_id
    item.reply(error)


def _settle(future: asyncio.Future[NodeReply | None], reply: NodeReply | None) -> None:
    if not future.done():
        future.set_result(reply)
