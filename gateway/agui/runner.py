"""`agui`: a runner that drives any AG-UI agent endpoint, and makes it steerable.

Each turn is one AG-UI request: `POST {url}` with a `RunAgentInput` (the
conversation as `threadId`, the transcript as `messages`, the state the agent
last reported as `state`), answered by AG-UI events over SSE.  The events become
Steerway results: text messages as `message.delta` / `message.completed`, tool
calls as `tool.call.started` / `tool.call.completed`, `STATE_SNAPSHOT` and
`STATE_DELTA` as `state.updated` (scope `runner`, key `state`: the whole state
document after the change), `RUN_ERROR` as `run.failed`.

Steering is absorbed at the agent's turn boundaries: after `RUN_FINISHED` (the
next request carries it), and at `STEP_FINISHED`, where waiting steering ends the
agent's request early (the stream is closed) and the next request carries what
the agent said so far and the steering.  At most `max_turns` requests a run.

An agent that breaks the protocol (an event out of order, a stream that is not
SSE JSON) fails the run `agent_protocol`; an event type this runner does not
know is skipped with a warning (a newer protocol's); a stream that ends before
`RUN_FINISHED` fails it `upstream_stream_broken` (retryable).  Everything stored
before stays stored.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, Literal

import httpx
import orjson
from ag_ui.core import Event as AguiEvent
from ag_ui.core import EventType
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from gateway.agui.patch import PatchError, apply_patch
from gateway.runners.base import Result, RunContext, completed, delta, run_failed
from gateway.runners.upstream import UpstreamFailure as Failure
from gateway.runners.upstream import UpstreamRunner, http_failure

log = logging.getLogger("steerway.runners.agui")
EVENT: TypeAdapter[Any] = TypeAdapter(AguiEvent)
KNOWN = {e.value for e in EventType}
MAX_LINE = 4 * 1024 * 1024  # an SSE event larger than this is not an agent's


class AguiOptions(BaseModel):
    """The runner's own options (`[runners.<name>]` in the runners config)."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1)  # the agent's AG-UI endpoint
    headers: dict[str, str] = Field(default_factory=dict)  # e.g. Authorization
    timeout_s: float = Field(60.0, gt=0)  # to connect, and between two events
    max_turns: int = Field(8, ge=1)  # requests in one run (1 + follow-ups for steering)
    forwarded_props: dict[str, Any] = Field(default_factory=dict)  # sent as forwardedProps


class _Turn:
    """One AG-UI request: its events checked for order, turned into results."""

    def __init__(self, state: Any) -> None:
        self.state = state
        self.texts: dict[str, str] = {}  # open text messages
        self.said: list[str] = []  # completed assistant texts, in order
        self.calls: dict[str, tuple[str, str]] = {}  # open tool calls: id -> (name, args)
        self.names: dict[str, str] = {}  # every tool call's name
        self.started = False
        self.finished = False
        self.step_ended = False  # a STEP_FINISHED was just seen

    def partial(self) -> list[Result]:
        """Open messages completed with what they have (the stream is being left)."""
        texts = [self.texts.pop(mid) for mid in list(self.texts)]
        self.said += texts
        return [completed(text) for text in texts]

    def results(self, event: dict[str, Any]) -> list[Result]:
        kind = event["type"]
        if kind != "RUN_STARTED" and not self.started and kind != "RUN_ERROR":
            raise Failure("agent_protocol", f"{kind} before RUN_STARTED", False)
        if self.finished:
            raise Failure("agent_protocol", f"{kind} after RUN_FINISHED", False)
        if kind == "RUN_STARTED":
            self.started = True
        elif kind in ("TEXT_MESSAGE_START", "TEXT_MESSAGE_CHUNK") and event.get("role") in (
            "user",
            "system",
            "developer",
        ):
            return []  # the agent echoing input: Steerway has it
        elif kind == "TEXT_MESSAGE_START":
            self.texts.setdefault(event["messageId"], "")
        elif kind in ("TEXT_MESSAGE_CONTENT", "TEXT_MESSAGE_CHUNK"):
            mid = event.get("messageId") or next(reversed(self.texts), None) or "chunk"
            if kind == "TEXT_MESSAGE_CONTENT" and mid not in self.texts:
                raise Failure("agent_protocol", f"content of unopened message {mid!r}", False)
            piece = event.get("delta") or ""
            self.texts[mid] = self.texts.get(mid, "") + piece
            return [delta(piece)] if piece else []
        elif kind == "TEXT_MESSAGE_END":
            mid = event["messageId"]
            if mid not in self.texts:
                raise Failure("agent_protocol", f"end of unopened message {mid!r}", False)
            text = self.texts.pop(mid)
            self.said.append(text)
            return [completed(text)]
        elif kind == "TOOL_CALL_START":
            self.calls[event["toolCallId"]] = (event["toolCallName"], "")
            self.names[event["toolCallId"]] = event["toolCallName"]
        elif kind == "TOOL_CALL_ARGS":
            call = event["toolCallId"]
            if call not in self.calls:
                raise Failure("agent_protocol", f"arguments of unopened tool call {call!r}", False)
            name, args = self.calls[call]
            self.calls[call] = (name, args + event["delta"])
        elif kind == "TOOL_CALL_END":
            call = event["toolCallId"]
            if call not in self.calls:
                raise Failure("agent_protocol", f"end of unopened tool call {call!r}", False)
            name, args = self.calls.pop(call)
            data = {"tool_call_id": call, "name": name, "arguments": _json_or_text(args)}
            return [{"type": "tool.call.started", "data": data}]
        elif kind == "TOOL_CALL_RESULT":
            call = event["toolCallId"]
            content = event["content"]
            data = {
                "tool_call_id": call,
                "name": self.names.get(call, ""),
                "result": _json_or_text(content) if isinstance(content, str) else content,
            }
            return [{"type": "tool.call.completed", "data": data}]
        elif kind == "STATE_SNAPSHOT":
            self.state = event["snapshot"]
            return [_state(self.state)]
        elif kind == "STATE_DELTA":
            try:
                self.state = apply_patch(self.state, event["delta"])
            except PatchError as exc:
                raise Failure(
                    "agent_protocol", f"STATE_DELTA does not apply: {exc}", False
                ) from None
            return [_state(self.state)]
        elif kind == "STEP_FINISHED":
            self.step_ended = True
        elif kind == "RUN_FINISHED":
            if self.texts or self.calls:
                open_ = [*self.texts, *self.calls]
                raise Failure("agent_protocol", f"RUN_FINISHED with {open_} still open", False)
            self.finished = True
        elif kind == "RUN_ERROR":
            code = event.get("code") or "agent_error"
            raise Failure(str(code), str(event.get("message", ""))[:500], False)
        # MESSAGES_SNAPSHOT, STEP_STARTED, CUSTOM, RAW, REASONING_*, ACTIVITY_*, SUBAGENT_*:
        # nothing Steerway stores (its transcript is its own)
        return []


def _json_or_text(text: str) -> Any:
    try:
        return orjson.loads(text) if text else None
    except orjson.JSONDecodeError:
        return text


def _state(value: Any) -> Result:
    return {"type": "state.updated", "data": {"scope": "runner", "key": "state", "value": value}}


class AguiRunner(UpstreamRunner[AguiOptions]):
    options_model = AguiOptions

    def __init__(
        self,
        name: str = "agui",
        leftover_steering: Literal["follow_up", "drop"] = "follow_up",
        **options: Any,
    ) -> None:
        super().__init__(name, leftover_steering, **options)

    async def run(self, ctx: RunContext) -> AsyncIterator[Result]:
        o = self.options
        messages: list[dict[str, Any]] = [
            {"id": m.message_id, "role": m.role, "content": m.content} for m in ctx.messages
        ]
        state: Any = {}
        timeout = httpx.Timeout(o.timeout_s, write=o.timeout_s, pool=o.timeout_s)
        headers = {"Accept": "text/event-stream", **o.headers}
        if ctx.traceparent is not None:  # the agent's spans join the run's trace
            headers["traceparent"] = ctx.traceparent
        async with httpx.AsyncClient(timeout=timeout, headers=headers) as http:
            for turn_no in range(o.max_turns):
                body = {
                    "threadId": ctx.conversation_id,
                    "runId": f"{ctx.run_id}.{turn_no}",
                    "messages": messages,
                    "state": state,
                    "tools": [],
                    "context": [],
                    "forwardedProps": o.forwarded_props,
                }
                turn = _Turn(state)
                steering = []
                last = turn_no + 1 == o.max_turns
                try:
                    # aclosing: a cancel at the `yield` closes the HTTP stream now, not at GC
                    async with contextlib.aclosing(_events(http, o.url, body)) as events:
                        async for event in events:
                            for result in turn.results(event):
                                yield result
                            if turn.finished:
                                break
                            if turn.step_ended and not last:
                                turn.step_ended = False
                                steering = await ctx.steering.pull("all")
                                if steering:  # the agent's request is left here
                                    for result in turn.partial():
                                        yield result
                                    break
                except Failure as exc:
                    yield run_failed(exc.message, exc.code, exc.retryable)
                    return
                if not steering and not turn.finished:
                    yield run_failed(
                        "the agent's stream ended before RUN_FINISHED",
                        "upstream_stream_broken",
                        True,
                    )
                    return
                state = turn.state
                messages += [
                    {"id": uuid.uuid4().hex, "role": "assistant", "content": text}
                    for text in turn.said
                ]
                if not steering and not last:
                    steering = await ctx.steering.pull("all")
                if not steering:
                    break
                messages += [
                    {"id": s.message_id, "role": "user", "content": s.text} for s in steering
                ]
        yield {"type": "run.completed", "data": {"finish_reason": "stop"}}


async def _events(
    http: httpx.AsyncClient, url: str, body: dict[str, Any]
) -> AsyncGenerator[dict[str, Any], None]:
    """The AG-UI events of one request, each validated; unknown types skipped."""
    got_any = False
    try:
        async with http.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                raise http_failure(response.status_code, await response.aread(), response)
            data: list[str] = []
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    data.append(line[5:].lstrip(" "))
                    if sum(map(len, data)) > MAX_LINE:
                        raise Failure("agent_protocol", "an SSE event over 4 MiB", False)
                    continue
                if line or not data:
                    continue  # `id:`, `event:`, comments; blank lines between events
                text, data = "\n".join(data), []
                event = _parse(text)
                if event is not None:
                    got_any = True
                    yield event
    except httpx.TimeoutException as exc:
        raise Failure("upstream_timeout", f"{url}: {type(exc).__name__}", True) from None
    except httpx.TransportError as exc:
        code = "upstream_stream_broken" if got_any else "upstream_unreachable"
        raise Failure(code, f"{url}: {type(exc).__name__}: {exc}"[:500], True) from None


def _parse(text: str) -> dict[str, Any] | None:
    try:
        raw = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise Failure("agent_protocol", f"an event is not JSON: {text[:80]!r}", False) from None
    if not isinstance(raw, dict) or not isinstance(raw.get("type"), str):
        raise Failure("agent_protocol", f"an event without a type: {text[:80]!r}", False)
    if raw["type"] not in KNOWN:
        log.warning("agui: skipped an event of unknown type %r", raw["type"][:64])
        return None
    try:
        EVENT.validate_python(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        raise Failure(
            "agent_protocol", f"a malformed {raw['type']} event: {where}: {first['msg']}", False
        ) from None
    return raw
