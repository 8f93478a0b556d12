"""Crash recovery (issue 4, item 3): what a stopped gateway left live is taken over.

The pure part (`rebuild`) is tested on hand-made event logs, including the logs a
crash in the middle of a batch leaves; the engine part restarts a real gateway on
the same store: stopping a gateway's hub ends no run and writes nothing, which is
exactly what a `kill -9` leaves in the store.
"""

from __future__ import annotations

import copy
from typing import Any

from gateway.core.conversation import ConversationMachine, RunnerSpec
from gateway.core.recovery import rebuild
from gateway.core.runs import RunKind, RunStatus
from store.memory import MemoryStore
from tests.conftest import run_gateway
from tests.helpers import ack_of, assert_gap_free, expect

CID = "c"


def msg(offset: int, run_id: str, mid: str, route: str, text: str = "t") -> dict[str, Any]:
    return {
        "type": "user.message",
        "offset": offset,
        "ts": offset,
        "conversation_id": CID,
        "run_id": run_id,
        "message_id": mid,
        "client_msg_id": f"k{mid}",
        "text": text,
        "route": route,
        "author": "anonymous",
    }


def started(offset: int, run_id: str, triggers: list[str]) -> dict[str, Any]:
    return {
        "type": "run.started",
        "offset": offset,
        "ts": offset,
        "conversation_id": CID,
        "run_id": run_id,
        "runner": "echo",
        "trigger_message_ids": triggers,
    }


def ended(offset: int, run_id: str, status: str = "completed") -> dict[str, Any]:
    return {
        "type": "run.ended",
        "offset": offset,
        "ts": offset,
        "conversation_id": CID,
        "run_id": run_id,
        "status": status,
        "reason": "stop",
        "usage": None,
    }


def absorbed(offset: int, run_id: str, ids: list[str]) -> dict[str, Any]:
    return {
        "type": "steering.absorbed",
        "offset": offset,
        "ts": offset,
        "conversation_id": CID,
        "run_id": run_id,
        "message_ids": ids,
    }


def doc(run_id: str, status: str) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "conversation_id": CID,
        "runner": "echo",
        "status": status,
        "created_at": 1,
        "steering": {"queued": 0, "absorbed": 0, "dropped": 0},
    }


def test_an_active_run_with_waiting_steering_and_a_queued_run() -> None:
    events = {
        "r1": [
            msg(1, "r1", "m1", "run"),
            started(2, "r1", ["m1"]),
            msg(3, "r1", "m2", "steer", "pulled"),
            absorbed(4, "r1", ["m2"]),
            msg(5, "r1", "m3", "steer", "waiting"),
        ],
        "r2": [msg(6, "r2", "m4", "queue", "later")],
    }
    state = rebuild(events, {"r1": doc("r1", "running"), "r2": doc("r2", "queued")}, "echo")
    assert [r.run_id for r in state.interrupted] == ["r1"]
    assert [m.message_id for m in state.interrupted[0].steering] == ["m3"]
    assert [(r.run_id, r.kind, r.trigger_message_ids) for r in state.queue] == [
        ("r2", RunKind.QUEUE, ["m4"])
    ]
    assert state.leftover == []
    assert state.settled == []

    machine = ConversationMachine(CID, lambda name: RunnerSpec(name), "echo", "echo")
    machine.restore(state, now=100)
    fx = machine.take_effects()
    kinds = [(e.type, e.run_id) for e in fx.events]
    assert kinds[0] == ("run.ended", "r1")
    assert fx.events[0].model_dump()["reason"] == "gateway_restart"
    assert fx.events[0].model_dump()["error"]["retryable"] is True
    assert kinds[1][0] == "run.started"
    follow_up = machine.active
    assert follow_up is not None
    assert follow_up.kind is RunKind.FOLLOW_UP
    assert follow_up.trigger_message_ids == ["m3"]
    assert [r.run_id for r in machine.queue] == ["r2"]


def test_a_crash_between_run_ended_and_its_follow_up_leaves_the_steering_to_carry() -> None:
    # The batch was [run.ended r1, run.started follow-up]; only run.ended reached the log,
    # and the documents still say r1 is running.
    events = {
        "r1": [
            msg(1, "r1", "m1", "run"),
            started(2, "r1", ["m1"]),
            msg(3, "r1", "m2", "steer", "carry me"),
            ended(4, "r1"),
        ]
    }
    state = rebuild(events, {"r1": doc("r1", "running")}, "echo")
    assert state.interrupted == []
    assert [m.text for m in state.leftover] == ["carry me"]
    assert [(r.run_id, r.status, r.reason) for r in state.settled] == [
        ("r1", RunStatus.COMPLETED, "stop")
    ]
    machine = ConversationMachine(CID, lambda name: RunnerSpec(name), "echo", "echo")
    machine.restore(state, now=100)
    fx = machine.take_effects()
    assert [e.type for e in fx.events] == ["run.started"]
    assert fx.events[0].model_dump()["trigger_message_ids"] == ["m2"]
    assert fx.runs["r1"].status is RunStatus.COMPLETED


def test_steering_a_follow_up_already_took_is_not_carried_twice() -> None:
    events = {
        "r1": [
            msg(1, "r1", "m1", "run"),
            started(2, "r1", ["m1"]),
            msg(3, "r1", "m2", "steer"),
            ended(4, "r1"),
        ],
        "r2": [started(5, "r2", ["m2"])],
    }
    state = rebuild(events, {"r1": doc("r1", "running"), "r2": doc("r2", "running")}, "echo")
    assert state.leftover == []
    assert [r.run_id for r in state.interrupted] == ["r2"]
    assert state.interrupted[0].kind is RunKind.RUN


def test_a_run_whose_documents_never_reached_the_store_is_found_by_its_events() -> None:
    # First batch of a conversation: events written, no document yet.
    state = rebuild({"r1": [msg(1, "r1", "m1", "run"), started(2, "r1", ["m1"])]}, {}, "echo")
    assert [r.run_id for r in state.interrupted] == ["r1"]
    assert state.runner == "echo"


def test_a_message_whose_run_never_started_is_run() -> None:
    # The batch [user.message (interrupt), ..., run.started] stopped after the message.
    events = {
        "r1": [msg(1, "r1", "m1", "run"), started(2, "r1", ["m1"])],
        "r2": [msg(3, "r2", "m2", "interrupt", "now")],
    }
    state = rebuild(events, {"r1": doc("r1", "running")}, "echo")
    assert [r.run_id for r in state.interrupted] == ["r1"]
    assert [(r.run_id, r.kind) for r in state.queue] == [("r2", RunKind.RUN)]
    machine = ConversationMachine(CID, lambda name: RunnerSpec(name), "echo", "echo")
    machine.restore(state, now=100)
    assert machine.active is not None
    assert machine.active.run_id == "r2"


def test_a_document_with_no_events_is_settled_without_events() -> None:
    state = rebuild({"r9": []}, {"r9": doc("r9", "running")}, "echo")
    assert [(r.run_id, r.status, r.reason) for r in state.settled] == [
        ("r9", RunStatus.FAILED, "gateway_restart")
    ]
    machine = ConversationMachine(CID, lambda name: RunnerSpec(name), "echo", "echo")
    machine.restore(state, now=100)
    fx = machine.take_effects()
    assert fx.events == []
    assert fx.runs["r9"].status is RunStatus.FAILED


async def test_a_restarted_gateway_ends_the_run_and_runs_what_waited() -> None:
    store = MemoryStore()
    async with run_gateway(store=store) as gw, gw.connect(CID, after=0) as client:
        await client.message("/sleep 600", "a1")
        first = await ack_of(client, "a1")
        await client.message("carry me", "a2")
        steer = await ack_of(client, "a2")
        await client.message("queued one", "a3", mode="queue")
        queued = await ack_of(client, "a3")
        assert (steer["route"], queued["route"]) == ("steer", "queue")
        await expect(client, "run.queued", run_id=queued["run_id"])
        head = client.events()[-1]["offset"]
        # the store as a crash leaves it (a graceful stop would end the run `shutdown`)
        store = copy.deepcopy(store)
    assert await store.last_offset(CID) == head

    async with run_gateway(store=store) as gw, gw.connect(CID, after=head) as client:
        ended_ = await expect(client, "run.ended", run_id=first["run_id"])
        assert ended_["offset"] == head + 1
        assert (ended_["status"], ended_["reason"]) == ("failed", "gateway_restart")
        follow = await expect(client, "run.started")
        assert follow["trigger_message_ids"] == [steer["message_id"]]
        done = await expect(client, "message.completed", run_id=follow["run_id"])
        assert done["message"]["content"] == "echo: carry me"
        nxt = await expect(client, "run.started", run_id=queued["run_id"])
        assert nxt["offset"] > done["offset"]
        done2 = await expect(client, "message.completed", run_id=queued["run_id"])
        assert done2["message"]["content"] == "echo: queued one"
        await expect(client, "run.ended", run_id=queued["run_id"])
        assert_gap_free(client, first=head + 1)
        # every acknowledged message is still there, once
        await client.message("again", "a1")
        assert (await ack_of(client, "a1"))["duplicate"] is True
        ends = [e for e in client.events() if e["type"] == "run.ended"]
        assert [e["run_id"] for e in ends].count(first["run_id"]) == 1
    doc_ = await store.get_run(first["run_id"])
    assert doc_ is not None
    assert (doc_["status"], doc_["reason"]) == ("failed", "gateway_restart")


async def test_a_log_with_queue_updated_is_recovered_and_the_queue_announced() -> None:
    """Issue 11, item 6: `queue.updated` (no run_id) in the log a crash leaves is read
    past; the next gateway announces the queue it takes over once it moves."""
    store = MemoryStore()
    async with run_gateway(store=store) as gw, gw.connect(CID, after=0) as client:
        await client.message("/sleep 600", "b1")
        first = await ack_of(client, "b1")
        queued = []
        for n in range(3):
            await client.message(f"queued {n}", f"bq{n}", mode="queue")
            queued.append((await ack_of(client, f"bq{n}"))["run_id"])
        await client.send({"type": "cancel", "run_id": queued[0]})
        moved = await expect(client, "queue.updated")
        assert "run_id" not in moved
        assert moved["runs"] == [
            {"run_id": queued[1], "position": 1},
            {"run_id": queued[2], "position": 2},
        ]
        head = moved["offset"]
        store = copy.deepcopy(store)  # the store as a crash leaves it
    assert await store.last_offset(CID) == head

    async with run_gateway(store=store) as gw, gw.connect(CID, after=head) as client:
        await expect(client, "run.ended", run_id=first["run_id"])
        started_ = await expect(client, "run.started", run_id=queued[1])
        moved = await expect(client, "queue.updated")
        assert moved["offset"] == started_["offset"] + 1
        assert moved["runs"] == [{"run_id": queued[2], "position": 1}]
        await expect(client, "run.ended", run_id=queued[2])
        assert_gap_free(client, first=head + 1)
