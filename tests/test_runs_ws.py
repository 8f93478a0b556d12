"""Runs, PROTOCOL.md section 10 (issue 3, item 5), end to end over the real server.

The runners here are driven by the test: `Fed` (tests.helpers) yields exactly what
the test puts into its queue, `Stuck` parks in an await that never returns.  Both
record in a `finally` block that their generator was closed.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from gateway.runners.base import RunContext
from store.base import StoreError, TurnRecord
from store.memory import MemoryStore
from tests.conftest import Client, Gateway, run_gateway
from tests.helpers import (
    END,
    TIMEOUT,
    Fed,
    Runner,
    assert_gap_free,
    completed,
    delta,
    event_texts,
    expect,
    run_completed,
)


class Stuck(Runner):
    """Yields `first` results, then waits on an event nobody ever sets, never looking
    at its cancel signal."""

    def __init__(self, name: str = "stuck", first: list[dict[str, Any]] | None = None) -> None:
        super().__init__(name)
        self.first = first or []
        self.stuck: dict[str, asyncio.Event] = {}
        self.closed: dict[str, asyncio.Event] = {}

    def events(self, run_id: str) -> tuple[asyncio.Event, asyncio.Event]:
        return (
            self.stuck.setdefault(run_id, asyncio.Event()),
            self.closed.setdefault(run_id, asyncio.Event()),
        )

    async def run(self, ctx: RunContext) -> AsyncIterator[Any]:
        stuck, closed = self.events(ctx.run_id)
        try:
            for result in self.first:
                yield result
            stuck.set()
            await asyncio.Event().wait()
            yield delta("never")  # pragma: no cover
        finally:
            closed.set()


def strip(frame: dict[str, Any]) -> dict[str, Any]:
    """An event without what differs from run to run."""
    return {k: v for k, v in frame.items() if k not in ("offset", "ts", "conversation_id")}


def run_events(client: Client, run_id: str) -> list[dict[str, Any]]:
    return [f for f in client.events() if f.get("run_id") == run_id]


async def start(
    client: Client, text: str, cmid: str, **fields: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Send a message that starts a run; its ack and run.started."""
    await client.message(text, cmid, **fields)
    ack = await expect(client, "ack", client_msg_id=cmid)
    assert ack["route"] == "run", ack
    started = await expect(client, "run.started", run_id=ack["run_id"])
    return ack, started


async def get_run(gw: Gateway, run_id: str) -> dict[str, Any]:
    async with gw.client() as http:
        response = await http.get(f"/api/runs/{run_id}")
    assert response.status_code == 200, response.text
    doc: dict[str, Any] = response.json()
    return doc


# --------------------------------------------------------------------------- result rules


async def test_sequence_rules(caplog: pytest.LogCaptureFixture) -> None:
    fed = Fed()
    fed.put(
        delta("a"),  # missing -> 1
        delta("b", sequence=2),
        delta("dup-of-2", sequence=2),  # duplicate: dropped
        delta("c", sequence="7"),  # not an integer -> 3, warning
        delta("d", sequence=0),  # <= 0 -> 4, warning
        delta("e", sequence=-5),  # -> 5, warning
        delta("f", sequence=6.0),  # a float is not an integer -> 6, warning
        delta("g", sequence=True),  # a bool is not an integer -> 7, warning
        delta("h", sequence=10),  # gap 7 -> 10: a warning only, delivered
        delta("below", sequence=9),  # at or below 10: a duplicate, dropped
        delta("again", sequence=10),  # duplicate: dropped
        delta("i"),  # missing -> 11
        delta("j", sequence=12),
        completed("abcdefghij"),
        run_completed("stop", sequence=14),
    )
    caplog.set_level(logging.WARNING, logger="steerway.runs")
    async with run_gateway(runners=[fed]) as gw, gw.connect("seq", after=0) as client:
        ack, _ = await start(client, "go", "m1", runner="fed")
        ended = await expect(client, "run.ended", run_id=ack["run_id"])
        assert ended["status"] == "completed"
        assert ended["reason"] == "stop"
        deltas = [f["delta"] for f in client.events() if f["type"] == "message.delta"]
        assert deltas == ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"]
        assert [f["type"] for f in client.events()] == [
            "user.message",
            "run.started",
            *["message.delta"] * 10,
            "message.completed",
            "run.ended",
        ]
        assert_gap_free(client)
        await asyncio.wait_for(fed.closed[ack["run_id"]].wait(), TIMEOUT)
    warnings = [r.getMessage() for r in caplog.records if r.name == "steerway.runs"]
    assert sum("not a positive integer" in w for w in warnings) == 5, warnings
    assert sum("duplicate sequence" in w for w in warnings) == 3, warnings
    assert [w for w in warnings if "sequence gap" in w] == [
        f"run {ack['run_id']} (fed): sequence gap: 7 -> 10"
    ]


BAD_RESULTS: list[Any] = [
    # an extra field in the data of every type
    {"type": "message.delta", "data": {"chunk": "x", "extra": 1}},
    {
        "type": "message.completed",
        "data": {"message": {"role": "assistant", "content": "x"}, "extra": 1},
    },
    {
        "type": "message.completed",
        "data": {"message": {"role": "assistant", "content": "x", "extra": 1}},
    },
    {"type": "tool.call.started", "data": {"tool_call_id": "t", "name": "n", "extra": 1}},
    {"type": "tool.call.completed", "data": {"tool_call_id": "t", "name": "n", "extra": 1}},
    {"type": "state.updated", "data": {"scope": "runner", "key": "k", "value": 1, "extra": 1}},
    {"type": "run.completed", "data": {"finish_reason": "stop", "extra": 1}},
    {"type": "run.failed", "data": {"error": "e", "code": "c", "retryable": False, "extra": 1}},
    # an extra field in the envelope
    {"type": "message.delta", "data": {"chunk": "x"}, "extra": 1},
    # missing and ill-typed fields
    {"type": "message.delta", "data": {}},
    {"type": "message.delta", "data": {"chunk": 5}},
    {"type": "message.delta"},
    {"type": "message.delta", "data": "x"},
    {"type": "message.completed", "data": {"message": {"role": "user", "content": "x"}}},
    {"type": "message.completed", "data": {"message": "x"}},
    {"type": "tool.call.started", "data": {"name": "n"}},
    {"type": "tool.call.completed", "data": {"tool_call_id": 1, "name": "n"}},
    {"type": "state.updated", "data": {"scope": "world", "key": "k", "value": 1}},
    {"type": "state.updated", "data": {"scope": "runner", "value": 1}},
    {"type": "state.updated", "data": {"scope": "runner", "key": "k", "value": "v" * 300_000}},
    {"type": "run.completed", "data": {}},
    {"type": "run.completed", "data": {"finish_reason": 1}},
    {"type": "run.failed", "data": {"error": "e", "code": "c"}},
    {"type": "run.failed", "data": {"error": "e", "code": "c", "retryable": "no"}},
    {"type": "message.delta", "data": {"chunk": "x"}, "usage": [1]},
    # not a result at all
    {"data": {"chunk": "x"}},
    {"type": 5, "data": {"chunk": "x"}},
    ["message.delta", {"chunk": "x"}],
    "message.delta",
    None,
]

UNKNOWN_RESULTS: list[Any] = [
    {"type": "thinking", "data": {"text": "hmm"}},
    {"type": "message.delta.v2", "data": {"chunk": "x"}},
    {"type": "run.ended", "data": {"status": "failed"}},
]


async def test_schema_validation_drops_bad_results_and_ignores_unknown_types(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fed = Fed()
    good = [
        {"type": "tool.call.started", "data": {"tool_call_id": "t1", "name": "search"}},
        {
            "type": "tool.call.started",
            "data": {"tool_call_id": "t2", "name": "fetch", "arguments": {"url": "u"}},
        },
        {
            "type": "tool.call.completed",
            "data": {"tool_call_id": "t1", "name": "search", "result": [1]},
        },
        {
            "type": "tool.call.completed",
            "data": {"tool_call_id": "t2", "name": "fetch", "error": "404"},
        },
        {"type": "state.updated", "data": {"scope": "actor", "key": "mood", "value": {"ok": True}}},
        delta("hi"),
        completed("hi"),
        {
            "type": "run.completed",
            "data": {"finish_reason": "end_turn"},
            "usage": {"tokens": 3},
        },
    ]
    caplog.set_level(logging.WARNING, logger="steerway.runs")
    # Bad and unknown results around every good one: none of them ends or disturbs the run.
    for result in good:
        fed.put(*BAD_RESULTS, *UNKNOWN_RESULTS, result)
    async with run_gateway(runners=[fed]) as gw, gw.connect("schema", after=0) as client:
        ack, _ = await start(client, "go", "m1", runner="fed")
        run_id = ack["run_id"]
        await expect(client, "run.ended", run_id=run_id)
        events = [strip(f) for f in client.events()][2:]
        message_id = events[5]["message_id"]
        assert events == [
            {
                "type": "tool.call.started",
                "run_id": run_id,
                "tool_call_id": "t1",
                "name": "search",
                "arguments": None,
            },
            {
                "type": "tool.call.started",
                "run_id": run_id,
                "tool_call_id": "t2",
                "name": "fetch",
                "arguments": {"url": "u"},
            },
            {
                "type": "tool.call.completed",
                "run_id": run_id,
                "tool_call_id": "t1",
                "name": "search",
                "result": [1],
            },
            {
                "type": "tool.call.completed",
                "run_id": run_id,
                "tool_call_id": "t2",
                "name": "fetch",
                "error": "404",
            },
            {
                "type": "state.updated",
                "run_id": run_id,
                "scope": "actor",
                "key": "mood",
                "value": {"ok": True},
            },
            {"type": "message.delta", "run_id": run_id, "message_id": message_id, "delta": "hi"},
            {
                "type": "message.completed",
                "run_id": run_id,
                "message_id": message_id,
                "message": {"role": "assistant", "content": "hi"},
            },
            {
                "type": "run.ended",
                "run_id": run_id,
                "status": "completed",
                "reason": "end_turn",
                "usage": {"tokens": 3},
            },
        ]
        assert_gap_free(client)
        doc = await get_run(gw, run_id)
        assert (doc["status"], doc["reason"], doc["usage"]) == (
            "completed",
            "end_turn",
            {"tokens": 3},
        )
    dropped = [
        r
        for r in caplog.records
        if r.getMessage().startswith("run ") and "dropped" in r.getMessage()
    ]
    # every bad result was dropped with a warning; unknown types are ignored silently
    assert len(dropped) == len(BAD_RESULTS) * len(good), [r.getMessage() for r in dropped[:5]]


async def test_result_over_1_mib_is_truncated_and_the_run_goes_on() -> None:
    fed = Fed()
    envelope = len(orjson.dumps(delta("")))
    async with run_gateway(runners=[fed]) as gw, gw.connect("big", after=0) as client:
        ack, _ = await start(client, "go", "m1", runner="fed")
        # One at a time: two 1 MiB events queued together are a slow consumer (section 6).
        fed.put(delta("a" * (1024 * 1024 + 1000)))
        first = await expect(client, "message.delta")
        # cut so that the whole result is exactly 1 MiB as JSON
        assert first["delta"] == "a" * (1024 * 1024 - envelope)
        fed.put(delta("é" * (600 * 1024)))  # 1.2 MB of UTF-8 in 600 Ki characters
        second = await client.until_type("message.delta")
        cut = second["delta"]
        assert cut == "é" * len(cut)
        assert 1024 * 1024 - 1 <= len(orjson.dumps(delta(cut))) <= 1024 * 1024
        fed.put(delta(" after"), completed("done"), run_completed())
        ended = await expect(client, "run.ended", run_id=ack["run_id"])
        assert ended["status"] == "completed"
        deltas = [f["delta"] for f in client.events() if f["type"] == "message.delta"]
        assert deltas == [first["delta"], cut, " after"]
        assert_gap_free(client)
        # the stored events are the same: a replay delivers them too
        async with gw.connect("big", after=0) as late:
            await expect(late, "run.ended", run_id=ack["run_id"])
            assert event_texts(late) == event_texts(client)


# --------------------------------------------------------------------------- deadlines


async def test_wall_clock_deadline_ends_the_run_timeout_deadline() -> None:
    stuck = Stuck(first=[delta("thinking")])
    async with (
        run_gateway(runners=[stuck], run_deadline_s=0.3) as gw,
        gw.connect("deadline", after=0) as client,
    ):
        loop = asyncio.get_running_loop()
        began = loop.time()
        ack, _ = await start(client, "go", "m1", runner="stuck")
        run_id = ack["run_id"]
        ended = await expect(client, "run.ended", run_id=run_id)
        assert loop.time() - began >= 0.3
        assert strip(ended) == {
            "type": "run.ended",
            "run_id": run_id,
            "status": "timeout",
            "reason": "deadline",
            "usage": None,
        }
        _, closed = stuck.events(run_id)
        await asyncio.wait_for(closed.wait(), TIMEOUT)
        doc = await get_run(gw, run_id)
        assert (doc["status"], doc["reason"]) == ("timeout", "deadline")
        # the conversation goes on: the next message starts a new run
        ack2, _ = await start(client, "again", "m2")
        assert ack2["run_id"] != run_id


async def test_idle_limit_ends_the_run_timeout_idle() -> None:
    stuck = Stuck(first=[delta("one"), delta(" two")])
    async with (
        run_gateway(runners=[stuck], run_idle_s=0.3) as gw,
        gw.connect("idle", after=0) as client,
    ):
        ack, _ = await start(client, "go", "m1", runner="stuck")
        run_id = ack["run_id"]
        ended = await expect(client, "run.ended", run_id=run_id)
        assert (ended["status"], ended["reason"]) == ("timeout", "idle")
        assert [f["delta"] for f in client.events() if f["type"] == "message.delta"] == [
            "one",
            " two",
        ]
        _, closed = stuck.events(run_id)
        await asyncio.wait_for(closed.wait(), TIMEOUT)
        doc = await get_run(gw, run_id)
        assert (doc["status"], doc["reason"]) == ("timeout", "idle")


# --------------------------------------------------------------------------- cancel


@pytest.mark.parametrize("named", [True, False])
async def test_cancel_stops_a_stuck_runner_within_1s(named: bool) -> None:
    stuck = Stuck(first=[delta("working")])
    async with run_gateway(runners=[stuck]) as gw, gw.connect("cancel", after=0) as client:
        ack, _ = await start(client, "go", "m1", runner="stuck")
        run_id = ack["run_id"]
        waiting, closed = stuck.events(run_id)
        await asyncio.wait_for(waiting.wait(), TIMEOUT)  # parked in the endless await
        loop = asyncio.get_running_loop()
        sent = loop.time()
        await client.send({"type": "cancel", "run_id": run_id} if named else {"type": "cancel"})
        ended = await expect(client, "run.ended", within=1.0, run_id=run_id)
        assert loop.time() - sent < 1.0
        assert strip(ended) == {
            "type": "run.ended",
            "run_id": run_id,
            "status": "cancelled",
            "reason": "cancel_requested",
            "usage": None,
        }
        await asyncio.wait_for(closed.wait(), 1.0)  # the runner's generator was closed
        assert not [f for f in client.frames if f["type"] == "error"]
        doc = await get_run(gw, run_id)
        assert (doc["status"], doc["reason"], doc["error"]) == (
            "cancelled",
            "cancel_requested",
            None,
        )
        # the conversation keeps serving
        ack2, _ = await start(client, "again", "m2")
        assert ack2["run_id"] != run_id
        assert_gap_free(client)


async def test_cancel_over_rest_stops_a_stuck_runner_within_1s() -> None:
    stuck = Stuck()
    async with run_gateway(runners=[stuck]) as gw, gw.connect("rcancel", after=0) as client:
        ack, _ = await start(client, "go", "m1", runner="stuck")
        run_id = ack["run_id"]
        waiting, closed = stuck.events(run_id)
        await asyncio.wait_for(waiting.wait(), TIMEOUT)
        loop = asyncio.get_running_loop()
        sent = loop.time()
        async with gw.client() as http:
            response = await http.post(f"/api/runs/{run_id}/cancel")
        assert response.status_code == 202, response.text
        ended = await expect(client, "run.ended", within=1.0, run_id=run_id)
        assert loop.time() - sent < 1.0
        assert (ended["status"], ended["reason"]) == ("cancelled", "cancel_requested")
        await asyncio.wait_for(closed.wait(), 1.0)


def _driver_task(run_id: str) -> asyncio.Task[Any]:
    tasks = [t for t in asyncio.all_tasks() if t.get_name() == f"run-{run_id}"]
    assert len(tasks) == 1, tasks
    return tasks[0]


async def test_cancel_stops_echo_sleep_600_within_1s(gw: Gateway) -> None:
    async with gw.connect("sleepy", after=0) as client:
        ack, _ = await start(client, "/sleep 600", "m1")
        run_id = ack["run_id"]
        task = _driver_task(run_id)
        # steering into it is acknowledged (it is left over, then dropped by the cancel)
        await client.message("hurry up", "m2")
        steer = await expect(client, "ack", client_msg_id="m2")
        assert (steer["route"], steer["run_id"]) == ("steer", run_id)
        loop = asyncio.get_running_loop()
        sent = loop.time()
        await client.send({"type": "cancel", "run_id": run_id})
        ended = await expect(client, "run.ended", within=1.0, run_id=run_id)
        assert loop.time() - sent < 1.0
        assert (ended["status"], ended["reason"]) == ("cancelled", "cancel_requested")
        dropped = [f for f in client.events() if f["type"] == "steering.dropped"]
        assert [(d["message_ids"], d["reason"]) for d in dropped] == [
            ([steer["message_id"]], "cancelled")
        ]
        await asyncio.wait({task}, timeout=1.0)
        assert task.done()  # the runner task is gone: asyncio.sleep(600) was interrupted
        assert not [f for f in client.events() if f["type"] == "message.delta"]
        # no follow-up run: the connection and the conversation keep working
        await client.send({"type": "ping", "nonce": "after"})
        assert (await expect(client, "pong"))["nonce"] == "after"
        ack3, _ = await start(client, "x", "m3")
        assert (await expect(client, "run.ended", run_id=ack3["run_id"]))["status"] == "completed"


# --------------------------------------------------------------------------- failures


async def test_a_runner_that_raises_fails_the_run_and_the_gateway_keeps_serving() -> None:
    fed = Fed()
    async with run_gateway(runners=[fed]) as gw, gw.connect("raise", after=0) as client:
        fed.put(delta("partial"), RuntimeError("kaboom"))
        ack, _ = await start(client, "go", "m1", runner="fed")
        run_id = ack["run_id"]
        ended = await expect(client, "run.ended", run_id=run_id)
        assert strip(ended) == {
            "type": "run.ended",
            "run_id": run_id,
            "status": "failed",
            "reason": "runner_error",
            "error": {
                "code": "runner_error",
                "message": "RuntimeError: kaboom",
                "retryable": False,
            },
            "usage": None,
        }
        await asyncio.wait_for(fed.closed[run_id].wait(), TIMEOUT)
        doc = await get_run(gw, run_id)
        assert doc["status"] == "failed"
        assert doc["error"] == ended["error"]

        # raising before the first result is the same
        fed.put(ValueError("early"))
        ack2, _ = await start(client, "go", "m2")
        ended2 = await expect(client, "run.ended", run_id=ack2["run_id"])
        assert (ended2["status"], ended2["error"]["message"]) == ("failed", "ValueError: early")

        # the gateway keeps serving: the next message on this and another conversation works
        fed.put(delta("fine"), run_completed())
        ack3, _ = await start(client, "go", "m3")
        ended3 = await expect(client, "run.ended", run_id=ack3["run_id"])
        assert (ended3["status"], ended3["reason"]) == ("completed", "stop")
        async with gw.connect("other", after=0) as other:
            ack4, _ = await start(other, "still here", "m1")
            done = await expect(other, "message.completed", run_id=ack4["run_id"])
            assert done["message"]["content"] == "echo: still here"
        assert_gap_free(client)


async def test_a_generator_that_just_returns_completes_the_run() -> None:
    fed = Fed()
    fed.put(delta("x"), END)
    async with run_gateway(runners=[fed]) as gw, gw.connect("ret", after=0) as client:
        ack, _ = await start(client, "go", "m1", runner="fed")
        ended = await expect(client, "run.ended", run_id=ack["run_id"])
        assert (ended["status"], ended["reason"]) == ("completed", "completed")


class TranscriptDown(MemoryStore):
    """Fails the next transcript read: the store goes away just as a run starts."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_transcript = True

    async def transcript(self, conversation_id: str) -> list[TurnRecord]:
        if self.fail_transcript:
            self.fail_transcript = False
            raise StoreError("transcript read failed")
        return await super().transcript(conversation_id)


async def test_a_store_failure_as_the_run_starts_fails_it_retryable() -> None:
    store = TranscriptDown()
    async with run_gateway(store=store) as gw, gw.connect("nostore", after=0) as client:
        ack, _ = await start(client, "a b", "m1")
        ended = await expect(client, "run.ended", run_id=ack["run_id"])
        assert (ended["status"], ended["reason"]) == ("failed", "store_unavailable")
        assert ended["error"] == {
            "code": "store_unavailable",
            "message": "transcript read failed",
            "retryable": True,
        }
        ack2, _ = await start(client, "a b", "m2")
        done = await expect(client, "message.completed", run_id=ack2["run_id"])
        assert done["message"]["content"] == "echo: a b"


async def test_echo_fail_ends_failed_demo_failure(gw: Gateway) -> None:
    async with gw.connect("fail", after=0) as client:
        ack, _ = await start(client, "/fail", "m1")
        run_id = ack["run_id"]
        ended = await expect(client, "run.ended", run_id=run_id)
        error = {
            "code": "demo_failure",
            "message": "the echo runner was asked to fail",
            "retryable": False,
        }
        assert strip(ended) == {
            "type": "run.ended",
            "run_id": run_id,
            "status": "failed",
            "reason": "demo_failure",
            "error": error,
            "usage": None,
        }
        doc = await get_run(gw, run_id)
        assert (doc["status"], doc["reason"], doc["error"]) == ("failed", "demo_failure", error)
        ack2, _ = await start(client, "next", "m2")
        done = await expect(client, "run.ended", run_id=ack2["run_id"])
        assert done["status"] == "completed"


# --------------------------------------------------------------------------- one start, one end


async def test_results_after_the_end_are_ignored_and_the_status_never_changes() -> None:
    fed = Fed()
    fed.put(
        delta("done"),
        run_completed("stop"),
        # everything below comes after the run ended
        delta("LATE!"),
        {"type": "run.failed", "data": {"error": "LATE!", "code": "late", "retryable": True}},
        completed("LATE!"),
        run_completed("again"),
    )
    async with run_gateway(runners=[fed]) as gw, gw.connect("after-end", after=0) as client:
        ack, _ = await start(client, "go", "m1", runner="fed")
        run_id = ack["run_id"]
        ended = await expect(client, "run.ended", run_id=run_id)
        assert (ended["status"], ended["reason"]) == ("completed", "stop")
        await asyncio.wait_for(fed.closed[run_id].wait(), TIMEOUT)
        assert fed.feed.empty()  # the late results all went to the gateway
        # A cancel now: refused, the run already ended.
        await client.send({"type": "cancel", "run_id": run_id})
        error = await expect(client, "error")
        assert error["code"] == "no_active_run"
        # Whatever the driver posted before it was stopped is behind us in the actor's
        # mailbox: this message's ack comes after it was all handled.
        fed.put(delta("second"), run_completed())
        ack2, _ = await start(client, "next", "m2")
        await expect(client, "run.ended", run_id=ack2["run_id"])
        mine = run_events(client, run_id)
        assert [f["type"] for f in mine] == [
            "user.message",
            "run.started",
            "message.delta",
            "run.ended",
        ]
        assert mine[2]["delta"] == "done"
        assert "LATE!" not in str(client.raw)
        doc = await get_run(gw, run_id)
        assert (doc["status"], doc["reason"], doc["error"]) == ("completed", "stop", None)
        assert doc["ended_at"] == ended["ts"]
        assert_gap_free(client)


async def test_exactly_one_start_and_one_end_per_run(gw: Gateway) -> None:
    """Runs of every fate in one conversation: completed, failed, cancelled while running,
    cancelled while queued, interrupted, and queued runs that start later."""
    async with gw.connect("fates", after=0) as client, gw.client() as http:
        a, _ = await start(client, "a b", "m1")
        await expect(client, "run.ended", run_id=a["run_id"])
        b, _ = await start(client, "/fail", "m2")
        await expect(client, "run.ended", run_id=b["run_id"])
        c, _ = await start(client, "/sleep 600", "m3")
        routes = {}
        for cmid, text in (("m4", "queued one"), ("m5", "queued two")):
            await client.message(text, cmid, mode="queue")
            routes[cmid] = await expect(client, "ack", client_msg_id=cmid)
            assert routes[cmid]["route"] == "queue"
        # cancel the first queued run before it starts
        await client.send({"type": "cancel", "run_id": routes["m4"]["run_id"]})
        await expect(client, "run.ended", run_id=routes["m4"]["run_id"])
        # interrupt the sleeping run
        await client.message("now", "m6", mode="interrupt")
        f = await expect(client, "ack", client_msg_id="m6")
        assert f["route"] == "interrupt"
        await expect(client, "run.ended", run_id=f["run_id"])
        await expect(client, "run.ended", run_id=routes["m5"]["run_id"])

        expected = {
            a["run_id"]: ("completed", "stop", True),
            b["run_id"]: ("failed", "demo_failure", True),
            c["run_id"]: ("cancelled", "interrupted", True),
            routes["m4"]["run_id"]: ("cancelled", "cancel_requested", False),
            f["run_id"]: ("completed", "stop", True),
            routes["m5"]["run_id"]: ("completed", "stop", True),
        }
        events = client.events()
        assert_gap_free(client)
        starts = Counter(e["run_id"] for e in events if e["type"] == "run.started")
        ends = Counter(e["run_id"] for e in events if e["type"] == "run.ended")
        assert dict(ends) == dict.fromkeys(expected, 1)
        assert dict(starts) == {r: 1 for r, (_, _, began) in expected.items() if began}
        for run_id, (status, reason, began) in expected.items():
            mine = [e for e in events if e.get("run_id") == run_id]
            assert mine[-1]["type"] == "run.ended", mine  # nothing of a run after its end
            assert (mine[-1]["status"], mine[-1]["reason"]) == (status, reason)
            if began:
                index = next(i for i, e in enumerate(mine) if e["type"] == "run.started")
                assert {e["type"] for e in mine[:index]} <= {"user.message", "run.queued"}
            doc = (await http.get(f"/api/runs/{run_id}")).json()
            assert (doc["status"], doc["reason"]) == (status, reason)
            assert (doc["started_at"] is not None) == began
        # the interrupt's run started before the queued one, which started after it ended
        order = [e["run_id"] for e in events if e["type"] in ("run.started", "run.ended")]
        assert order.index(f["run_id"]) < order.index(routes["m5"]["run_id"])
        listing = (await http.get("/api/runs", params={"conversation_id": "fates"})).json()
        assert {r["run_id"]: r["status"] for r in listing["runs"]} == {
            r: s for r, (s, _, _) in expected.items()
        }
