"""The conversation machine (PROTOCOL.md sections 4, 5 and 10), fed directly: no I/O.

Examples first, one per rule; then a hypothesis test that feeds random interleavings of
every input and checks the invariants of the protocol on the whole event log.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import event as observe
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.conversation import ConversationMachine, Effects, RunnerSpec, Turn
from gateway.core.recovery import Recovered
from gateway.core.results import Result
from gateway.core.routing import Refusal, Route
from gateway.core.runs import Run, RunKind, RunStatus, UserText
from gateway.protocol.codes import ErrorCode
from gateway.protocol.frames import (
    AssistantMessage,
    CompletedData,
    DeltaData,
    Event,
    MessageFrame,
    RunCompletedData,
    RunError,
    RunFailedData,
    StateData,
    ToolCompletedData,
    ToolStartedData,
    UserMessage,
)

CID = "c1"
SPECS = {
    "echo": RunnerSpec("echo"),
    "mute": RunnerSpec("mute", supports_steering=False),
    "dropper": RunnerSpec("dropper", leftover_steering="drop"),
}


def new_machine(default: str = "echo", runner: str | None = None) -> ConversationMachine:
    return ConversationMachine(CID, SPECS.get, default, runner)


def frame(text: str = "hello", mode: str = "auto", key: str = "k1", **fields: Any) -> MessageFrame:
    return MessageFrame(type="message", client_msg_id=key, text=text, mode=mode, **fields)  # type: ignore[arg-type]


def send(
    m: ConversationMachine, text: str = "hello", mode: str = "auto", now: int = 1, **fields: Any
) -> UserMessage:
    routed = m.message(frame(text, mode, **fields), "alice", now)
    assert not isinstance(routed, Refusal), routed
    return routed[0]


def wire(fx: Effects) -> list[dict[str, Any]]:
    return [e.wire() for e in fx.events]


def types(fx: Effects) -> list[str]:
    return [e.type for e in fx.events]


def delta(chunk: str, usage: dict[str, Any] | None = None) -> Result:
    return Result("message.delta", DeltaData(chunk=chunk), 1, usage)


def done(finish: str = "stop", content: str | None = None) -> Result:
    message = None if content is None else AssistantMessage(content=content)
    return Result("run.completed", RunCompletedData(finish_reason=finish, message=message), 1)


def active_id(m: ConversationMachine) -> str:
    assert m.active is not None
    return m.active.run_id


def running(default: str = "echo") -> tuple[ConversationMachine, str]:
    """A new machine whose first message started a run (effects not taken), and its id."""
    m = new_machine(default)
    send(m)
    return m, active_id(m)


# --------------------------------------------------------------------------- 5.1


@pytest.mark.parametrize("mode", ["auto", "steer", "queue", "interrupt"])
def test_no_active_run_starts_a_run_whatever_the_mode(mode: str) -> None:
    m = new_machine()
    routed = m.message(frame("hi there", mode, metadata={"k": [1]}), "alice", 7)
    assert not isinstance(routed, Refusal)
    event, route = routed
    assert route is Route.RUN
    fx = m.take_effects()
    run = m.active
    assert run is not None
    assert run.kind is RunKind.RUN
    assert (run.status, run.started_at, run.created_at) == (RunStatus.RUNNING, 7, 7)
    assert run.triggers == [UserText(event.message_id, "hi there", "alice", 7)]
    assert wire(fx) == [
        {
            "type": "user.message",
            "offset": 0,
            "ts": 7,
            "conversation_id": CID,
            "run_id": run.run_id,
            "message_id": event.message_id,
            "client_msg_id": "k1",
            "text": "hi there",
            "route": "run",
            "author": "alice",
            "metadata": {"k": [1]},
        },
        {
            "type": "run.started",
            "offset": 0,
            "ts": 7,
            "conversation_id": CID,
            "run_id": run.run_id,
            "runner": "echo",
            "trigger_message_ids": [event.message_id],
        },
    ]
    assert fx.start == [run]
    assert fx.stop == []
    assert fx.runs == {run.run_id: run}
    assert fx.turns == [Turn("user", "hi there", event.message_id, run.run_id, 7)]
    assert m.runner == "echo"
    assert m.take_effects() == Effects()  # taken once


def test_user_message_without_metadata_omits_it() -> None:
    m = new_machine()
    send(m)
    assert "metadata" not in wire(m.take_effects())[0]


# --------------------------------------------------------------------------- 5.2


@pytest.mark.parametrize("mode", ["auto", "steer"])
def test_steering_into_a_steerable_run(mode: str) -> None:
    m, run_id = running()
    m.take_effects()
    routed = m.message(frame("turn left", mode, key="k2"), "bob", 3)
    assert not isinstance(routed, Refusal)
    event, route = routed
    assert route is Route.STEER
    assert (event.run_id, event.route) == (run_id, "steer")
    fx = m.take_effects()
    assert types(fx) == ["user.message"]
    assert fx.start == []
    assert fx.steering == Counter(queued=1)
    assert m.active is not None
    assert list(m.active.steering) == [UserText(event.message_id, "turn left", "bob", 3)]
    assert m.active.counts.queued == 1
    assert fx.runs == {run_id: m.active}


def test_pull_absorbs_steering() -> None:
    m, run_id = running()
    ids = [send(m, f"s{n}", key=f"s{n}").message_id for n in range(3)]
    m.take_effects()
    one = m.pull(run_id, "one", 100, 9)
    assert [t.message_id for t in one] == ids[:1]
    fx = m.take_effects()
    assert wire(fx) == [
        {
            "type": "steering.absorbed",
            "offset": 0,
            "ts": 9,
            "conversation_id": CID,
            "run_id": run_id,
            "message_ids": ids[:1],
        }
    ]
    assert fx.steering == Counter(absorbed=1)
    rest = m.pull(run_id, "all", 100, 10)
    assert [(t.message_id, t.text) for t in rest] == [(ids[1], "s1"), (ids[2], "s2")]
    assert m.active is not None
    assert (m.active.counts.queued, m.active.counts.absorbed) == (0, 3)
    # nothing waiting: nothing appended
    m.take_effects()
    assert m.pull(run_id, "all", 100, 11) == []
    assert m.take_effects() == Effects()


@pytest.mark.parametrize(("mode", "limit", "taken"), [("all", 2, 2), ("all", 0, 1), ("one", 5, 1)])
def test_pull_limits(mode: str, limit: int, taken: int) -> None:
    m = new_machine()
    send(m)
    for n in range(4):
        send(m, f"s{n}", key=f"s{n}")
    assert len(m.pull(active_id(m), mode, limit, 2)) == taken
    assert m.active is not None
    assert len(m.active.steering) == 4 - taken


def test_pull_at_most_100_at_once() -> None:
    m = new_machine()
    send(m)
    for n in range(100):
        send(m, "s", key=f"s{n}")
    assert len(m.pull(active_id(m), "all", 500, 2)) == 100


def test_pull_for_a_run_that_is_not_active_is_empty() -> None:
    m = new_machine()
    send(m)
    send(m, "steer", key="k2")
    m.take_effects()
    assert m.pull("run_other", "all", 100, 2) == []
    assert m.take_effects() == Effects()
    assert m.active is not None
    assert len(m.active.steering) == 1


def test_auto_into_a_runner_that_cannot_steer_is_queued() -> None:
    m, first = running("mute")
    m.take_effects()
    event = send(m, "later", key="k2", now=5)
    assert event.route == "queue"
    assert event.run_id != first
    fx = m.take_effects()
    assert wire(fx)[1] == {
        "type": "run.queued",
        "offset": 0,
        "ts": 5,
        "conversation_id": CID,
        "run_id": event.run_id,
        "runner": "mute",
        "trigger_message_ids": [event.message_id],
        "position": 1,
    }
    assert types(fx) == ["user.message", "run.queued"]
    assert fx.start == []
    assert m.queued_user_runs == 1
    assert m.live_run(event.run_id) is m.queue[0]
    assert m.queue[0].status is RunStatus.QUEUED


def test_steer_into_a_runner_that_cannot_steer_is_refused() -> None:
    m = new_machine("mute")
    send(m)
    m.take_effects()
    refusal = m.message(frame("x", "steer", key="k2"), "alice", 2)
    assert refusal == Refusal(ErrorCode.RUNNER_UNAVAILABLE, "the active run's runner cannot steer")
    assert m.take_effects() == Effects()


def test_the_steering_queue_holds_100() -> None:
    m = new_machine()
    send(m)
    for n in range(100):
        assert send(m, "s", "steer", key=f"s{n}").route == "steer"
    m.take_effects()
    refusal = m.message(frame("x", "steer", key="k2"), "alice", 2)
    assert isinstance(refusal, Refusal)
    assert refusal.code is ErrorCode.QUEUE_FULL
    assert m.take_effects() == Effects()
    # auto falls back to a queued run
    assert send(m, "x", "auto", key="k3").route == "queue"
    assert m.active is not None
    assert len(m.active.steering) == 100
    # a pull makes room again
    m.pull(active_id(m), "one", 1, 3)
    assert send(m, "y", "steer", key="k4").route == "steer"


# --------------------------------------------------------------------------- 5.3


def test_at_most_16_queued_runs() -> None:
    m = new_machine()
    send(m)
    m.take_effects()
    positions = []
    for n in range(16):
        send(m, f"q{n}", "queue", key=f"q{n}")
        positions.append(m.take_effects().events[1].position)  # type: ignore[attr-defined]
    assert positions == list(range(1, 17))
    refusal = m.message(frame("x", "queue", key="k2"), "alice", 2)
    assert refusal == Refusal(ErrorCode.QUEUE_FULL, "16 runs are already queued")
    assert m.take_effects() == Effects()
    assert m.queued_user_runs == 16
    # interrupt is never refused and leaves the queue alone
    assert send(m, "now", "interrupt", key="k3").route == "interrupt"
    assert m.queued_user_runs == 16


def test_auto_on_a_full_queue_of_a_mute_runner_is_refused() -> None:
    m = new_machine("mute")
    send(m)
    for n in range(16):
        send(m, f"q{n}", key=f"q{n}")
    m.take_effects()
    refusal = m.message(frame("x", key="k2"), "alice", 2)
    assert isinstance(refusal, Refusal)
    assert refusal.code is ErrorCode.QUEUE_FULL
    assert m.take_effects() == Effects()


def test_queued_runs_start_in_order_when_the_active_run_ends() -> None:
    m, first = running()
    q1 = send(m, "one", "queue", key="q1")
    q2 = send(m, "two", "queue", key="q2")
    m.take_effects()
    m.result(first, done(), 10)
    fx = m.take_effects()
    assert [(e.type, e.run_id) for e in fx.events] == [
        ("run.ended", first),
        ("run.started", q1.run_id),
        ("queue.updated", None),  # q2 moved up
    ]
    assert fx.events[1].trigger_message_ids == [q1.message_id]  # type: ignore[attr-defined]
    assert fx.events[2].wire() == {
        "type": "queue.updated",
        "offset": 0,
        "ts": 10,
        "conversation_id": CID,
        "runs": [{"run_id": q2.run_id, "position": 1}],
    }
    assert fx.start == [m.active]
    assert fx.stop == [first]
    assert m.active is not None
    assert (m.active.run_id, m.active.kind, m.active.started_at) == (q1.run_id, RunKind.QUEUE, 10)
    m.runner_finished(q1.run_id, None, 11)
    assert active_id(m) == q2.run_id
    assert types(m.take_effects()) == ["run.ended", "run.started"]  # nobody left to move
    m.runner_finished(q2.run_id, None, 12)
    assert m.idle


def test_interrupt_cancels_the_active_run_and_starts_at_once() -> None:
    m, first = running()
    steer = send(m, "steer", key="s1")
    queued = send(m, "queued", "queue", key="q1")
    m.take_effects()
    event = send(m, "stop that", "interrupt", key="i1", now=20)
    assert event.route == "interrupt"
    fx = m.take_effects()
    assert [(e.type, e.run_id) for e in fx.events] == [
        ("user.message", event.run_id),
        ("steering.dropped", first),
        ("run.ended", first),
        ("run.started", event.run_id),
    ]
    assert fx.events[1].wire()["message_ids"] == [steer.message_id]
    assert fx.events[1].wire()["reason"] == "cancelled"
    ended = fx.events[2].wire()
    assert (ended["status"], ended["reason"], ended["usage"]) == ("cancelled", "interrupted", None)
    assert "error" not in ended
    assert fx.events[3].wire()["trigger_message_ids"] == [event.message_id]
    assert fx.steering == Counter(dropped=1)
    assert fx.stop == [first]
    assert m.active is not None
    assert (m.active.run_id, m.active.kind) == (event.run_id, RunKind.INTERRUPT)
    # the queued run stays queued and starts after the interrupting one
    assert [r.run_id for r in m.queue] == [queued.run_id]
    m.runner_finished(event.run_id, None, 21)
    assert active_id(m) == queued.run_id


# --------------------------------------------------------------------------- cancel


def test_cancel_the_active_run_drops_its_steering_and_starts_the_next() -> None:
    m, first = running()
    steer = send(m, "steer", key="s1")
    queued = send(m, "queued", "queue", key="q1")
    m.take_effects()
    assert m.cancel(None, 30) is True
    fx = m.take_effects()
    assert [(e.type, e.run_id) for e in fx.events] == [
        ("steering.dropped", first),
        ("run.ended", first),
        ("run.started", queued.run_id),
    ]
    assert fx.events[0].wire()["message_ids"] == [steer.message_id]
    assert fx.events[0].wire()["reason"] == "cancelled"
    assert fx.events[1].wire()["reason"] == "cancel_requested"
    assert fx.runs[first].status is RunStatus.CANCELLED
    assert fx.runs[first].counts.dropped == 1


def test_cancel_by_id() -> None:
    m, first = running()
    m.take_effects()
    assert m.cancel(first, 2) is True
    assert [e.type for e in m.take_effects().events] == ["run.ended"]
    assert m.idle
    # ended: nothing to cancel any more
    assert m.cancel(first, 3) is False
    assert m.cancel(None, 3) is False
    assert m.cancel("run_unknown", 3) is False
    assert m.take_effects() == Effects()


def test_cancel_a_queued_run_ends_it_without_start() -> None:
    m, first = running()
    q1 = send(m, "one", "queue", key="q1")
    q2 = send(m, "two", "queue", key="q2")
    m.take_effects()
    assert m.cancel(q1.run_id, 5) is True
    fx = m.take_effects()
    assert [(e.type, e.run_id) for e in fx.events] == [
        ("run.ended", q1.run_id),
        ("queue.updated", None),
    ]
    assert fx.events[0].wire()["status"] == "cancelled"
    assert fx.events[1].wire()["runs"] == [{"run_id": q2.run_id, "position": 1}]
    cancelled = fx.runs[q1.run_id]
    assert (cancelled.status, cancelled.started_at, cancelled.ended_at) == (
        RunStatus.CANCELLED,
        None,
        5,
    )
    assert fx.stop == [q1.run_id]
    assert fx.start == []
    assert active_id(m) == first
    assert [r.run_id for r in m.queue] == [q2.run_id]
    m.runner_finished(first, None, 6)
    assert active_id(m) == q2.run_id


def positions(fx: Effects) -> list[list[tuple[str, int]]]:
    """The `queue.updated` events of a step, as (run_id, position) lists."""
    return [
        [(r["run_id"], r["position"]) for r in e.wire()["runs"]]
        for e in fx.events
        if e.type == "queue.updated"
    ]


def test_queue_updated_only_when_a_queued_run_moves() -> None:
    """Issue 11, item 6: every still-queued run in order, whenever one's position changed."""
    m, _ = running()
    q = [send(m, f"q{n}", "queue", key=f"q{n}").run_id for n in range(4)]
    assert positions(m.take_effects()) == []  # joining the end: run.queued says it
    m.cancel(q[3], 2)  # the last one leaves: nobody moves
    assert positions(m.take_effects()) == []
    m.cancel(q[1], 3)  # q2 moves up to 2
    assert positions(m.take_effects()) == [[(q[0], 1), (q[2], 2)]]
    send(m, "steer", key="s1")
    send(m, "now", "interrupt", key="i1", now=4)  # starts at once: the queue stays
    fx = m.take_effects()
    assert positions(fx) == []
    assert "queue.updated" not in types(fx)
    send(m, "later", "queue", key="q9", now=5)
    assert m.take_effects().events[-1].wire()["position"] == 3
    m.runner_finished(active_id(m), None, 6)  # q0 starts: q2 and q9 move up
    fx = m.take_effects()
    assert types(fx) == ["run.ended", "run.started", "queue.updated"]
    assert positions(fx) == [[(q[2], 1), (m.queue[1].run_id, 2)]]


def test_queue_updated_comes_after_the_run_ended_of_a_cancelled_run() -> None:
    """It names no run that has ended: the cancelled run is gone from it."""
    m, _ = running()
    q1 = send(m, "one", "queue", key="q1").run_id
    q2 = send(m, "two", "queue", key="q2").run_id
    m.take_effects()
    m.cancel(q1, 2)
    m.cancel(q2, 2)
    fx = m.take_effects()  # one batch, two cancels: each move is announced in order
    assert [(e.type, e.run_id) for e in fx.events] == [
        ("run.ended", q1),
        ("queue.updated", None),
        ("run.ended", q2),
    ]
    assert positions(fx) == [[(q2, 1)]]
    assert m.queue == deque()


def test_recovery_announces_the_queue_it_takes_over() -> None:
    m = new_machine()
    queued = [
        Run(f"run_q{n}", CID, "echo", RunKind.QUEUE, [UserText(f"msg_{n}", "t", "a", 1)], 1)
        for n in range(3)
    ]
    interrupted = Run("run_a", CID, "echo", RunKind.RUN, [], 1, status=RunStatus.RUNNING)
    m.restore(Recovered(interrupted=[interrupted], queue=queued), 9)
    fx = m.take_effects()
    assert types(fx) == ["run.ended", "run.started", "queue.updated"]
    assert positions(fx) == [[("run_q1", 1), ("run_q2", 2)]]
    # a recovered queue whose first run cannot start yet (a follow-up goes first) is
    # announced as it stands: this gateway does not know what the last one said
    m = new_machine()
    queued = queued[1:]
    interrupted = Run("run_b", CID, "echo", RunKind.RUN, [], 1, status=RunStatus.RUNNING)
    interrupted.add_steering(UserText("msg_s", "s", "a", 1))
    m.restore(Recovered(interrupted=[interrupted], queue=queued), 9)
    fx = m.take_effects()
    assert types(fx) == ["run.ended", "run.started", "queue.updated"]
    assert positions(fx) == [[("run_q1", 1), ("run_q2", 2)]]


# --------------------------------------------------------------------------- 5.4


@pytest.mark.parametrize(
    ("how", "status", "reason"),
    [
        ("completed", "completed", "stop"),
        ("finished", "completed", "completed"),
        ("failed", "failed", "boom"),
        ("raised", "failed", "runner_error"),
        ("deadline", "timeout", "deadline"),
        ("idle", "timeout", "idle"),
    ],
)
def test_leftover_steering_becomes_a_follow_up_ahead_of_queued_runs(
    how: str, status: str, reason: str
) -> None:
    m, first = running()
    s1 = send(m, "left", key="s1")
    s2 = send(m, "right", key="s2")
    queued = send(m, "queued", "queue", key="q1")
    m.take_effects()
    if how == "completed":
        m.result(first, done("stop"), 40)
    elif how == "finished":
        m.runner_finished(first, None, 40)
    elif how == "failed":
        m.result(
            first,
            Result("run.failed", RunFailedData(error="e", code="boom", retryable=True), 1),
            40,
        )
    elif how == "raised":
        m.runner_finished(first, RunError(code="runner_error", message="x", retryable=False), 40)
    else:
        m.timeout(first, how, 40)  # type: ignore[arg-type]
    fx = m.take_effects()
    assert [(e.type, e.run_id) for e in fx.events][:1] == [("run.ended", first)]
    assert types(fx) == ["run.ended", "run.started"]
    ended = fx.events[0].wire()
    assert (ended["status"], ended["reason"]) == (status, reason)
    follow = m.active
    assert follow is not None
    assert follow.kind is RunKind.FOLLOW_UP
    assert follow.run_id not in (first, queued.run_id)
    assert fx.events[1].wire() == {
        "type": "run.started",
        "offset": 0,
        "ts": 40,
        "conversation_id": CID,
        "run_id": follow.run_id,
        "runner": "echo",
        "trigger_message_ids": [s1.message_id, s2.message_id],
    }
    assert [t.text for t in follow.triggers] == ["left", "right"]
    assert fx.steering == Counter(follow_up=2)
    assert fx.runs[first].counts.dropped == 0
    # the user-queued run still waits and comes next
    assert [r.run_id for r in m.queue] == [queued.run_id]
    m.runner_finished(follow.run_id, None, 41)
    assert active_id(m) == queued.run_id


def test_leftover_steering_of_a_drop_runner_is_dropped_before_run_ended() -> None:
    m, first = running("dropper")
    s1 = send(m, "left", key="s1")
    queued = send(m, "queued", "queue", key="q1")
    m.take_effects()
    m.result(first, done(), 50)
    fx = m.take_effects()
    assert [(e.type, e.run_id) for e in fx.events] == [
        ("steering.dropped", first),
        ("run.ended", first),
        ("run.started", queued.run_id),
    ]
    assert fx.events[0].wire() == {
        "type": "steering.dropped",
        "offset": 0,
        "ts": 50,
        "conversation_id": CID,
        "run_id": first,
        "message_ids": [s1.message_id],
        "reason": "run_ended",
    }
    assert fx.steering == Counter(dropped=1)


def test_a_cancelled_drop_runner_drops_with_reason_cancelled() -> None:
    m = new_machine("dropper")
    send(m)
    send(m, "left", key="s1")
    m.take_effects()
    m.cancel(None, 2)
    assert m.take_effects().events[0].wire()["reason"] == "cancelled"


# --------------------------------------------------------------------------- results


def test_results_become_events() -> None:
    m, rid = running()
    m.take_effects()
    m.result(rid, delta("echo:"), 2)
    m.result(rid, delta(" hi"), 3)
    m.result(
        rid,
        Result("message.completed", CompletedData(message=AssistantMessage(content="echo: hi")), 3),
        4,
    )
    m.result(rid, delta("again", usage={"tokens": 5}), 5)
    m.result(
        rid,
        Result(
            "tool.call.started", ToolStartedData(tool_call_id="t1", name="f", arguments={"a": 1}), 5
        ),
        6,
    )
    m.result(
        rid,
        Result(
            "tool.call.completed", ToolCompletedData(tool_call_id="t1", name="f", result=[2]), 6
        ),
        7,
    )
    m.result(
        rid,
        Result(
            "tool.call.completed", ToolCompletedData(tool_call_id="t2", name="g", error="no"), 7
        ),
        8,
    )
    m.result(
        rid, Result("state.updated", StateData(scope="actor", key="mood", value={"x": 1}), 8), 9
    )
    m.result(rid, done("length", "final"), 10)
    fx = m.take_effects()
    events = wire(fx)
    for e in events:
        assert (e["conversation_id"], e["run_id"], e["offset"]) == (CID, rid, 0)
    first_msg = events[0]["message_id"]
    second_msg = events[3]["message_id"]
    assert first_msg != second_msg
    assert [
        {k: v for k, v in e.items() if k not in ("conversation_id", "run_id", "offset")}
        for e in events
    ] == [
        {"type": "message.delta", "ts": 2, "message_id": first_msg, "delta": "echo:"},
        {"type": "message.delta", "ts": 3, "message_id": first_msg, "delta": " hi"},
        {
            "type": "message.completed",
            "ts": 4,
            "message_id": first_msg,
            "message": {"role": "assistant", "content": "echo: hi"},
        },
        {"type": "message.delta", "ts": 5, "message_id": second_msg, "delta": "again"},
        {
            "type": "tool.call.started",
            "ts": 6,
            "tool_call_id": "t1",
            "name": "f",
            "arguments": {"a": 1},
        },
        {"type": "tool.call.completed", "ts": 7, "tool_call_id": "t1", "name": "f", "result": [2]},
        {"type": "tool.call.completed", "ts": 8, "tool_call_id": "t2", "name": "g", "error": "no"},
        {"type": "state.updated", "ts": 9, "scope": "actor", "key": "mood", "value": {"x": 1}},
        {
            "type": "message.completed",
            "ts": 10,
            "message_id": second_msg,
            "message": {"role": "assistant", "content": "final"},
        },
        {
            "type": "run.ended",
            "ts": 10,
            "status": "completed",
            "reason": "length",
            "usage": {"tokens": 5},
        },
    ]
    assert [(t.role, t.content, t.message_id) for t in fx.turns] == [
        ("assistant", "echo: hi", first_msg),
        ("assistant", "final", second_msg),
    ]
    assert fx.runs[rid].usage == {"tokens": 5}
    assert fx.stop == [rid]
    assert m.idle


def test_run_failed_carries_the_error() -> None:
    m, rid = running()
    m.take_effects()
    m.result(
        rid,
        Result("run.failed", RunFailedData(error="bad", code="demo_failure", retryable=False), 1),
        3,
    )
    fx = m.take_effects()
    ended = fx.events[0].wire()
    assert (ended["status"], ended["reason"], ended["error"]) == (
        "failed",
        "demo_failure",
        {"code": "demo_failure", "message": "bad", "retryable": False},
    )
    run = fx.runs[rid]
    assert run.error == RunError(code="demo_failure", message="bad", retryable=False)


def test_a_run_completed_with_no_finish_reason_text_says_completed() -> None:
    m, rid = running()
    m.take_effects()
    m.result(rid, done(""), 3)
    assert m.take_effects().events[0].wire()["reason"] == "completed"


def test_inputs_for_ended_or_unknown_runs_change_nothing() -> None:
    m, first = running()
    queued = send(m, "q", "queue", key="q1")
    m.result(first, done(), 2)
    m.take_effects()
    for run_id in (first, "run_unknown"):
        m.result(run_id, delta("late"), 3)
        m.result(run_id, done(), 3)
        m.timeout(run_id, "deadline", 3)
        m.runner_finished(run_id, None, 3)
        m.runner_finished(run_id, RunError(code="x", message="y", retryable=True), 3)
        assert m.pull(run_id, "all", 100, 3) == []
    assert m.take_effects() == Effects()
    assert active_id(m) == queued.run_id
    assert m.active is not None
    assert m.active.status is RunStatus.RUNNING


def test_results_for_a_queued_run_are_ignored() -> None:
    m = new_machine()
    send(m)
    queued = send(m, "q", "queue", key="q1")
    m.take_effects()
    m.result(queued.run_id, done(), 2)
    m.timeout(queued.run_id, "idle", 2)
    m.runner_finished(queued.run_id, None, 2)
    assert m.take_effects() == Effects()
    assert m.queue[0].status is RunStatus.QUEUED


# --------------------------------------------------------------------------- runner choice


def test_the_first_message_fixes_the_runner() -> None:
    m = new_machine()
    send(m, runner="mute")
    assert m.runner == "mute"
    assert m.active is not None
    assert m.active.runner == "mute"
    # later runner fields are ignored: still mute (cannot steer, so auto queues)
    event = send(m, "x", key="k2", runner="echo")
    assert event.route == "queue"
    assert m.queue[0].runner == "mute"


def test_an_unknown_runner_is_refused_and_records_nothing() -> None:
    m = new_machine()
    refusal = m.message(frame(runner="ghost"), "alice", 1)
    assert refusal == Refusal(ErrorCode.RUNNER_UNAVAILABLE, "no runner named 'ghost'")
    assert m.take_effects() == Effects()
    assert (m.runner, m.active) == (None, None)
    assert send(m).route == "run"
    assert m.runner == "echo"


def test_an_unknown_default_runner_is_refused() -> None:
    m = new_machine("nobody")
    refusal = m.message(frame(), "alice", 1)
    assert isinstance(refusal, Refusal)
    assert refusal.code is ErrorCode.RUNNER_UNAVAILABLE
    assert m.idle


def test_a_conversation_created_with_a_runner_keeps_it() -> None:
    m = new_machine(runner="dropper")
    send(m, runner="echo")
    assert m.active is not None
    assert m.active.runner == "dropper"


# --------------------------------------------------------------------------- any interleaving

TARGETS = ("active", "active", "active", "queued", "ended", "unknown", "none")  # mostly live
RESULT_KINDS = ("delta", "completed", "tool", "state", "done", "done_msg", "failed")


def make_result(kind: str) -> Result:
    if kind == "delta":
        return delta("d", usage={"n": 1})
    if kind == "completed":
        return Result("message.completed", CompletedData(message=AssistantMessage(content="c")), 1)
    if kind == "tool":
        return Result("tool.call.started", ToolStartedData(tool_call_id="t", name="n"), 1)
    if kind == "state":
        return Result("state.updated", StateData(scope="runner", key="k", value=1), 1)
    if kind == "done":
        return done()
    if kind == "done_msg":
        return done("stop", "all")
    return Result("run.failed", RunFailedData(error="e", code="oops", retryable=False), 1)


target = st.tuples(st.sampled_from(TARGETS), st.integers(0, 50))
op = st.one_of(
    st.tuples(st.just("message"), st.sampled_from(["auto", "steer", "queue", "interrupt"])),
    st.tuples(st.just("flood"), st.sampled_from(["auto", "steer", "queue"]), st.integers(1, 60)),
    st.tuples(st.just("cancel"), target),
    st.tuples(st.just("result"), target, st.sampled_from(RESULT_KINDS)),
    st.tuples(st.just("pull"), target, st.sampled_from(["all", "one"]), st.integers(0, 150)),
    st.tuples(st.just("timeout"), target, st.sampled_from(["deadline", "idle"])),
    st.tuples(st.just("finished"), target, st.booleans()),
)


@dataclass
class Checker:
    """Follows the event log and the machine; fails at the first broken rule."""

    m: ConversationMachine
    spec: RunnerSpec
    log: list[Event] = field(default_factory=list)
    started: set[str] = field(default_factory=set)
    ended: dict[str, str] = field(default_factory=dict)  # run_id -> status
    queued_model: list[str] = field(default_factory=list)  # user-queued runs, in order
    told: dict[str, int] = field(default_factory=dict)  # queue positions clients last saw
    running: str | None = None  # the run started and not ended
    routed: dict[str, tuple[str, str]] = field(default_factory=dict)  # msg -> (route, run)
    steered: dict[str, list[str]] = field(default_factory=dict)  # run -> steering msgs
    absorbed: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)
    carried: Counter[str] = field(default_factory=Counter)  # into a follow-up run
    triggers: dict[str, list[str]] = field(default_factory=dict)  # run -> trigger msgs
    runs: dict[str, Run] = field(default_factory=dict)
    terminal: dict[str, RunStatus] = field(default_factory=dict)

    def leftover(self, run_id: str) -> list[str]:
        """Steering routed to `run_id` that is neither absorbed, dropped nor carried over."""
        done = self.absorbed + self.dropped + self.carried
        return [i for i in self.steered.get(run_id, []) if not done[i]]

    def step(self, now: int) -> Effects:
        fx = self.m.take_effects()
        base = len(self.log)
        self.log.extend(fx.events)
        for index in range(base, len(self.log)):
            self.event(index, now)
        for run in fx.runs.values():
            self.runs[run.run_id] = run
        for run in fx.start:
            assert run.status is RunStatus.RUNNING
            assert run.run_id in self.started
        for run_id in fx.stop:
            assert run_id in self.ended
        self.state()
        return fx

    def event(self, index: int, now: int) -> None:
        e = self.log[index]
        w = e.wire()
        rid = e.run_id
        assert e.conversation_id == CID
        assert e.ts == now
        if e.type == "queue.updated":
            assert rid is None, "it concerns several runs"
            runs = [(r["run_id"], r["position"]) for r in w["runs"]]
            assert runs == [(r, n) for n, r in enumerate(self.queued_model, 1)], "all, in order"
            assert any(self.told.get(r) != n for r, n in runs), "only when one moved"
            self.told = dict(runs)
            observe("queue.updated")
            return
        assert rid is not None
        assert rid not in self.ended, f"{e.type} of {rid} after its run.ended"
        if e.type == "user.message":
            mid = w["message_id"]
            assert mid not in self.routed
            self.routed[mid] = (w["route"], rid)
            if w["route"] == "steer":
                assert rid == self.running
                self.steered.setdefault(rid, []).append(mid)
            else:
                assert rid not in self.started
                assert rid not in self.triggers
                nxt = self.log[index + 1 :]
                kind = "run.queued" if w["route"] == "queue" else "run.started"
                mine = [x for x in nxt if x.run_id == rid]
                assert mine, "a routed run appears in the same step"
                assert mine[0].type == kind
                assert mine[0].wire()["trigger_message_ids"] == [mid]
                if w["route"] == "run":
                    assert self.running is None
                if w["route"] == "interrupt":
                    assert self.running is not None
        elif e.type == "run.queued":
            assert rid not in self.triggers
            self.triggers[rid] = w["trigger_message_ids"]
            self.queued_model.append(rid)
            assert w["position"] == len(self.queued_model)
            self.told[rid] = w["position"]
            assert len(self.queued_model) <= 16
            assert w["runner"] == self.spec.name
        elif e.type == "run.started":
            assert rid not in self.started, "a second run.started"
            assert self.running is None, "two runs active at once"
            assert w["runner"] == self.spec.name
            if rid in self.queued_model:
                assert self.queued_model[0] == rid, "queued runs start in order"
                self.queued_model.pop(0)
                assert w["trigger_message_ids"] == self.triggers[rid]
            else:
                assert rid not in self.triggers
                self.triggers[rid] = w["trigger_message_ids"]
            self.started.add(rid)
            self.running = rid
        elif e.type == "steering.absorbed":
            assert rid == self.running
            ids = w["message_ids"]
            assert ids == self.leftover(rid)[: len(ids)], "absorbed in order"
            self.absorbed.update(ids)
        elif e.type == "steering.dropped":
            assert index + 1 < len(self.log), "steering.dropped is followed by its run.ended"
            assert self.log[index + 1].type == "run.ended"
            assert self.log[index + 1].run_id == rid
            assert w["message_ids"] == self.leftover(rid)
            cancelled = self.log[index + 1].wire()["status"] == "cancelled"
            assert w["reason"] == ("cancelled" if cancelled else "run_ended")
            self.dropped.update(w["message_ids"])
            observe(f"steering dropped: {w['reason']}")
        elif e.type == "run.ended":
            status = w["status"]
            left = self.leftover(rid)
            dropped_before = index > 0 and self.log[index - 1].type == "steering.dropped"
            dropped_before = dropped_before and self.log[index - 1].run_id == rid
            if rid == self.running:
                self.running = None
                drops = status == "cancelled" or self.spec.leftover_steering == "drop"
                if dropped_before:
                    assert drops
                if left:  # neither dropped nor absorbed: a follow-up
                    assert not drops
                    assert index + 1 < len(self.log), "a follow-up starts in the same step"
                    follow = self.log[index + 1]
                    assert follow.type == "run.started"
                    assert follow.wire()["trigger_message_ids"] == left
                    assert follow.run_id not in self.triggers
                    self.carried.update(left)
                    observe("follow-up run")
            else:
                assert rid in self.queued_model, "only a queued run ends without running"
                assert status == "cancelled"
                self.queued_model.remove(rid)
            assert (status == "failed") == ("error" in w)
            self.ended[rid] = status
        else:
            assert rid == self.running, f"{e.type} outside the active run"

    def state(self) -> None:
        m = self.m
        active = m.active
        assert (active.run_id if active else None) == self.running
        assert [r.run_id for r in m.queue] == self.queued_model
        # issue 11: after every step, clients know each queued run's position
        told = [self.told.get(rid) for rid in self.queued_model]
        assert told == list(range(1, len(self.queued_model) + 1)), "a stale queue position"
        if active is None:
            assert not m.queue, "runs wait while nothing runs"
        else:
            assert active.status is RunStatus.RUNNING
            assert len(active.steering) <= 100
            assert active.counts.queued == len(active.steering)
            assert [t.message_id for t in active.steering] == self.leftover(active.run_id)
        assert m.queued_user_runs <= 16
        for run in m.queue:
            assert run.status is RunStatus.QUEUED
            assert run.kind is RunKind.QUEUE
        for run_id, run in self.runs.items():
            if run.status.terminal:
                assert self.terminal.setdefault(run_id, run.status) is run.status
                assert self.ended[run_id] == run.status.value
            else:
                assert run_id not in self.terminal, "a terminal status changed"
                assert run_id not in self.ended
        # no user message is lost, none is used twice
        waiting = Counter(t.message_id for t in active.steering) if active else Counter()
        in_runs = Counter(i for ids in self.triggers.values() for i in ids)
        for mid in self.routed:
            fates = in_runs[mid] + self.absorbed[mid] + self.dropped[mid] + waiting[mid]
            assert fates == 1, (mid, in_runs[mid], self.absorbed[mid], self.dropped[mid])
        assert set(in_runs) | set(self.absorbed) | set(self.dropped) | set(waiting) <= set(
            self.routed
        )


def resolve(m: ConversationMachine, chk: Checker, which: tuple[str, int]) -> str | None:
    kind, n = which
    if kind == "active" and m.active is not None:
        return m.active.run_id
    if kind == "queued" and m.queue:
        return m.queue[n % len(m.queue)].run_id
    if kind == "ended" and chk.ended:
        return sorted(chk.ended)[n % len(chk.ended)]
    if kind == "none":
        return None
    return "run_unknown"


@settings(max_examples=200, deadline=None)
@given(
    runner=st.sampled_from(sorted(SPECS)),
    ops=st.lists(op, min_size=5, max_size=40),
)
def test_any_interleaving_keeps_the_invariants(runner: str, ops: list[tuple[Any, ...]]) -> None:
    m = new_machine(default="echo")
    chk = Checker(m, SPECS[runner])
    keys = 0
    now = 0

    def message(mode: str) -> None:
        nonlocal keys
        keys += 1
        before_active = m.active.run_id if m.active else None
        routed = m.message(frame("w", mode, key=f"k{keys}", runner=runner), "alice", now)
        if isinstance(routed, Refusal):
            assert routed.code in (ErrorCode.QUEUE_FULL, ErrorCode.RUNNER_UNAVAILABLE)
            observe(f"refused {mode} {routed.code.value}")
            assert chk.step(now) == Effects()
            return
        event, route = routed
        assert event.route == route.value
        if route is Route.STEER:
            assert event.run_id == before_active
        chk.step(now)

    for item in ops:
        now += 1
        name = item[0]
        if name == "message":
            message(item[1])
        elif name == "flood":
            for _ in range(item[2]):
                message(item[1])
        elif name == "cancel":
            run_id = resolve(m, chk, item[1])
            live = m.active is not None if run_id is None else m.live_run(run_id) is not None
            assert m.cancel(run_id, now) is live
            fx = chk.step(now)
            assert bool(fx.events) is live
            if live:
                assert any(
                    e.type == "run.ended" and e.wire()["status"] == "cancelled" for e in fx.events
                )
        elif name == "result":
            run_id = resolve(m, chk, item[1]) or "run_unknown"
            is_active = m.active is not None and m.active.run_id == run_id
            m.result(run_id, make_result(item[2]), now)
            assert bool(chk.step(now).events) is is_active
        elif name == "pull":
            run_id = resolve(m, chk, item[1]) or "run_unknown"
            waiting = (
                len(m.active.steering) if m.active is not None and m.active.run_id == run_id else 0
            )
            limit = 1 if item[2] == "one" else max(1, min(item[3], 100))
            taken = m.pull(run_id, item[2], item[3], now)
            assert len(taken) == min(waiting, limit)
            fx = chk.step(now)
            if taken:
                assert [e.wire()["message_ids"] for e in fx.events] == [
                    [t.message_id for t in taken]
                ]
            else:
                assert fx == Effects()
        elif name == "timeout":
            run_id = resolve(m, chk, item[1]) or "run_unknown"
            is_active = m.active is not None and m.active.run_id == run_id
            m.timeout(run_id, item[2], now)
            fx = chk.step(now)
            assert bool(fx.events) is is_active
            if is_active:
                assert chk.ended[run_id] == "timeout"
        else:
            run_id = resolve(m, chk, item[1]) or "run_unknown"
            is_active = m.active is not None and m.active.run_id == run_id
            error = RunError(code="runner_error", message="x", retryable=False) if item[2] else None
            m.runner_finished(run_id, error, now)
            fx = chk.step(now)
            assert bool(fx.events) is is_active
            if is_active:
                assert chk.ended[run_id] == ("failed" if error else "completed")

    # every run that ended has exactly one run.ended, every started run one run.started
    ends = Counter(e.run_id for e in chk.log if e.type == "run.ended")
    starts = Counter(e.run_id for e in chk.log if e.type == "run.started")
    assert all(n == 1 for n in ends.values())
    assert all(n == 1 for n in starts.values())
    assert set(ends) == {rid for rid, run in chk.runs.items() if run.status.terminal}
    assert m.active is None or m.active.run_id in set(starts) - set(ends)
