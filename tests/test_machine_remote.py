"""The conversation machine with a remote runner (PROTOCOL.md section 10, issue 6): a run
it starts is active but stays `queued` until a runner takes it (`assigned`)."""

from __future__ import annotations

from gateway.core.conversation import ConversationMachine, RunnerSpec
from gateway.core.runs import RunStatus
from gateway.protocol.frames import RunError
from tests.test_machine import CID, SPECS, done, send, types

REMOTE = {**SPECS, "far": RunnerSpec("far", remote=True)}


def machine() -> ConversationMachine:
    return ConversationMachine(CID, REMOTE.get, "far")


def test_a_remote_run_waits_queued_and_starts_when_assigned() -> None:
    m = machine()
    event = send(m, "hi")
    fx = m.take_effects()
    assert types(fx) == ["user.message"]  # no run.started yet
    run = m.active
    assert run is not None
    assert run.run_id == event.run_id
    assert run.status is RunStatus.QUEUED
    assert fx.start == [run]  # its driver starts, to wait for a runner
    assert fx.runs[run.run_id].document()["status"] == "queued"
    steer = send(m, "more", key="k2")  # steering waits for it like for any active run
    assert steer.route == "steer"
    m.take_effects()
    m.assigned(run.run_id, 5)
    fx = m.take_effects()
    assert [e.wire()["type"] for e in fx.events] == ["run.started"]
    assert fx.events[0].wire()["runner"] == "far"
    assert run.status is RunStatus.RUNNING
    assert run.started_at == 5
    m.assigned(run.run_id, 6)  # twice is nothing
    assert not m.take_effects()
    m.result(run.run_id, done(), 7)
    fx = m.take_effects()
    assert types(fx) == ["run.ended"]
    follow = m.active  # the steering it never pulled: a follow-up, waiting for a runner too
    assert follow is not None
    assert follow.status is RunStatus.QUEUED
    assert follow.trigger_message_ids == [steer.message_id]
    assert fx.start == [follow]


def test_no_runner_came_the_run_fails_without_starting() -> None:
    m = machine()
    event = send(m, "hi")
    m.take_effects()
    error = RunError(code="runner_unavailable", message="none free", retryable=True)
    m.runner_finished(event.run_id or "", error, 9)
    fx = m.take_effects()
    assert types(fx) == ["run.ended"]
    ended = fx.events[0].wire()
    assert ended["status"] == "failed"
    assert ended["error"] == error.model_dump()
    assert m.active is None


def test_cancel_and_interrupt_of_a_waiting_run() -> None:
    m = machine()
    first = send(m, "one")
    m.take_effects()
    assert m.cancel(None, 2)
    fx = m.take_effects()
    assert types(fx) == ["run.ended"]
    assert fx.events[0].wire()["status"] == "cancelled"
    assert fx.stop == [first.run_id]
    second = send(m, "two", key="k2")
    m.take_effects()
    third = send(m, "three", mode="interrupt", key="k3")
    fx = m.take_effects()
    assert types(fx) == ["user.message", "run.ended"]  # the new run waits too
    assert fx.events[1].wire()["run_id"] == second.run_id
    assert m.active is not None
    assert m.active.run_id == third.run_id


def test_at_shutdown_a_run_no_runner_took_stays_queued_for_the_next_gateway() -> None:
    """It never started: left ahead of the queued runs, with its steering, its driver
    stopped, nothing written (its document says `queued` already)."""
    m = machine()
    first = send(m, "hi")
    steer = send(m, "more", key="k2")
    queued = send(m, "later", mode="queue", key="k3")
    m.take_effects()
    m.shutdown(9)
    fx = m.take_effects()
    assert (fx.events, fx.runs, fx.start) == ([], {}, [])
    assert fx.stop == [first.run_id]
    assert m.active is None
    assert [r.run_id for r in m.queue] == [first.run_id, queued.run_id]
    assert m.queue[0].status is RunStatus.QUEUED
    assert [t.message_id for t in m.queue[0].steering] == [steer.message_id]


def test_at_shutdown_a_follow_up_no_runner_took_ends_like_a_running_run() -> None:
    """A follow-up has no message of its own that recovery could start it from."""
    m = machine()
    first = send(m, "hi")
    send(m, "more", key="k2")
    m.take_effects()
    m.assigned(first.run_id or "", 2)
    m.result(first.run_id or "", done(), 3)
    follow = m.active
    assert follow is not None
    assert follow.status is RunStatus.QUEUED
    m.take_effects()
    m.shutdown(9)
    fx = m.take_effects()
    assert types(fx) == ["run.ended"]
    ended = fx.events[0].wire()
    assert (ended["run_id"], ended["status"], ended["reason"]) == (
        follow.run_id,
        "failed",
        "shutdown",
    )
    assert m.active is None
    assert not m.queue


def test_at_shutdown_a_run_a_runner_took_ends_failed_shutdown() -> None:
    m = machine()
    first = send(m, "hi")
    m.assigned(first.run_id or "", 2)
    m.take_effects()
    m.shutdown(9)
    fx = m.take_effects()
    assert types(fx) == ["run.ended"]
    assert (fx.events[0].wire()["status"], fx.events[0].wire()["reason"]) == (
        "failed",
        "shutdown",
    )
    assert fx.stop == [first.run_id]
