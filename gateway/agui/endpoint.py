"""`POST /api/agui`: AG-UI's `RunAgentInput` in, the run as AG-UI events over SSE out.

The request's last message, when it is a user message, is submitted like any
message (REST's `hub.submit`: routed, steer by default, idempotent by a key
derived from its AG-UI id).  The stream then follows the conversation as the
WebSocket endpoint does (subscribe, read the published head, replay from the
store, then live; a bounded outbox) and ends with the run the message went to
(`RUN_FINISHED` / `RUN_ERROR`).  Every event line carries the conversation
offset as its SSE `id`, so a client cut off sends `Last-Event-ID` and gets the
rest with nothing lost.  docs/ag-ui.md states every decision.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import orjson
from ag_ui.core import BaseEvent, CustomEvent, RunAgentInput
from ag_ui.encoder import EventEncoder
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from gateway import auth
from gateway.agui.events import ACK_EVENT, EventMapper, messages_snapshot
from gateway.conversation import ConversationHub
from gateway.core.limits import ConnectionSlots
from gateway.errors import FrameError, SteerwayError
from gateway.outbox import Outbox
from gateway.protocol.codes import ErrorCode
from gateway.protocol.frames import (
    Ack,
    FrameLimits,
    MessageFrame,
    encode,
    is_conversation_id,
    validate_client_frame,
)
from gateway.rest import error
from store.base import StoreError

# AG-UI clients send the whole thread with every request: a larger body than REST's.
MAX_BODY = 1024 * 1024
KEEPALIVE_S = 15.0  # an SSE comment while nothing happens, for proxies that cut idle streams
REPLAY_PAGE = 500
MODES = ("auto", "steer", "queue", "interrupt")
_KEY_RE = re.compile(r"[A-Za-z0-9._:-]{1,59}")


def client_msg_id(agui_id: str) -> str:
    """The idempotency key of an AG-UI message: `agui:` + its id when that is a legal key,
    else `agui:` + a digest of it (so the same AG-UI message is stored once)."""
    if _KEY_RE.fullmatch(agui_id):
        return "agui:" + agui_id
    return "agui:" + hashlib.sha256(agui_id.encode()).hexdigest()[:40]


def _bad(message: str) -> FrameError:
    return FrameError(message, code=ErrorCode.INVALID_FRAME)


def parse_input(body: bytes) -> RunAgentInput:
    if len(body) > MAX_BODY:
        raise _bad(f"body over {MAX_BODY} bytes")
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise FrameError("the body is not valid JSON", code=ErrorCode.INVALID_JSON) from None
    if not isinstance(obj, dict):
        raise _bad("the body must be a RunAgentInput object")
    try:
        return RunAgentInput.model_validate(obj)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        raise _bad(f"not a RunAgentInput: {where}: {first['msg']}") from None


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if getattr(part, "type", None) != "text":
            raise _bad("only text parts are accepted in a user message")
        parts.append(part.text)
    return "\n".join(parts)


def message_frame(run: RunAgentInput, limits: FrameLimits) -> MessageFrame | None:
    """The new message: the input's last message if it is a user message, else None (the
    request then joins the conversation: it watches, it sends nothing)."""
    props = run.forwarded_props if isinstance(run.forwarded_props, dict) else {}
    mode = props.get("mode", "auto")
    if mode not in MODES:
        raise _bad(f"forwardedProps.mode must be one of {', '.join(MODES)}")
    if not run.messages or run.messages[-1].role != "user":
        return None
    last = run.messages[-1]
    frame: dict[str, Any] = {
        "type": "message",
        "client_msg_id": client_msg_id(last.id),
        "text": _text(last.content),
        "mode": mode,
        "metadata": {"agui": {"message_id": last.id, "run_id": run.run_id}},
    }
    if isinstance(props.get("runner"), str):
        frame["runner"] = props["runner"]
    parsed = validate_client_frame(frame, limits)
    assert isinstance(parsed, MessageFrame)
    return parsed


def last_event_id(request: Request) -> int | None:
    raw = request.headers.get("last-event-id")
    if raw is None:
        return None
    raw = raw.strip()
    if not raw.isascii() or not raw.isdigit() or len(raw) > 18:
        raise _bad("Last-Event-ID must be a conversation offset (an integer >= 0)")
    return int(raw)


class _Source:
    """The conversation's events after `start`: from the store up to `head`, then the
    live ones the outbox holds (each offset once, ascending)."""

    def __init__(
        self, hub: ConversationHub, cid: str, outbox: Outbox, start: int, head: int
    ) -> None:
        self.store = hub.store
        self.cid = cid
        self.outbox = outbox
        self.offset = start  # the newest offset read from the store
        self.head = head
        self.floor = max(start, head)  # live events at or below it are the store's
        self.pending: deque[dict[str, Any]] = deque()

    def preload(self, payloads: list[str]) -> None:
        for text in payloads:
            event = orjson.loads(text)
            if self.offset < event["offset"] <= self.head:
                self.pending.append(event)
        self.offset = self.head

    async def _fill(self, wait: bool) -> bool:
        """Something more in `pending`; False when nothing is there (without waiting, or
        once the outbox is closed or overflowed)."""
        while not self.pending:
            if self.offset < self.head:
                page = await self.store.read_events(
                    self.cid, self.offset, min(REPLAY_PAGE, self.head - self.offset)
                )
                if not page:
                    self.offset = self.head
                    continue
                self.pending.extend(map(orjson.loads, page))
                self.offset += len(page)
                continue
            if not wait and not len(self.outbox):
                return False
            frame = await self.outbox.get()
            if frame is None:
                return False
            if frame.offset > self.floor:
                self.pending.append(orjson.loads(frame.text))
        return True

    async def next(self) -> dict[str, Any] | None:
        if not await self._fill(wait=True):
            return None
        return self.pending.popleft()

    async def peek_now(self) -> dict[str, Any] | None:
        """The next event if it is already here (stored, or queued in the outbox)."""
        return self.pending[0] if await self._fill(wait=False) else None


class _Stream(StreamingResponse):
    """An SSE response whose cleanup runs even when the body is never iterated."""

    def __init__(self, body: AsyncIterator[str], cleanup: Any) -> None:
        super().__init__(
            body,
            media_type=EventEncoder().get_content_type(),
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.cleanup = cleanup

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.cleanup()


class AguiEndpoint:
    """The request handler of `POST /api/agui`."""

    def __init__(self, hub: ConversationHub, slots: ConnectionSlots) -> None:
        self.hub = hub
        self.slots = slots
        settings = hub.settings
        self.limits = FrameLimits(settings.max_text_chars, settings.max_metadata_bytes)
        self.encoder = EventEncoder()

    async def handle(self, request: Request) -> Response:
        try:
            return await self._serve(request)
        except SteerwayError as exc:
            return error(exc.code, exc.message)
        except StoreError:
            return error(ErrorCode.INTERNAL, "the store is unavailable")

    async def _serve(self, request: Request) -> Response:
        settings = self.hub.settings
        auth.check_origin(request.scope, settings)
        who = auth.authenticate(request.scope, settings)
        auth.for_user(who)
        run = parse_input(await request.body())
        cid = run.thread_id
        if not is_conversation_id(cid):
            raise _bad("threadId is not a legal conversation id (1-128 of [A-Za-z0-9._:-])")
        auth.for_conversation(who, cid)
        after = last_event_id(request)
        frame = message_frame(run, self.limits)
        if frame is not None:
            self.hub.check_writable()
        await self.hub.get(cid)
        auth.take_slot(self.slots, cid)
        settings = self.hub.settings
        outbox = Outbox(settings.outbox_frames, settings.outbox_bytes)
        try:
            # as in gateway.ws: every event after `head` reaches the outbox, every one up
            # to it is in the store
            actor, head = await self.hub.follow(cid, outbox)
        except BaseException:
            self.slots.release(cid)
            raise
        outbox.floor = head
        active = actor.summary()

        def cleanup() -> None:
            self.hub.unfollow(cid, outbox)
            outbox.close()
            self.slots.release(cid)

        try:
            ack = await self.hub.submit(cid, frame, who.author) if frame is not None else None
            if ack is not None:
                start = ack.offset - 1 if after is None else after
                source = _Source(self.hub, cid, outbox, start, head)
                ended = await self._ended_before(cid, ack, after)
                body = self._follow(run, source, ack, ended)
            else:
                source = _Source(self.hub, cid, outbox, after or 0, head)
                snapshot = None
                if after is None:
                    source.offset = head  # nothing replayed but the active run's events
                    turns = await self.hub.store.transcript(cid, 500)
                    snapshot = messages_snapshot([t.document() for t in turns])
                    if active is not None:
                        source.offset = 0
                        source.preload(await self.hub.store.run_events(cid, active.run_id))
                run_id = active.run_id if active is not None else None
                body = self._join(run, source, run_id, snapshot)
        except BaseException:
            cleanup()
            raise
        return _Stream(body, cleanup)

    def _sse(self, events: list[BaseEvent], offset: int | None = None) -> str:
        """Events as SSE; the last one carries the conversation offset as its `id`."""
        parts = [self.encoder.encode(e) for e in events]
        if offset is not None:
            parts.append(f"id: {offset}\n\n" if not parts else f"id: {offset}\n" + parts.pop())
        return "".join(parts)

    async def _events(
        self, mapper: EventMapper, source: _Source, run_id: str | None, follow: str | None
    ) -> AsyncIterator[str]:
        """Map events until the run `run_id` ends (None: until nothing more is there).
        A run that starts right after it (in the same stored batch) with `follow` among its
        triggers, or any such run when `follow` is None, is followed in its place (section
        5.4's follow-up runs)."""
        while True:
            if run_id is None:
                event = await source.peek_now()
                if event is not None:
                    source.pending.popleft()
            else:
                try:
                    event = await asyncio.wait_for(source.next(), KEEPALIVE_S)
                except TimeoutError:
                    yield ": keepalive\n\n"
                    continue
            if event is None:
                if run_id is None:
                    yield self._sse([*mapper.finished({"status": "completed", "reason": "idle"})])
                return  # the outbox overflowed: the client resumes with Last-Event-ID
            offset = event["offset"]
            if event["type"] == "run.ended" and event.get("run_id") == run_id:
                nxt = await source.peek_now()
                if (
                    nxt is not None
                    and nxt["type"] == "run.started"
                    and (follow is None or follow in nxt["trigger_message_ids"])
                ):
                    yield self._sse(mapper.map(event), offset)
                    run_id = nxt["run_id"]
                    continue
                yield self._sse(mapper.finished(event), offset)
                return
            yield self._sse(mapper.map(event), offset)

    async def _ended_before(self, cid: str, ack: Ack, after: int | None) -> dict[str, Any] | None:
        """A resend whose run (or the follow-up that took the message) ended at or before
        the client's `Last-Event-ID`: that `run.ended`, for the stream to end with at once
        (nothing after the cursor would ever end it)."""
        if not ack.duplicate or after is None:
            return None
        run_id: str | None = ack.run_id
        store = self.hub.store
        while run_id is not None:
            payloads = await store.run_events(cid, run_id)
            ended = next((e for e in map(orjson.loads, payloads) if e["type"] == "run.ended"), None)
            if ended is None or ended["offset"] > after:
                return None
            nxt = await store.read_events(cid, ended["offset"], 1)
            run_id = None
            if nxt:
                event = orjson.loads(nxt[0])
                if event["type"] == "run.started" and ack.message_id in event.get(
                    "trigger_message_ids", ()
                ):
                    run_id = event["run_id"]
                    continue
            return dict(ended)
        return None

    async def _follow(
        self, run: RunAgentInput, source: _Source, ack: Ack, ended: dict[str, Any] | None
    ) -> AsyncIterator[str]:
        mapper = EventMapper(run.thread_id, run.run_id, run.state, {ack.client_msg_id})
        yield self._sse([mapper.started(), _ack_event(ack)])
        if ended is not None:
            yield self._sse(mapper.finished(ended))
            return
        async for chunk in self._events(mapper, source, ack.run_id, ack.message_id):
            yield chunk

    async def _join(
        self, run: RunAgentInput, source: _Source, run_id: str | None, snapshot: Any
    ) -> AsyncIterator[str]:
        mapper = EventMapper(run.thread_id, run.run_id, run.state, set())
        first: list[BaseEvent] = [mapper.started()]
        if snapshot is not None:
            first.append(snapshot)
        yield self._sse(first)
        async for chunk in self._events(mapper, source, run_id, None):
            yield chunk


def _ack_event(ack: Ack) -> BaseEvent:
    return CustomEvent(name=ACK_EVENT, value=orjson.loads(encode(ack)))
