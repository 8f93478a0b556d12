"""A small AG-UI agent server for the tests, built with the `ag-ui-protocol` encoder.

`POST /agent` answers `you said: <last user message>` as AG-UI events over SSE
(a word a TEXT_MESSAGE_CONTENT).  What the last message says picks the behaviour:

- `tool`: a tool call (`add`, arguments {"a": 1, "b": 2}) and its result 3, then the text;
- `state`: a STATE_SNAPSHOT then a STATE_DELTA, then the text;
- `error`: RUN_ERROR (code `agent_down`);
- `break`: the connection is dropped after two events;
- `slow`: after its first word the stream waits for `gate`;
- `step`: a step `think` that finishes after `gate`, then the text;
- `unknown`: an event of a type AG-UI does not have, then the text;
- `disorder`: TEXT_MESSAGE_CONTENT with no TEXT_MESSAGE_START;
- `500`: that HTTP error.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

from ag_ui.core import (
    BaseEvent,
    RunAgentInput,
    RunErrorEvent,
    RunFinishedEvent,
    RunStartedEvent,
    StateDeltaEvent,
    StateSnapshotEvent,
    StepFinishedEvent,
    StepStartedEvent,
    TextMessageContentEvent,
    TextMessageEndEvent,
    TextMessageStartEvent,
    ToolCallArgsEvent,
    ToolCallEndEvent,
    ToolCallResultEvent,
    ToolCallStartEvent,
)
from ag_ui.encoder import EventEncoder
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.conftest import serve_asgi


class FakeAgent:
    def __init__(self) -> None:
        self.requests: list[RunAgentInput] = []
        self.headers: list[dict[str, str]] = []
        self.gate = asyncio.Event()
        self.disconnected = asyncio.Event()  # a stream's client went away before its end
        self.app = Starlette(routes=[Route("/agent", self.agent, methods=["POST"])])
        self.port = 0
        self.encoder = EventEncoder()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/agent"

    async def agent(self, request: Request) -> Response:
        run = RunAgentInput.model_validate(await request.json())
        self.requests.append(run)
        self.headers.append(dict(request.headers))
        last = next(m for m in reversed(run.messages) if m.role == "user").content
        assert isinstance(last, str)
        if last == "500":
            return JSONResponse({"error": {"message": "the agent fell over"}}, 500)
        return StreamingResponse(self._stream(run, last), media_type="text/event-stream")

    def _text(self, text: str) -> list[BaseEvent]:
        mid = uuid.uuid4().hex
        words = text.split(" ")
        return [
            TextMessageStartEvent(message_id=mid, role="assistant"),
            *[
                TextMessageContentEvent(message_id=mid, delta=w if i == 0 else " " + w)
                for i, w in enumerate(words)
            ],
            TextMessageEndEvent(message_id=mid),
        ]

    async def _stream(self, run: RunAgentInput, last: str) -> AsyncIterator[str]:
        enc = self.encoder.encode
        finished = False
        try:
            yield enc(RunStartedEvent(thread_id=run.thread_id, run_id=run.run_id))
            if last == "error":
                yield enc(RunErrorEvent(message="the agent is down", code="agent_down"))
                finished = True
                return
            if last == "disorder":
                yield enc(TextMessageContentEvent(message_id="nope", delta="x"))
            if last == "break":
                yield enc(TextMessageStartEvent(message_id="b", role="assistant"))
                raise ConnectionAbortedError("the fake agent drops the stream")
            if last == "unknown":
                yield 'data: {"type":"FROM_THE_FUTURE","x":1}\n\n'
            if last == "tool":
                yield enc(ToolCallStartEvent(tool_call_id="c1", tool_call_name="add"))
                yield enc(ToolCallArgsEvent(tool_call_id="c1", delta='{"a": 1,'))
                yield enc(ToolCallArgsEvent(tool_call_id="c1", delta=' "b": 2}'))
                yield enc(ToolCallEndEvent(tool_call_id="c1"))
                yield enc(ToolCallResultEvent(message_id="t1", tool_call_id="c1", content="3"))
            if last == "state":
                yield enc(StateSnapshotEvent(snapshot={"count": 1, "items": []}))
                patch = [
                    {"op": "replace", "path": "/count", "value": 2},
                    {"op": "add", "path": "/items/-", "value": "x"},
                ]
                yield enc(StateDeltaEvent.model_validate({"delta": patch}))
            if last == "step":
                yield enc(StepStartedEvent(step_name="think"))
                await self.gate.wait()
                yield enc(StepFinishedEvent(step_name="think"))
            events = self._text(f"you said: {last}")
            for i, event in enumerate(events):
                yield enc(event)
                if last == "slow" and i == 1:
                    await self.gate.wait()
            yield enc(RunFinishedEvent(thread_id=run.thread_id, run_id=run.run_id))
            finished = True
        finally:
            if not finished:
                self.disconnected.set()


@contextlib.asynccontextmanager
async def fake_agui() -> AsyncIterator[FakeAgent]:
    fake = FakeAgent()
    # `critical`: the `break` case makes uvicorn log the aborted response as an error
    async with serve_asgi(fake.app, log_level="critical") as server:
        fake.port = server.port
        yield fake


def texts(requests: list[Any]) -> list[list[tuple[str, str]]]:
    """Each request's messages as (role, content)."""
    return [[(m.role, m.content) for m in r.messages] for r in requests]
