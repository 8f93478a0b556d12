"""`POST /api/agui` (issue 14, item 1): RunAgentInput in, AG-UI events over SSE out.

Every event the stream carries is validated with the `ag-ui-protocol` models; runs,
steering through a second request, resume with Last-Event-ID, bad input, auth."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from ag_ui.core import Event as AguiEvent
from pydantic import TypeAdapter

from gateway.agui.endpoint import client_msg_id
from gateway.auth import mint
from tests.conftest import Gateway, run_gateway
from tests.helpers import TIMEOUT, Fed, Gated, completed, delta, run_completed, stored_events

EVENT = TypeAdapter(AguiEvent)


def run_input(
    thread: str, text: str | None, message_id: str = "m1", **extra: Any
) -> dict[str, Any]:
    messages = [] if text is None else [{"id": message_id, "role": "user", "content": text}]
    return {"threadId": thread, "runId": f"r-{message_id}", "messages": messages, **extra}


class Stream:
    """An open AG-UI SSE response: its events (validated) and their SSE ids."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.events: list[dict[str, Any]] = []
        self.ids: list[int] = []  # the `id:` lines, in order
        self._lines = response.aiter_lines()
        self.ended = False

    async def next(self, within: float = TIMEOUT) -> dict[str, Any] | None:
        """The next event (comments and id-only blocks are recorded, not returned)."""
        data: list[str] = []
        async with asyncio.timeout(within):
            async for line in self._lines:
                if line.startswith("id:"):
                    self.ids.append(int(line[3:].strip()))
                elif line.startswith("data:"):
                    data.append(line[5:].strip())
                elif line == "" and data:
                    event: dict[str, Any] = orjson.loads("\n".join(data))
                    EVENT.validate_python(event)  # the ag-ui-protocol models accept it
                    self.events.append(event)
                    return event
        self.ended = True
        return None

    async def until(self, kind: str, within: float = TIMEOUT, **match: Any) -> dict[str, Any]:
        async with asyncio.timeout(within):
            while True:
                event = await self.next(within)
                assert event is not None, f"the stream ended before {kind}: {self.types()}"
                if event["type"] == kind and all(event.get(k) == v for k, v in match.items()):
                    return event

    async def rest(self) -> list[dict[str, Any]]:
        while await self.next() is not None:
            pass
        return self.events

    def types(self) -> list[str]:
        return [e["type"] for e in self.events]

    def text(self) -> str:
        """The assistant's streamed text (user messages of others are text messages too)."""
        users = {
            e["messageId"]
            for e in self.events
            if e["type"] == "TEXT_MESSAGE_START" and e.get("role") == "user"
        }
        return "".join(
            e["delta"]
            for e in self.events
            if e["type"] == "TEXT_MESSAGE_CONTENT" and e["messageId"] not in users
        )

    def customs(self, name: str) -> list[Any]:
        return [e["value"] for e in self.events if e["type"] == "CUSTOM" and e["name"] == name]


@contextlib.asynccontextmanager
async def stream(
    http: httpx.AsyncClient, body: Any, headers: dict[str, str] | None = None
) -> AsyncIterator[Stream]:
    async with http.stream("POST", "/api/agui", json=body, headers=headers) as response:
        assert response.status_code == 200, (response.status_code, await response.aread())
        assert response.headers["content-type"].startswith("text/event-stream")
        yield Stream(response)


async def refused(http: httpx.AsyncClient, body: Any, status: int, code: str, **kw: Any) -> None:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    response = await http.post("/api/agui", content=content, **kw)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code, response.text
    assert response.json()["error"]["message"]


# --------------------------------------------------------------------------- runs


async def test_a_run_streams_as_agui_events(gw: Gateway) -> None:
    async with gw.client() as http, stream(http, run_input("t1", "a  b")) as s:
        events = await s.rest()
    assert s.types() == [
        "RUN_STARTED",
        "CUSTOM",  # steerway.ack
        "CUSTOM",  # steerway.run.started
        "TEXT_MESSAGE_START",
        "TEXT_MESSAGE_CONTENT",
        "TEXT_MESSAGE_CONTENT",
        "TEXT_MESSAGE_CONTENT",
        "TEXT_MESSAGE_END",
        "RUN_FINISHED",
    ]
    assert events[0] == {"type": "RUN_STARTED", "threadId": "t1", "runId": "r-m1"}
    ack = s.customs("steerway.ack")[0]
    assert (ack["route"], ack["client_msg_id"], ack["offset"]) == ("run", "agui:m1", 1)
    assert s.text() == "echo: a b"
    finished = events[-1]
    assert finished["runId"] == "r-m1"
    assert finished["outcome"] == {"type": "success"}
    assert finished["result"]["run_id"] == ack["run_id"]
    assert finished["result"]["status"] == "completed"
    stored = await stored_events(gw, "t1")
    # SSE ids: every stored event from the message on, ascending, each once
    assert s.ids == [e["offset"] for e in stored]
    assert stored[0]["metadata"] == {"agui": {"message_id": "m1", "run_id": "r-m1"}}


async def test_tool_calls_state_and_errors_map() -> None:
    fed = Fed()
    async with run_gateway(runners=[fed]) as gw, gw.client() as http:
        body = run_input("t2", "go", forwardedProps={"runner": "fed"}, state={"seen": 1})
        async with stream(http, body) as s:
            await s.until("CUSTOM", name="steerway.run.started")
            fed.put(
                {
                    "type": "tool.call.started",
                    "data": {"tool_call_id": "c1", "name": "add", "arguments": {"a": 1}},
                },
                {
                    "type": "tool.call.completed",
                    "data": {"tool_call_id": "c1", "name": "add", "result": 2},
                },
                {
                    "type": "tool.call.completed",
                    "data": {"tool_call_id": "c2", "name": "x", "error": "boom"},
                },
                {
                    "type": "state.updated",
                    "data": {"scope": "runner", "key": "k", "value": {"v": 1}},
                },
                {"type": "state.updated", "data": {"scope": "runner", "key": "j/~", "value": 2}},
                {
                    "type": "run.failed",
                    "data": {"error": "bad", "code": "oops", "retryable": False},
                },
            )
            events = await s.rest()
    kinds = [e["type"] for e in events]
    start = kinds.index("TOOL_CALL_START")
    assert kinds[start:] == [
        "TOOL_CALL_START",
        "TOOL_CALL_ARGS",
        "TOOL_CALL_END",
        "TOOL_CALL_RESULT",
        "TOOL_CALL_RESULT",
        "STATE_DELTA",
        "STATE_DELTA",
        "RUN_ERROR",
    ]
    call = events[start : start + 4]
    assert (call[0]["toolCallId"], call[0]["toolCallName"]) == ("c1", "add")
    assert orjson.loads(call[1]["delta"]) == {"a": 1}
    assert (call[3]["toolCallId"], call[3]["content"]) == ("c1", "2")
    assert orjson.loads(events[start + 4]["content"]) == {"error": "boom"}
    # JSON Patch against the state the client sent: the scope object first, then a member
    assert events[start + 5]["delta"] == [
        {"op": "add", "path": "/runner", "value": {"k": {"v": 1}}}
    ]
    assert events[start + 6]["delta"] == [{"op": "add", "path": "/runner/j~1~0", "value": 2}]
    assert (events[-1]["code"], events[-1]["message"]) == ("oops", "bad")


async def test_a_cancelled_run_finishes_with_the_cancelled_outcome() -> None:
    fed = Fed()
    body = run_input("t3", "go", forwardedProps={"runner": "fed"})
    async with run_gateway(runners=[fed]) as gw, gw.client() as http, stream(http, body) as s:
        fed.put(delta("part"))
        await s.until("TEXT_MESSAGE_CONTENT")
        ack = s.customs("steerway.ack")[0]
        assert (await http.post(f"/api/runs/{ack['run_id']}/cancel")).status_code == 202
        events = await s.rest()
    # the open message is closed before the run's end
    assert [e["type"] for e in events[-2:]] == ["TEXT_MESSAGE_END", "RUN_FINISHED"]
    assert events[-1]["outcome"] == {"type": "cancelled"}


# --------------------------------------------------------------------------- steering


async def test_a_second_request_steers_the_active_run() -> None:
    gated = Gated()
    async with run_gateway(runners=[gated]) as gw, gw.client() as http:
        first = run_input("t4", "one", "m1", forwardedProps={"runner": "gated"})
        async with stream(http, first) as s1:
            await s1.until("TEXT_MESSAGE_CONTENT")
            run_id = s1.customs("steerway.ack")[0]["run_id"]
            second = run_input("t4", "two", "m2")
            second["messages"] = [*first["messages"], *second["messages"]]
            async with stream(http, second) as s2:
                ack = (await s2.until("CUSTOM", name="steerway.ack"))["value"]
                assert (ack["route"], ack["run_id"]) == ("steer", run_id)
                gated.release(run_id)
                await s2.rest()
            await s1.rest()
    assert s1.text() == "start one [steer] two"
    # the first stream shows the steering message and its absorption
    user = [e for e in s1.events if e["type"] == "TEXT_MESSAGE_START" and e["role"] == "user"]
    assert [u["messageId"] for u in user] == ["m2"]
    assert s1.customs("steerway.steering.absorbed")[0]["message_ids"] == [ack["message_id"]]
    # the second one from its own message on: the steered text, then the run's end
    assert s2.text() == " [steer] two"
    assert s2.types()[-1] == "RUN_FINISHED"
    assert s2.events[-1]["runId"] == "r-m2"


async def test_steering_left_over_is_followed_into_its_follow_up_run() -> None:
    gated = Gated()
    async with run_gateway(runners=[gated]) as gw, gw.client() as http:
        first = run_input("t5", "nopull one", "m1", forwardedProps={"runner": "gated"})
        async with stream(http, first) as s1:
            await s1.until("TEXT_MESSAGE_CONTENT")
            run_id = s1.customs("steerway.ack")[0]["run_id"]
            async with stream(http, run_input("t5", "two", "m2")) as s2:
                await s2.until("CUSTOM", name="steerway.ack")
                gated.release(run_id)
                follow = await s2.until("CUSTOM", name="steerway.run.started")
                gated.release(follow["value"]["run_id"])
                await s2.rest()
            await s1.rest()
    assert s1.types()[-1] == "RUN_FINISHED"
    # the steered run's message completes whole (its deltas came before this stream's
    # start), then the follow-up run's reply
    assert s2.text() == "start nopull one" + "start two"
    assert s2.events[-1]["result"]["run_id"] == follow["value"]["run_id"]


# --------------------------------------------------------------------------- resume


async def test_a_cut_stream_resumes_with_last_event_id_and_loses_nothing() -> None:
    fed = Fed()
    async with run_gateway(runners=[fed]) as gw, gw.client() as http:
        body = run_input("t6", "go", forwardedProps={"runner": "fed"})
        async with stream(http, body) as s1:
            fed.put(delta("a"), delta("b"))
            await s1.until("TEXT_MESSAGE_CONTENT", delta="b")
        cursor = s1.ids[-1]  # the client is cut off here
        fed.put(delta("c"), completed("abc"), run_completed())
        async with stream(http, body, {"Last-Event-ID": str(cursor)}) as s2:
            await s2.rest()
        assert s1.text() + s2.text() == "abc"
        assert s2.ids[0] == cursor + 1
        assert s2.types()[-1] == "RUN_FINISHED"
        # the resend stored nothing new: one user message
        stored = await stored_events(gw, "t6")
        assert [e["type"] for e in stored].count("user.message") == 1
        # a resume after the end ends at once
        async with stream(http, body, {"Last-Event-ID": str(stored[-1]["offset"])}) as s3:
            await s3.rest()
        assert s3.types() == ["RUN_STARTED", "CUSTOM", "RUN_FINISHED"]
        assert s3.customs("steerway.ack")[0]["duplicate"] is True


async def test_a_request_without_a_new_message_joins_the_conversation(gw: Gateway) -> None:
    async with gw.client() as http:
        async with stream(http, run_input("t7", "hello")) as s:
            await s.rest()
        async with stream(http, run_input("t7", None)) as join:
            await join.rest()
    assert join.types() == ["RUN_STARTED", "MESSAGES_SNAPSHOT", "RUN_FINISHED"]
    messages = join.events[1]["messages"]
    assert [(m["role"], m["content"]) for m in messages] == [
        ("user", "hello"),
        ("assistant", "echo: hello"),
    ]


async def test_a_closed_stream_leaves_no_subscriber() -> None:
    fed = Fed()
    async with run_gateway(runners=[fed]) as gw, gw.client() as http:
        async with stream(http, run_input("t8", "go", forwardedProps={"runner": "fed"})) as s:
            await s.until("CUSTOM", name="steerway.run.started")
            assert gw.hub.bus.count("t8") == 1
        await asyncio.wait_for(_until(lambda: gw.hub.bus.count("t8") == 0, http), TIMEOUT)
        fed.put(run_completed())


async def _until(condition: Any, http: httpx.AsyncClient) -> None:
    while not condition():
        await http.get("/healthz")


# --------------------------------------------------------------------------- bad input


async def test_bad_input_gets_a_clear_error_and_stores_nothing(gw: Gateway) -> None:
    async with gw.client() as http:
        await refused(http, b"{not json", 400, "invalid_json")
        await refused(http, [1], 400, "invalid_frame")
        await refused(http, {"threadId": "t9", "messages": []}, 400, "invalid_frame")  # no runId
        await refused(
            http, {"threadId": "t9", "runId": "r", "messages": [{"id": "x"}]}, 400, "invalid_frame"
        )
        await refused(http, run_input("bad id!", "x"), 400, "invalid_frame")
        await refused(
            http, run_input("t9", "x", forwardedProps={"mode": "loud"}), 400, "invalid_frame"
        )
        await refused(http, run_input("t9", ""), 400, "invalid_frame")
        await refused(http, run_input("t9", "x" * 40_000), 413, "text_too_long")
        image = [{"type": "image", "source": {"type": "url", "value": "http://x/y.png"}}]
        await refused(http, run_input("t9", image), 400, "invalid_frame")  # type: ignore[arg-type]
        await refused(http, b"{" + b" " * (1024 * 1024 + 1) + b"}", 400, "invalid_frame")
        await refused(
            http, run_input("t9", "x"), 400, "invalid_frame", headers={"Last-Event-ID": "-1"}
        )
        assert (await http.get("/api/agui")).status_code == 404  # as any other unknown route
    assert await stored_events(gw, "t9") == []


async def test_auth_and_origins_as_on_the_other_endpoints() -> None:
    secret = "s" * 32
    async with run_gateway(secret=secret) as gw, gw.client() as http:
        await refused(http, run_input("t10", "x"), 401, "unauthorized")
        other = mint(secret, "ann", "user", 60, convs=["other"])
        bearer = {"Authorization": f"Bearer {other}"}
        await refused(http, run_input("t10", "x"), 403, "forbidden", headers=bearer)
        mine = mint(secret, "ann", "user", 60, convs=["t10"])
        own = {"Authorization": f"Bearer {mine}"}
        evil = {**own, "Origin": "http://evil.example"}
        await refused(http, run_input("t10", "x"), 403, "forbidden", headers=evil)
        async with stream(http, run_input("t10", "x"), own) as s:
            await s.rest()
        assert s.text() == "echo: x"
        assert (await stored_events(gw, "t10"))[0]["author"] == "ann"


@pytest.mark.parametrize("agui_id", ["m-1", "x" * 60, "a b/c", "ü"])
def test_client_msg_ids_are_legal_and_stable(agui_id: str) -> None:
    key = client_msg_id(agui_id)
    assert key == client_msg_id(agui_id)
    assert key.startswith("agui:")
    assert len(key) <= 64
    assert key.isascii()
    assert " " not in key
    assert "/" not in key
