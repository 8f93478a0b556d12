"""The run state machine (PROTOCOL.md sections 4 and 8): plain objects, no I/O."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.runs import (
    InvalidTransition,
    Run,
    RunKind,
    RunStatus,
    SteeringCounts,
    UserText,
)
from gateway.protocol.frames import RunError

TERMINAL = (RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED, RunStatus.TIMEOUT)


def make_run(**fields: object) -> Run:
    base: dict[str, object] = {
        "run_id": "run_1",
        "conversation_id": "c1",
        "runner": "echo",
        "kind": RunKind.RUN,
        "triggers": [UserText("msg_1", "hello", "alice", 5)],
        "created_at": 10,
    }
    base.update(fields)
    return Run(**base)  # type: ignore[arg-type]


def text(n: int) -> UserText:
    return UserText(f"msg_s{n}", f"steer {n}", "bob", 100 + n)


def test_status_values_and_terminality() -> None:
    assert [s.value for s in RunStatus] == [
        "queued",
        "running",
        "completed",
        "failed",
        "cancelled",
        "timeout",
    ]
    assert [s for s in RunStatus if s.terminal] == list(TERMINAL)


def test_a_new_run_is_queued() -> None:
    run = make_run()
    assert run.status is RunStatus.QUEUED
    assert (run.started_at, run.ended_at, run.reason, run.error, run.usage) == (
        None,
        None,
        None,
        None,
        None,
    )
    assert run.trigger_message_ids == ["msg_1"]
    assert run.counts == SteeringCounts(0, 0, 0)
    assert run.open_message_id is None


def test_start_then_end() -> None:
    run = make_run()
    run.start(20)
    assert (run.status, run.started_at) == (RunStatus.RUNNING, 20)
    run.end(RunStatus.COMPLETED, "stop", 30)
    assert (run.status, run.reason, run.ended_at, run.error) == (
        RunStatus.COMPLETED,
        "stop",
        30,
        None,
    )
    assert run.started_at == 20


def test_a_queued_run_may_end_without_starting() -> None:
    run = make_run(kind=RunKind.QUEUE)
    run.end(RunStatus.CANCELLED, "cancel_requested", 15)
    assert (run.status, run.reason, run.started_at, run.ended_at) == (
        RunStatus.CANCELLED,
        "cancel_requested",
        None,
        15,
    )
    with pytest.raises(InvalidTransition, match="start from cancelled"):
        run.start(16)
    assert run.started_at is None


def test_start_twice_is_refused() -> None:
    run = make_run()
    run.start(20)
    with pytest.raises(InvalidTransition, match="run_1: start from running"):
        run.start(21)
    assert run.started_at == 20


@pytest.mark.parametrize("status", [RunStatus.QUEUED, RunStatus.RUNNING])
def test_end_with_a_live_status_is_refused(status: RunStatus) -> None:
    run = make_run()
    run.start(20)
    with pytest.raises(InvalidTransition, match=f"end with {status.value}"):
        run.end(status, "x", 30)
    assert (run.status, run.ended_at, run.reason) == (RunStatus.RUNNING, None, None)


@pytest.mark.parametrize("first", TERMINAL)
@pytest.mark.parametrize("second", TERMINAL)
def test_a_terminal_status_never_changes(first: RunStatus, second: RunStatus) -> None:
    run = make_run()
    run.start(20)
    error = RunError(code="boom", message="it broke", retryable=True)
    run.end(first, "first", 30, error if first is RunStatus.FAILED else None)
    with pytest.raises(InvalidTransition, match=f"already {first.value}"):
        run.end(second, "second", 40)
    assert (run.status, run.reason, run.ended_at) == (first, "first", 30)
    assert run.error == (error if first is RunStatus.FAILED else None)


def test_steering_queue_counts() -> None:
    run = make_run()
    for n in range(5):
        run.add_steering(text(n))
    assert run.counts.queued == 5
    taken = run.take_steering(2)
    assert [m.message_id for m in taken] == ["msg_s0", "msg_s1"]
    assert run.counts.queued == 3
    assert run.take_steering(0) == []
    assert run.counts.queued == 3
    rest = run.take_steering(100)
    assert [m.message_id for m in rest] == ["msg_s2", "msg_s3", "msg_s4"]
    assert run.counts.queued == 0
    assert run.take_steering(3) == []
    assert len(run.steering) == 0


def test_document_is_section_8() -> None:
    run = make_run()
    run.start(20)
    run.add_steering(text(1))
    run.counts.absorbed = 2
    run.counts.dropped = 1
    run.usage = {"tokens": 7}
    error = RunError(code="runner_lost", message="gone", retryable=True)
    run.end(RunStatus.FAILED, "runner_lost", 30, error)
    assert run.document() == {
        "run_id": "run_1",
        "conversation_id": "c1",
        "runner": "echo",
        "status": "failed",
        "reason": "runner_lost",
        "error": {"code": "runner_lost", "message": "gone", "retryable": True},
        "trigger_message_ids": ["msg_1"],
        "created_at": 10,
        "started_at": 20,
        "ended_at": 30,
        "usage": {"tokens": 7},
        "steering": {"queued": 1, "absorbed": 2, "dropped": 1},
    }


def test_document_of_a_queued_run() -> None:
    run = make_run(
        kind=RunKind.QUEUE,
        triggers=[UserText("msg_a", "a", "x", 1), UserText("msg_b", "b", "x", 2)],
    )
    assert run.document() == {
        "run_id": "run_1",
        "conversation_id": "c1",
        "runner": "echo",
        "status": "queued",
        "reason": None,
        "error": None,
        "trigger_message_ids": ["msg_a", "msg_b"],
        "created_at": 10,
        "started_at": None,
        "ended_at": None,
        "usage": None,
        "steering": {"queued": 0, "absorbed": 0, "dropped": 0},
    }


# --------------------------------------------------------------------------- any sequence


def apply(run: Run, op: RunStatus | None, now: int) -> None:
    """None starts the run; a status ends it with that status."""
    if op is None:
        run.start(now)
    else:
        run.end(op, f"r{now}", now)


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(st.none() | st.sampled_from(list(RunStatus)), max_size=8))
def test_any_sequence_follows_the_state_machine(ops: list[RunStatus | None]) -> None:
    """A reference model: queued -> running -> terminal, or queued -> terminal; nothing else."""
    run = make_run()
    model = RunStatus.QUEUED
    for now, op in enumerate(ops, start=100):
        if op is None:
            allowed, target = model is RunStatus.QUEUED, RunStatus.RUNNING
        else:
            allowed, target = op.terminal and not model.terminal, op
        before = run.document()
        if allowed:
            apply(run, op, now)
            if op is None:
                assert run.started_at == now
            else:
                assert (run.reason, run.ended_at) == (f"r{now}", now)
            model = target
        else:
            with pytest.raises(InvalidTransition):
                apply(run, op, now)
            assert run.document() == before  # a refused transition changes nothing
        assert run.status is model
