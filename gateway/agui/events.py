"""Steerway's conversation events as AG-UI events (docs/ag-ui.md has the table).

One `EventMapper` per AG-UI stream: it remembers which text messages it has
opened (AG-UI wants `TEXT_MESSAGE_START` before content and every message
closed before `RUN_FINISHED`) and the state document the client holds (so a
`state.updated` becomes a JSON Patch that applies to it).  What AG-UI has no
event for goes out as `CUSTOM` events named `steerway.<event type>`, whose
value is the Steerway event itself.
"""

from __future__ import annotations

from typing import Any

import orjson
from ag_ui.core import (
    BaseEvent,
    CustomEvent,
    MessagesSnapshotEvent,
    RunErrorEvent,
    RunFinishedEvent,
    RunStartedEvent,
    StateDeltaEvent,
    TextMessageContentEvent,
    TextMessageEndEvent,
    TextMessageStartEvent,
    ToolCallArgsEvent,
    ToolCallEndEvent,
    ToolCallResultEvent,
    ToolCallStartEvent,
)
from ag_ui.core.types import AssistantMessage, UserMessage

# Steerway events that AG-UI has no counterpart for: `CUSTOM` with these names.
CUSTOM_PREFIX = "steerway."
CUSTOM_EVENTS = (
    "run.queued",
    "run.started",
    "steering.absorbed",
    "steering.dropped",
    "run.ended",  # of a run other than the stream's own
)
ACK_EVENT = CUSTOM_PREFIX + "ack"  # the request's message was stored (the `ack` object)


def custom(kind: str, value: Any) -> CustomEvent:
    return CustomEvent(name=CUSTOM_PREFIX + kind, value=value)


def json_text(value: Any) -> str:
    return value if isinstance(value, str) else orjson.dumps(value).decode()


def _pointer(token: str) -> str:
    return "/" + token.replace("~", "~0").replace("/", "~1")


def agui_message_id(event: dict[str, Any]) -> str:
    """The id a user message has in AG-UI: the client's own id when it came in through
    AG-UI (kept in its metadata), else Steerway's `message_id`."""
    meta = event.get("metadata")
    agui = meta.get("agui") if isinstance(meta, dict) else None
    own = agui.get("message_id") if isinstance(agui, dict) else None
    return own if isinstance(own, str) else str(event["message_id"])


def messages_snapshot(turns: list[dict[str, Any]]) -> MessagesSnapshotEvent:
    """The stored transcript (`{role, content, message_id, …}` turns) as AG-UI messages."""
    messages: list[Any] = [
        UserMessage(id=t["message_id"], content=t["content"])
        if t["role"] == "user"
        else AssistantMessage(id=t["message_id"], content=t["content"])
        for t in turns
    ]
    return MessagesSnapshotEvent(messages=messages)


class EventMapper:
    """Maps the events of one conversation, in offset order, for one AG-UI stream."""

    def __init__(self, thread_id: str, run_id: str, state: Any, own_keys: set[str]) -> None:
        self.thread_id = thread_id
        self.run_id = run_id  # the AG-UI run: the request's runId
        self.state = state  # the client's state document as this stream has patched it
        self.own_keys = own_keys  # client_msg_ids of the request's own message(s)
        self.open: dict[str, str | None] = {}  # text messages opened: message_id -> run_id

    def started(self) -> RunStartedEvent:
        return RunStartedEvent(thread_id=self.thread_id, run_id=self.run_id)

    def map(self, event: dict[str, Any]) -> list[BaseEvent]:
        """The AG-UI events for one Steerway event that is not the stream's end."""
        kind = event.get("type")
        if kind == "user.message":
            if event.get("client_msg_id") in self.own_keys:
                return []  # the client sent it: it has it already
            mid = agui_message_id(event)
            return [
                TextMessageStartEvent(message_id=mid, role="user"),
                TextMessageContentEvent(message_id=mid, delta=event["text"]),
                TextMessageEndEvent(message_id=mid),
            ]
        if kind == "message.delta":
            mid = event["message_id"]
            out: list[BaseEvent] = self._open(mid, event.get("run_id"))
            if event["delta"]:
                out.append(TextMessageContentEvent(message_id=mid, delta=event["delta"]))
            return out
        if kind == "message.completed":
            mid = event["message_id"]
            if mid in self.open:
                del self.open[mid]
                return [TextMessageEndEvent(message_id=mid)]
            content = event["message"]["content"]
            out = [TextMessageStartEvent(message_id=mid, role="assistant")]
            if content:
                out.append(TextMessageContentEvent(message_id=mid, delta=content))
            return [*out, TextMessageEndEvent(message_id=mid)]
        if kind == "tool.call.started":
            call = event["tool_call_id"]
            arguments = event.get("arguments")
            return [
                ToolCallStartEvent(tool_call_id=call, tool_call_name=event["name"]),
                ToolCallArgsEvent(
                    tool_call_id=call, delta="" if arguments is None else json_text(arguments)
                ),
                ToolCallEndEvent(tool_call_id=call),
            ]
        if kind == "tool.call.completed":
            call = event["tool_call_id"]
            if "error" in event:
                content = orjson.dumps({"error": event["error"]}).decode()
            else:
                content = json_text(event.get("result"))
            return [
                ToolCallResultEvent(
                    message_id=f"{call}.result", tool_call_id=call, content=content, role="tool"
                )
            ]
        if kind == "state.updated":
            return [
                StateDeltaEvent(delta=self._patch(event["scope"], event["key"], event["value"]))
            ]
        if kind == "run.ended":  # another run's end: its open messages close with it
            run = event.get("run_id")
            ended = [m for m, r in self.open.items() if r == run]
            return [*self._close(ended), custom("run.ended", event)]
        if isinstance(kind, str) and kind in CUSTOM_EVENTS:
            return [custom(kind, event)]
        return [CustomEvent(name=CUSTOM_PREFIX + "unknown", value=event)]  # a newer gateway's

    def finished(self, ended: dict[str, Any]) -> list[BaseEvent]:
        """The stream's own run ended: open messages close, then `RUN_FINISHED` (completed,
        or cancelled as the `cancelled` outcome) or `RUN_ERROR` (failed, timeout)."""
        out = self._close(list(self.open))
        status = ended.get("status")
        summary = {
            "run_id": ended.get("run_id"),
            "status": status,
            "reason": ended.get("reason"),
            "usage": ended.get("usage"),
        }
        if status == "completed" or status == "cancelled":
            outcome = {"type": "success" if status == "completed" else "cancelled"}
            out.append(
                RunFinishedEvent.model_validate(
                    {
                        "threadId": self.thread_id,
                        "runId": self.run_id,
                        "result": summary,
                        "outcome": outcome,
                    }
                )
            )
            return out
        error = ended.get("error") or {}
        code = error.get("code") if status == "failed" else f"timeout_{ended.get('reason')}"
        message = error.get("message") or f"the run ended {status} ({ended.get('reason')})"
        out.append(
            RunErrorEvent(message=str(message), code=str(code), metadata={"steerway": summary})
        )
        return out

    def _open(self, mid: str, run_id: str | None) -> list[BaseEvent]:
        if mid in self.open:
            return []
        self.open[mid] = run_id
        return [TextMessageStartEvent(message_id=mid, role="assistant")]

    def _close(self, message_ids: list[str]) -> list[BaseEvent]:
        for mid in message_ids:
            del self.open[mid]
        return [TextMessageEndEvent(message_id=mid) for mid in message_ids]

    def _patch(self, scope: str, key: str, value: Any) -> list[dict[str, Any]]:
        """`state.updated` as a JSON Patch on the client's document `{scope: {key: value}}`:
        `add` replaces a member that exists, so only a missing scope object (or a state
        that is not an object at all) needs a larger operation."""
        if not isinstance(self.state, dict):
            self.state = {scope: {key: value}}
            return [{"op": "replace", "path": "", "value": self.state}]
        inner = self.state.get(scope)
        if not isinstance(inner, dict):
            self.state[scope] = {key: value}
            return [{"op": "add", "path": _pointer(scope), "value": {key: value}}]
        inner[key] = value
        return [{"op": "add", "path": _pointer(scope) + _pointer(key), "value": value}]
