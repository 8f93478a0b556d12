"""Routing decisions (PROTOCOL.md section 5), tested on `decide` alone: no machine, no I/O."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.routing import (
    MAX_QUEUED_RUNS,
    MAX_STEERING,
    Refusal,
    Route,
    RoutingView,
    decide,
)
from gateway.protocol.codes import ErrorCode

MODES = ("auto", "steer", "queue", "interrupt")


def reference(view: RoutingView, mode: str) -> Route | ErrorCode:
    """Section 5, transcribed as a table: what a message sent with `mode` becomes."""
    if not view.active:
        return Route.RUN  # 5.1, whatever the mode
    steerable = view.can_steer and view.steering_waiting < view.max_steering
    queue_room = view.queued_runs < view.max_queued_runs
    table: dict[str, Route | ErrorCode] = {
        "auto": Route.STEER
        if steerable
        else (Route.QUEUE if queue_room else ErrorCode.QUEUE_FULL),  # 5.2 then 5.3
        "steer": Route.STEER
        if steerable
        else (ErrorCode.RUNNER_UNAVAILABLE if not view.can_steer else ErrorCode.QUEUE_FULL),
        "queue": Route.QUEUE if queue_room else ErrorCode.QUEUE_FULL,
        "interrupt": Route.INTERRUPT,  # never refused
    }
    return table[mode]


def outcome(decision: Route | Refusal) -> Route | ErrorCode:
    if isinstance(decision, Refusal):
        assert decision.message  # a refusal always explains itself
        return decision.code
    return decision


def test_limits_are_the_protocols() -> None:
    assert MAX_QUEUED_RUNS == 16
    assert MAX_STEERING == 100
    view = RoutingView(active=True, can_steer=True, steering_waiting=0, queued_runs=0)
    assert (view.max_queued_runs, view.max_steering) == (16, 100)


@pytest.mark.parametrize("mode", MODES)
def test_no_active_run_always_starts_a_run(mode: str) -> None:
    # Even with nonsense counts (they describe no run), 5.1 wins.
    view = RoutingView(active=False, can_steer=False, steering_waiting=100, queued_runs=16)
    assert decide(view, mode) is Route.RUN


@pytest.mark.parametrize(
    ("can_steer", "waiting", "queued", "mode", "expected"),
    [
        # 5.2: auto and steer go into a steerable run with room
        (True, 0, 0, "auto", Route.STEER),
        (True, 99, 16, "auto", Route.STEER),
        (True, 99, 16, "steer", Route.STEER),
        # 5.2: the steering queue is full (100 waiting)
        (True, 100, 0, "auto", Route.QUEUE),
        (True, 100, 15, "auto", Route.QUEUE),
        (True, 100, 16, "auto", ErrorCode.QUEUE_FULL),
        (True, 100, 0, "steer", ErrorCode.QUEUE_FULL),
        # 5.2: the runner cannot steer
        (False, 0, 0, "auto", Route.QUEUE),
        (False, 0, 16, "auto", ErrorCode.QUEUE_FULL),
        (False, 0, 0, "steer", ErrorCode.RUNNER_UNAVAILABLE),
        (False, 100, 0, "steer", ErrorCode.RUNNER_UNAVAILABLE),
        # 5.3: queue, at most 16 waiting
        (True, 0, 0, "queue", Route.QUEUE),
        (True, 0, 15, "queue", Route.QUEUE),
        (True, 0, 16, "queue", ErrorCode.QUEUE_FULL),
        (False, 100, 17, "queue", ErrorCode.QUEUE_FULL),
        # 5.3: interrupt is never refused
        (True, 0, 0, "interrupt", Route.INTERRUPT),
        (False, 100, 16, "interrupt", Route.INTERRUPT),
    ],
)
def test_active_run_table(
    can_steer: bool, waiting: int, queued: int, mode: str, expected: Route | ErrorCode
) -> None:
    view = RoutingView(
        active=True, can_steer=can_steer, steering_waiting=waiting, queued_runs=queued
    )
    assert outcome(decide(view, mode)) == expected


def test_refusal_messages_name_the_limit() -> None:
    full_queue = RoutingView(active=True, can_steer=False, steering_waiting=0, queued_runs=16)
    assert decide(full_queue, "queue") == Refusal(
        ErrorCode.QUEUE_FULL, "16 runs are already queued"
    )
    full_steer = RoutingView(active=True, can_steer=True, steering_waiting=100, queued_runs=0)
    assert decide(full_steer, "steer") == Refusal(
        ErrorCode.QUEUE_FULL, "the active run already has 100 steering messages waiting"
    )
    no_steer = RoutingView(active=True, can_steer=False, steering_waiting=0, queued_runs=0)
    assert decide(no_steer, "steer") == Refusal(
        ErrorCode.RUNNER_UNAVAILABLE, "the active run's runner cannot steer"
    )


def test_custom_limits_are_honoured() -> None:
    view = RoutingView(
        active=True,
        can_steer=True,
        steering_waiting=2,
        queued_runs=1,
        max_queued_runs=1,
        max_steering=2,
    )
    assert outcome(decide(view, "auto")) == ErrorCode.QUEUE_FULL
    assert outcome(decide(view, "steer")) == ErrorCode.QUEUE_FULL
    assert outcome(decide(view, "queue")) == ErrorCode.QUEUE_FULL
    assert decide(view, "interrupt") is Route.INTERRUPT


views = st.builds(
    RoutingView,
    active=st.booleans(),
    can_steer=st.booleans(),
    steering_waiting=st.integers(0, 130),
    queued_runs=st.integers(0, 20),
    max_queued_runs=st.one_of(st.just(MAX_QUEUED_RUNS), st.integers(0, 20)),
    max_steering=st.one_of(st.just(MAX_STEERING), st.integers(0, 130)),
)


@settings(max_examples=300, deadline=None)
@given(view=views, mode=st.sampled_from(MODES))
def test_decide_matches_the_table(view: RoutingView, mode: str) -> None:
    assert outcome(decide(view, mode)) == reference(view, mode)
