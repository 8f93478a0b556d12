"""`GET /ws/conversations/{conversation_id}` (PROTOCOL.md sections 2, 3, 6).

A raw ASGI endpoint: the per-frame path sends the shared ASGI message of an
already encoded frame, with no per-client encoding.  Each connection has two
coroutines: this one reads client frames and hands them to the conversation
actor; a writer task sends `ready`, the replay, then the outbox (live events,
acks, errors), and closes the connection with 4008 when the outbox overflows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

import orjson

from gateway import auth
from gateway.auth import Refused
from gateway.conversation import Cancel, ConversationHub, ConversationRef, Submit
from gateway.core.limits import ConnectionSlots, TokenBucket
from gateway.errors import FrameError, SteerwayError
from gateway.outbox import Frame, Outbox
from gateway.protocol.codes import CloseCode, ErrorCode
from gateway.protocol.frames import (
    Ack,
    ErrorFrame,
    FrameLimits,
    MessageFrame,
    PingFrame,
    Pong,
    PresenceInput,
    Ready,
    encode,
    is_conversation_id,
    parse_client_frame,
)
from gateway.replay import ReplayReader
from gateway.wsserver import PREBUILT

log = logging.getLogger("steerway.ws")


class _DenialLogFilter(logging.Filter):
    """uvicorn's websockets-sansio protocol logs "returned without completing handshake"
    after a denial response it has sent correctly (it never marks the handshake done on
    that path); every refusal of ours is such a response, so the line is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "without completing handshake" not in record.getMessage()


logging.getLogger("uvicorn.error").addFilter(_DenialLogFilter())

Scope = dict[str, Any]
Message = dict[str, Any]


class BadRequest(Exception):
    def __init__(self, status: int, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def parse_after(values: list[str] | None) -> int | None:
    """`after`: absent, or an integer >= 0 (section 2); anything else is a 400."""
    if not values:
        return None
    raw = values[-1]
    if not raw.isascii() or not raw.isdigit() or len(raw) > 18:
        raise BadRequest(400, ErrorCode.INVALID_FRAME, "`after` must be an integer >= 0")
    return int(raw)


def parse_flag(values: list[str] | None, name: str) -> bool:
    """A yes/no query parameter: absent, `0` or `1`; anything else is a 400."""
    raw = values[-1] if values else "0"
    if raw not in ("0", "1"):
        raise BadRequest(400, ErrorCode.INVALID_FRAME, f"`{name}` must be 0 or 1")
    return raw == "1"


async def deny(send: Any, scope: Scope, error: BadRequest) -> None:
    """Refuse before the upgrade with an HTTP answer, where the server supports it."""
    body = orjson.dumps({"error": {"code": error.code.value, "message": error.message}})
    if "websocket.http.response" in scope.get("extensions", {}):
        await send(
            {
                "type": "websocket.http.response.start",
                "status": error.status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "websocket.http.response.body", "body": body})
    else:  # pragma: no cover - uvicorn supports the extension
        await send({"type": "websocket.close", "code": CloseCode.POLICY_VIOLATION})


class ConversationSocket:
    """The ASGI app of the conversation endpoint."""

    def __init__(self, hub: ConversationHub, slots: ConnectionSlots) -> None:
        self.hub = hub
        self.slots = slots
        self.replays = ReplayReader(hub.store)  # clients catching up at once share reads
        hub.metrics.replay_reads.set_function(lambda: self.replays.reads)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        cid = scope["path_params"]["conversation_id"]
        # blank values kept: `after=` is not an integer (400), as in REST
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        try:
            if not is_conversation_id(cid):
                raise BadRequest(400, ErrorCode.INVALID_FRAME, "illegal conversation id")
            after = parse_after(query.get("after"))
            presence = parse_flag(query.get("presence"), "presence")
        except BadRequest as exc:
            await deny(send, scope, exc)
            return
        try:
            who = auth.admit(scope, self.hub.settings, lambda p: auth.for_conversation(p, cid))
            auth.take_slot(self.slots, cid)
        except Refused as exc:
            await auth.refuse(send, exc)
            return
        scope["headers"] = []  # admitted: nothing reads them again (~1 KiB per connection)
        try:
            try:
                actor = await self.hub.get(cid)
            except SteerwayError as exc:
                await deny(send, scope, BadRequest(503, exc.code, exc.message))
                return
            label = (query.get("client") or [""])[-1][:64]
            prebuilt = scope.get("extensions", {}).get(PREBUILT, {}).get("write")
            session = Session(
                self.hub, self.replays, actor, send, receive, after, label, who.author, prebuilt
            )
            session.outbox.events_only = not presence
            await session.serve()
        finally:
            self.slots.release(cid)


class Session:
    """One client connection to one conversation."""

    def __init__(
        self,
        hub: ConversationHub,
        replays: ReplayReader,
        actor: ConversationRef,
        send: Any,
        receive: Any,
        after: int | None,
        label: str,
        author: str,
        prebuilt: Callable[[bytes], bool] | None = None,
    ) -> None:
        settings = hub.settings
        self.hub = hub
        self.replays = replays
        self.cid = actor.conversation_id
        self.send = send
        self.receive = receive
        self.after = after
        self.label = label
        self.session_id = uuid.uuid4().hex
        self.author = author
        self.outbox = Outbox(settings.outbox_frames, settings.outbox_bytes)
        self.bucket = TokenBucket(settings.rate_per_s, settings.rate_burst, time.monotonic())
        self.limits = FrameLimits(settings.max_text_chars, settings.max_metadata_bytes)
        self.close_code: int | None = None
        self._closing: asyncio.Task[None] | None = None
        self.outbox.on_overflow = self._overflowed
        self._prebuilt = prebuilt
        if prebuilt is not None:
            self.outbox.direct = self._direct

    async def serve(self) -> None:
        hub, metrics = self.hub, self.hub.metrics
        await self.send({"type": "websocket.accept"})
        try:
            actor, head = await hub.follow(self.cid, self.outbox)
        except SteerwayError as exc:  # a cluster node that cannot reach Redis
            await self._close(CloseCode.INTERNAL_ERROR, exc.message[:120])
            return
        hub.dashboard.clients_changed(self.cid)
        hub.presence.join(self.cid, self.session_id, self.author, self.label, self.outbox)
        self.outbox.floor = max(head, self.after or 0)
        metrics.connections.labels("conversation").inc()
        await self.send({"type": "websocket.send", "text": self._ready(actor, head)})
        writer = asyncio.create_task(self._write(head))
        try:
            await self._read()
        finally:
            hub.presence.leave(self.cid, self.session_id)
            hub.unfollow(self.cid, self.outbox)
            hub.dashboard.clients_changed(self.cid)
            metrics.connections.labels("conversation").dec()
            self.outbox.close()
            await writer
            if self._closing is not None:
                await self._closing

    def _ready(self, actor: ConversationRef, head: int) -> str:
        """The `ready` frame (built here: no model of it outlives the connection's start)."""
        ready = Ready(
            conversation_id=self.cid,
            session_id=self.session_id,
            head=head,
            active_run=actor.summary(),
            queued_runs=actor.queued_runs,
        )
        return encode(ready).decode()

    # ------------------------------------------------------------------ writer

    def _direct(self, frame: Frame) -> bool:
        """The outbox's fast path: the shared frame straight onto the socket."""
        assert self._prebuilt is not None
        if not self._prebuilt(frame.framed()):
            return False
        if frame.born:
            self.hub.metrics.delivery.observe(time.perf_counter() - frame.born)
            frame.born = 0.0
        return True

    async def _write(self, head: int) -> None:
        send, outbox = self.send, self.outbox
        observe = self.hub.metrics.delivery.observe
        try:
            if self.after is not None:
                await self._replay(self.after, head)
            while (frame := await outbox.get()) is not None:
                if frame.born:
                    observe(time.perf_counter() - frame.born)
                    frame.born = 0.0  # shared: the first delivery is the one measured
                await send(frame.message)
        except OSError:  # the client went away (uvicorn's ClientDisconnected)
            pass
        except Exception:
            log.exception("session %s: writer failed", self.session_id)
            with contextlib.suppress(Exception):
                await self._close(CloseCode.INTERNAL_ERROR, "internal error")

    def _overflowed(self) -> None:
        """The client is too far behind (section 6): closed 4008 now, by a task of its own,
        as the writer may be waiting for a socket the client no longer reads."""
        self.hub.metrics.slow_consumers.inc()
        self._closing = asyncio.create_task(self._close(CloseCode.SLOW_CONSUMER, "slow_consumer"))

    async def _replay(self, after: int, head: int) -> None:
        """`(after, head]` from the store, read once for every client catching up with it."""
        prebuilt = self._prebuilt
        async for page, start, end in self.replays.pages(self.cid, after, head):
            # the page's frames in one write when the socket takes them now; else one by one
            if prebuilt is not None and prebuilt(page.framed(start, end)):
                continue
            for text in page.texts[start:end]:
                await self.send({"type": "websocket.send", "text": text})

    async def _close(self, code: int, reason: str) -> None:
        if self.close_code is None:
            self.close_code = code
            self.outbox.close()
            with contextlib.suppress(OSError):  # the client is gone already
                await self.send({"type": "websocket.close", "code": code, "reason": reason})

    # ------------------------------------------------------------------ reader

    def _reply(self, outcome: Ack | SteerwayError | None) -> None:
        if outcome is None:
            return
        if isinstance(outcome, SteerwayError):
            self._error(outcome)
        else:
            self.outbox.put(Frame.of(encode(outcome)))
            if isinstance(outcome, Ack) and outcome.route != "queue" and not outcome.duplicate:
                self.hub.presence.steered(self.cid, self.session_id)

    def _error(self, error: SteerwayError) -> None:
        self.hub.metrics.client_errors.labels(error.code.value).inc()
        frame = ErrorFrame(
            code=error.code, message=error.message, client_msg_id=error.client_msg_id
        )
        self.outbox.put(Frame.of(encode(frame)))

    async def _read(self) -> None:
        settings = self.hub.settings
        while True:
            message = await self.receive()
            if message["type"] != "websocket.receive":
                return  # websocket.disconnect
            if self.close_code is not None:
                continue
            if not self.bucket.take(time.monotonic()):
                if self.bucket.refusals >= settings.rate_abuse:
                    await self._close(CloseCode.RATE_LIMIT_ABUSE, "rate_limit_abuse")
                else:
                    self._error(
                        SteerwayError("too many frames; slow down", code=ErrorCode.RATE_LIMITED)
                    )
                continue
            text = message.get("text")
            if text is None:
                self._error(FrameError("binary frames are not accepted; send JSON text"))
                continue
            try:
                frame = parse_client_frame(text, self.limits)
            except FrameError as exc:
                self._error(exc)
                continue
            if isinstance(frame, PingFrame):
                self.outbox.put(Frame.of(encode(Pong(nonce=frame.nonce))))
                continue
            if isinstance(frame, PresenceInput):
                self.hub.presence.set_state(self.cid, self.session_id, frame.state)
                continue
            try:
                if isinstance(frame, MessageFrame):
                    self.hub.check_writable()
                actor = await self.hub.get(self.cid)
            except SteerwayError as exc:  # the store is down
                exc.client_msg_id = getattr(frame, "client_msg_id", None)
                self._error(exc)
                continue
            if isinstance(frame, MessageFrame):
                await actor.post(Submit(frame, self.author, self._reply))
            else:
                await actor.post(Cancel(frame.run_id, self._reply))
