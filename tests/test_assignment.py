"""Which remote runner takes a run (gateway.core.assignment): pure, with hypothesis."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.assignment import Assignment, Outcome


def test_least_loaded_first_ties_to_the_first_joined() -> None:
    a = Assignment(max_waiting=10)
    a.join(1, "x", 2)
    a.join(2, "x", 2)
    a.join(3, "other", 5)
    assert [a.request(f"r{i}", "x") for i in range(4)] == [1, 2, 1, 2]
    assert a.request("r4", "x") is Outcome.WAITING  # both full
    assert a.request("o1", "other") == 3  # another name is not affected


def test_free_places_per_name_none_while_runs_wait_or_once_stopped() -> None:
    """What a node offers the cluster (gateway.cluster.runners): free places per name."""
    a = Assignment(max_waiting=10)
    assert a.free() == {}
    a.join(1, "x", 2)
    a.join(2, "x", 1)
    a.join(3, "y", 1)
    assert a.request("r1", "x") == 1
    assert a.free() == {"x": 2, "y": 1}
    assert a.request("r2", "y") == 3
    assert a.request("r3", "y") is Outcome.WAITING
    assert a.free() == {"x": 2, "y": 0}
    a.stop()
    assert a.free() == {"x": 0, "y": 0}


def test_a_freed_place_goes_to_the_first_waiting_run() -> None:
    a = Assignment(max_waiting=10)
    a.join(1, "x", 1)
    assert a.request("r1", "x") == 1
    assert a.request("r2", "x") is Outcome.WAITING
    assert a.request("r3", "x") is Outcome.WAITING
    assert a.release("r1") == [("r2", 1)]
    assert a.release("r2") == [("r3", 1)]
    assert a.release("r3") == []
    assert a.release("r3") == []  # twice is nothing
    assert a.waiting == {}


def test_a_joining_runner_takes_waiting_runs_up_to_its_capacity() -> None:
    a = Assignment(max_waiting=10)
    for i in range(3):
        assert a.request(f"r{i}", "x") is Outcome.WAITING
    assert a.join(7, "x", 2) == [("r0", 7), ("r1", 7)]
    assert a.waiting_count("x") == 1
    assert a.join(8, "y", 4) == []


def test_the_waiting_queue_is_bounded_per_name() -> None:
    a = Assignment(max_waiting=2)
    assert a.request("r1", "x") is Outcome.WAITING
    assert a.request("r2", "x") is Outcome.WAITING
    assert a.request("r3", "x") is Outcome.FULL
    assert a.request("y1", "y") is Outcome.WAITING  # per name
    assert a.withdraw("r1", "x")
    assert not a.withdraw("r1", "x")
    assert a.request("r3", "x") is Outcome.WAITING


def test_a_leaving_runner_hands_back_its_runs_and_its_place() -> None:
    a = Assignment(max_waiting=10)
    a.join(1, "x", 3)
    a.request("r1", "x")
    a.request("r2", "x")
    assert a.leave(1) == ["r1", "r2"]
    assert a.leave(1) == []
    assert a.release("r1") == []  # already gone with its runner
    assert a.request("r3", "x") is Outcome.WAITING
    assert a.names() == set()


def test_once_stopped_nothing_more_is_placed() -> None:
    """The gateway shuts down: placed runs go on, freed places stay free, new requests
    and joins take nothing."""
    a = Assignment(max_waiting=2)
    a.join(1, "x", 1)
    assert a.request("r1", "x") == 1
    assert a.request("r2", "x") is Outcome.WAITING
    a.stop()
    assert a.release("r1") == []  # r2 would have had it
    assert a.request("r3", "x") is Outcome.WAITING  # though runner 1 is free
    assert a.request("r4", "x") is Outcome.FULL  # the bound still holds
    assert a.join(2, "x", 5) == []
    assert a.placed == {}
    assert a.withdraw("r2", "x")
    assert a.withdraw("r3", "x")
    assert a.waiting == {}


def test_misuse_is_refused() -> None:
    a = Assignment(max_waiting=10)
    a.join(1, "x", 1)
    with pytest.raises(ValueError, match="already joined"):
        a.join(1, "x", 1)
    a.request("r1", "x")
    with pytest.raises(ValueError, match="already requested"):
        a.request("r1", "x")


# --------------------------------------------------------------------------- properties

NAMES = ("a", "b")
ops = st.lists(
    st.one_of(
        st.tuples(st.just("join"), st.sampled_from(NAMES), st.integers(1, 3)),
        st.tuples(st.just("leave"), st.integers(0, 5)),
        st.tuples(st.just("request"), st.sampled_from(NAMES)),
        st.tuples(st.just("release"), st.integers(0, 30)),
        st.tuples(st.just("withdraw"), st.integers(0, 30)),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_invariants_hold_whatever_happens(script: list[tuple[Any, ...]]) -> None:
    """No runner over its capacity; a run is placed or waiting, never both, never twice;
    nobody waits while a runner of its name is free; each placement is least-loaded."""
    a = Assignment(max_waiting=4)
    runners = 0
    runs: list[str] = []
    names: dict[str, str] = {}
    for op in script:
        placements: list[tuple[str, int]] = []
        if op[0] == "join":
            runners += 1
            placements = a.join(runners, op[1], op[2])
        elif op[0] == "leave" and a.slots:
            rid = list(a.slots)[op[1] % len(a.slots)]
            held = {r for r, owner in a.placed.items() if owner == rid}
            assert set(a.leave(rid)) == held
        elif op[0] == "request":
            run_id = f"r{len(runs)}"
            runs.append(run_id)
            names[run_id] = op[1]
            outcome = a.request(run_id, op[1])
            if isinstance(outcome, int):
                placements = [(run_id, outcome)]
            elif outcome is Outcome.FULL:
                assert a.waiting_count(op[1]) == 4
        elif op[0] == "release" and runs:
            placements = a.release(runs[op[1] % len(runs)])
        elif op[0] == "withdraw" and runs:
            run_id = runs[op[1] % len(runs)]
            a.withdraw(run_id, names[run_id])
        for run_id, rid in placements:  # least-loaded of the free runners of its name
            name = a.slots[rid].name
            assert name == names.get(run_id, name)
            # a runner free now was free when the run was placed: it had no fewer runs
            others = [
                len(s.runs)
                for s in a.slots.values()
                if s.name == name and s.runner_id != rid and s.free
            ]
            assert len(a.slots[rid].runs) - 1 <= min(others, default=len(a.slots[rid].runs))
        placed = a.placed
        waiting = [r for q in a.waiting.values() for r in q]
        assert len(waiting) == len(set(waiting))
        assert not set(waiting) & set(placed)
        for slot in a.slots.values():
            assert len(slot.runs) <= slot.capacity
            assert all(placed[r] == slot.runner_id for r in slot.runs)
        assert sum(len(s.runs) for s in a.slots.values()) == len(placed)
        for name, queue in a.waiting.items():
            assert queue, "an empty waiting queue is removed"
            assert len(queue) <= 4
            free = [s for s in a.slots.values() if s.name == name and s.free]
            assert not free, f"{name}: runs wait while a runner is free"
