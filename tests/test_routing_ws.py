"""Routing a user message over the wire (PROTOCOL.md sections 5.1-5.4).

Runs are made deterministic with `Gated`, a runner each of whose runs waits for
the test to open its gate; the echo runner is used where its output is the
point (steered words in the reply, `/sleep` never pulling steering).  Every test
ends by checking that no acknowledged message was lost or answered twice.
"""

from __future__ import annotations

from collections import Counter

import pytest

from gateway.runners.echo import EchoRunner
from tests.conftest import Client, Gateway, run_gateway
from tests.helpers import Event, Gated, ack_of, event_texts, expect, stored_events

# --------------------------------------------------------------------------- helpers


def accounting(events: list[Event]) -> tuple[Counter[str], set[str], set[str]]:
    """(how often each message id was answered, runs that exist, runs that ended)."""
    answered: Counter[str] = Counter()
    started: set[str] = set()
    queued: dict[str, list[str]] = {}
    ended: set[str] = set()
    for e in events:
        kind = e["type"]
        if kind == "run.started":
            started.add(e["run_id"])
            answered.update(e["trigger_message_ids"])
        elif kind == "run.queued":
            queued[e["run_id"]] = e["trigger_message_ids"]
        elif kind in ("steering.absorbed", "steering.dropped"):
            answered.update(e["message_ids"])
        elif kind == "run.ended":
            ended.add(e["run_id"])
    for run_id, triggers in queued.items():
        if run_id not in started:  # a queued run cancelled before it started
            answered.update(triggers)
    return answered, started | set(queued), ended


def assert_answered_once(events: list[Event], acked: list[str]) -> None:
    """Every acknowledged message is stored once and answered exactly once (a run's
    trigger, absorbed or dropped steering), every run ended, and nothing else."""
    assert [e["offset"] for e in events] == list(range(1, len(events) + 1))
    stored = [e["message_id"] for e in events if e["type"] == "user.message"]
    assert sorted(stored) == sorted(acked)
    assert len(set(acked)) == len(acked)
    answered, runs, ended = accounting(events)
    assert answered == Counter(acked)
    assert runs == ended


def of_run(client: Client, run_id: str, kind: str) -> list[Event]:
    return [e for e in client.events() if e["type"] == kind and e.get("run_id") == run_id]


def after_offset(client: Client, offset: int) -> list[Event]:
    return [e for e in client.events() if e["offset"] > offset]


# --------------------------------------------------------------------------- 5.1


@pytest.mark.parametrize("mode", ["auto", "steer", "queue", "interrupt"])
async def test_no_active_run_starts_a_run_whatever_the_mode(gw: Gateway, mode: str) -> None:
    async with gw.connect("r1", after=0) as c:
        await c.message("a  b", "m1", mode=mode)
        ack = await ack_of(c, "m1")
        ended = await expect(c, "run.ended")
        run_id = ack["run_id"]
        assert ack == {
            "type": "ack",
            "client_msg_id": "m1",
            "offset": 1,
            "message_id": ack["message_id"],
            "route": "run",
            "run_id": run_id,
            "duplicate": False,
        }
        events = c.events()
        assert [(e["offset"], e["type"]) for e in events] == [
            (1, "user.message"),
            (2, "run.started"),
            (3, "message.delta"),
            (4, "message.delta"),
            (5, "message.delta"),
            (6, "message.completed"),
            (7, "run.ended"),
        ]
        user, started = events[0], events[1]
        assert {k: v for k, v in user.items() if k != "ts"} == {
            "type": "user.message",
            "offset": 1,
            "conversation_id": "r1",
            "run_id": run_id,
            "message_id": ack["message_id"],
            "client_msg_id": "m1",
            "text": "a  b",
            "route": "run",
            "author": "anonymous",
        }
        assert started["run_id"] == run_id
        assert started["runner"] == "echo"
        assert started["trigger_message_ids"] == [ack["message_id"]]
        assert [e["delta"] for e in events[2:5]] == ["echo:", " a", " b"]
        assert events[5]["message"] == {"role": "assistant", "content": "echo: a b"}
        assert ended["run_id"] == run_id
        assert (ended["status"], ended["reason"]) == ("completed", "stop")
        assert_answered_once(await stored_events(gw, "r1"), [ack["message_id"]])


# --------------------------------------------------------------------------- 5.2


async def test_steering_into_echo_is_broadcast_and_echoed() -> None:
    words = [f"w{i}" for i in range(25)]
    async with (
        run_gateway(echo_delay_ms=20) as gw,
        gw.connect("r2", after=0) as sender,
        gw.connect("r2", after=0) as watcher,
    ):
        await sender.message(" ".join(words), "m1")
        first = await ack_of(sender, "m1")
        run_id = first["run_id"]
        await expect(sender, "message.delta", delta=" w0")
        await sender.message("left  right", "s1", mode="steer")
        steer = await ack_of(sender, "s1")
        assert steer["route"] == "steer"
        assert steer["run_id"] == run_id
        assert steer["duplicate"] is False
        assert steer["offset"] > first["offset"]

        for client in (sender, watcher):
            done = await expect(client, "message.completed", run_id=run_id)
            ended = await expect(client, "run.ended", run_id=run_id)
            assert (ended["status"], ended["reason"]) == ("completed", "stop")
            absorbed = of_run(client, run_id, "steering.absorbed")
            assert [e["message_ids"] for e in absorbed] == [[steer["message_id"]]]
            content = done["message"]["content"]
            assert content.startswith("echo: w0 ")
            # The steered words appear once, right after a `[steer]` marker, in order.
            seen = content.split()[1:]
            k = seen.index("[steer]")
            assert 1 <= k < len(words)
            assert seen == [*words[:k], "[steer]", "left", "right", *words[k:]]
            deltas = of_run(client, run_id, "message.delta")
            assert "".join(d["delta"] for d in deltas) == content
            # The absorbed event comes before the `[steer]` delta.
            marker = next(d for d in deltas if d["delta"] == " [steer]")
            assert absorbed[0]["offset"] < marker["offset"]

        # Both clients got the same bytes for every event, in the same order.
        assert watcher.events() == sender.events()
        assert event_texts(watcher) == event_texts(sender)
        assert len(event_texts(sender)) == len(sender.events())
        assert_answered_once(
            await stored_events(gw, "r2"), [first["message_id"], steer["message_id"]]
        )


async def test_steering_waits_for_the_pull_then_is_absorbed_in_order() -> None:
    runner = Gated()
    async with (
        run_gateway(runners=[runner]) as gw,
        gw.connect("r3", after=0) as a,
        gw.connect("r3", after=0) as b,
    ):
        await a.message("go", "m1", runner="gated")
        run_id = (await ack_of(a, "m1"))["run_id"]
        await expect(a, "message.delta", delta="start go")
        await a.message("one", "s1")  # auto steers into a steerable run
        await a.message("two", "s2", mode="steer")
        await b.message("three", "s3", mode="auto")
        acks = [await ack_of(a, "s1"), await ack_of(a, "s2"), await ack_of(b, "s3")]
        assert [(x["route"], x["run_id"]) for x in acks] == [("steer", run_id)] * 3
        ids = [x["message_id"] for x in acks]
        runner.release(run_id)
        for client in (a, b):
            done = await expect(client, "message.completed", run_id=run_id)
            assert done["message"]["content"] == "start go [steer] one [steer] two [steer] three"
            await expect(client, "run.ended", run_id=run_id)
            absorbed = of_run(client, run_id, "steering.absorbed")
            assert [e["message_ids"] for e in absorbed] == [ids]
        assert a.events() == b.events()
        events = await stored_events(gw, "r3")
        assert [e["type"] for e in events] == [
            "user.message",
            "run.started",
            "message.delta",
            "user.message",
            "user.message",
            "user.message",
            "steering.absorbed",
            "message.delta",
            "message.delta",
            "message.delta",
            "message.completed",
            "run.ended",
        ]
        assert_answered_once(events, [events[0]["message_id"], *ids])


async def test_steer_into_a_runner_that_cannot_steer_is_refused_and_auto_queues() -> None:
    runner = Gated("still", supports_steering=False)
    async with run_gateway(runners=[runner]) as gw, gw.connect("r4", after=0) as c:
        await c.message("go", "m1", runner="still")
        first = await ack_of(c, "m1")
        await expect(c, "message.delta", delta="start go")
        head = gw.hub.actors["r4"].log.head
        assert head == 3
        await c.message("no", "s1", mode="steer")
        error = await expect(c, "error")
        assert error == {
            "type": "error",
            "code": "runner_unavailable",
            "message": error["message"],
            "client_msg_id": "s1",
        }
        assert await gw.store.find_client_message("r4", "s1") is None
        assert gw.hub.actors["r4"].log.head == head
        # `auto` into that run is handled as `queue` (5.2).
        await c.message("later", "s2", mode="auto")
        queued = await ack_of(c, "s2")
        assert queued["route"] == "queue"
        assert queued["offset"] == head + 1  # the refused message took no offset
        assert queued["run_id"] != first["run_id"]
        pos = await expect(c, "run.queued", run_id=queued["run_id"])
        assert pos["position"] == 1
        assert pos["trigger_message_ids"] == [queued["message_id"]]
        runner.release(first["run_id"])
        runner.release(queued["run_id"])
        await expect(c, "run.ended", run_id=queued["run_id"])
        # The refused key stays free: a retry with nothing active is stored and runs.
        await c.message("retry", "s1", mode="steer")
        retry = await ack_of(c, "s1")
        assert (retry["route"], retry["duplicate"]) == ("run", False)
        runner.release(retry["run_id"])
        await expect(c, "run.ended", run_id=retry["run_id"])
        assert_answered_once(
            await stored_events(gw, "r4"),
            [first["message_id"], queued["message_id"], retry["message_id"]],
        )


# --------------------------------------------------------------------------- 5.3


async def test_queued_runs_start_in_order_after_the_active_one() -> None:
    runner = Gated()
    async with run_gateway(runners=[runner]) as gw, gw.connect("r5", after=0) as c:
        await c.message("A", "a", runner="gated")
        a = await ack_of(c, "a")
        await c.message("B", "b", mode="queue")
        await c.message("C", "c", mode="queue")
        b, cc = await ack_of(c, "b"), await ack_of(c, "c")
        assert (b["route"], cc["route"]) == ("queue", "queue")
        assert len({a["run_id"], b["run_id"], cc["run_id"]}) == 3
        qb = await expect(c, "run.queued", run_id=b["run_id"])
        qc = await expect(c, "run.queued", run_id=cc["run_id"])
        assert (qb["position"], qc["position"]) == (1, 2)
        assert (qb["runner"], qc["runner"]) == ("gated", "gated")
        assert qb["trigger_message_ids"] == [b["message_id"]]
        assert qc["trigger_message_ids"] == [cc["message_id"]]
        assert qb["offset"] == b["offset"] + 1

        for ack, nxt in ((a, b), (b, cc), (cc, None)):
            await expect(c, "message.delta", run_id=ack["run_id"])
            runner.release(ack["run_id"])
            end = await expect(c, "run.ended", run_id=ack["run_id"])
            assert end["status"] == "completed"
            if nxt is not None:
                start = await expect(c, "run.started", run_id=nxt["run_id"])
                assert start["offset"] == end["offset"] + 1
                assert start["trigger_message_ids"] == [nxt["message_id"]]
        events = await stored_events(gw, "r5")
        order = [(e["type"], e["run_id"]) for e in events if e["type"].startswith("run.")]
        ra, rb, rc = a["run_id"], b["run_id"], cc["run_id"]
        assert order == [
            ("run.started", ra),
            ("run.queued", rb),
            ("run.queued", rc),
            ("run.ended", ra),
            ("run.started", rb),
            ("run.ended", rb),
            ("run.started", rc),
            ("run.ended", rc),
        ]
        assert_answered_once(events, [a["message_id"], b["message_id"], cc["message_id"]])


async def test_the_17th_queued_run_is_refused_and_stores_nothing() -> None:
    runner = Gated()
    async with run_gateway(runners=[runner]) as gw, gw.connect("r6", after=0) as c:
        await c.message("nopull A", "a", runner="gated")
        a = await ack_of(c, "a")
        await expect(c, "message.delta", delta="start nopull A")
        for i in range(16):
            await c.message(f"q{i}", f"q{i}", mode="queue")
        acks = [await ack_of(c, f"q{i}") for i in range(16)]
        assert [x["route"] for x in acks] == ["queue"] * 16
        positions = [(await expect(c, "run.queued", run_id=x["run_id"]))["position"] for x in acks]
        assert positions == list(range(1, 17))
        head = gw.hub.actors["r6"].log.head
        assert head == 3 + 2 * 16  # message, run.started, delta, then 16 x (message, queued)

        await c.message("one too many", "q16", mode="queue")
        error = await expect(c, "error")
        assert error["code"] == "queue_full"
        assert error["client_msg_id"] == "q16"
        # `auto` into a steerable run still steers; it is not a queued run.
        await c.message("steer me", "s1", mode="auto")
        steer = await ack_of(c, "s1")
        assert steer["route"] == "steer"
        assert steer["offset"] == head + 1  # the refused message took no offset
        assert await gw.store.find_client_message("r6", "q16") is None
        stored = await stored_events(gw, "r6")
        assert "one too many" not in {e.get("text") for e in stored}

        # A never pulls: its leftover steering becomes a follow-up even with 16 runs
        # queued (follow-ups are never refused), and it goes ahead of them.
        runner.release(a["run_id"])
        end_a = await expect(c, "run.ended", run_id=a["run_id"])
        follow = await expect(c, "run.started", offset=end_a["offset"] + 1)
        assert follow["trigger_message_ids"] == [steer["message_id"]]
        # The queue is still full; the refused key is still free.
        await c.message("one too many", "q16", mode="queue")
        error = await c.until_type("error")
        assert (error["code"], error["client_msg_id"]) == ("queue_full", "q16")
        # Once a queued run starts there is room again.
        runner.release(follow["run_id"])
        await expect(c, "run.started", run_id=acks[0]["run_id"])
        await c.message("one too many", "q16", mode="queue")
        late = await ack_of(c, "q16")
        assert (late["route"], late["duplicate"]) == ("queue", False)
        assert (await expect(c, "run.queued", run_id=late["run_id"]))["position"] == 16
        for x in [*acks, late]:
            runner.release(x["run_id"])
        await expect(c, "run.ended", run_id=late["run_id"])
        events = await stored_events(gw, "r6")
        started = [e["run_id"] for e in events if e["type"] == "run.started"]
        assert started == [a["run_id"], follow["run_id"], *(x["run_id"] for x in [*acks, late])]
        assert_answered_once(
            events,
            [
                a["message_id"],
                *(x["message_id"] for x in acks),
                steer["message_id"],
                late["message_id"],
            ],
        )


async def test_interrupt_cancels_the_active_run_and_starts_at_once() -> None:
    runner = Gated()
    async with run_gateway(runners=[runner]) as gw, gw.connect("r7", after=0) as c:
        await c.message("A", "a", runner="gated")
        a = await ack_of(c, "a")
        await c.message("B", "b", mode="queue")
        b = await ack_of(c, "b")
        await c.message("steer A", "s", mode="steer")
        s = await ack_of(c, "s")
        await c.message("I", "i", mode="interrupt")
        i = await ack_of(c, "i")
        assert i["route"] == "interrupt"
        assert i["run_id"] not in (a["run_id"], b["run_id"])
        started = await expect(c, "run.started", run_id=i["run_id"])
        tail = after_offset(c, i["offset"] - 1)
        assert [(e["type"], e["run_id"]) for e in tail] == [
            ("user.message", i["run_id"]),
            ("steering.dropped", a["run_id"]),
            ("run.ended", a["run_id"]),
            ("run.started", i["run_id"]),
        ]
        dropped, ended = tail[1], tail[2]
        assert (dropped["message_ids"], dropped["reason"]) == ([s["message_id"]], "cancelled")
        assert (ended["status"], ended["reason"]) == ("cancelled", "interrupted")
        assert started["trigger_message_ids"] == [i["message_id"]]
        machine = gw.hub.actors["r7"].machine
        assert machine.active is not None
        assert machine.active.run_id == i["run_id"]
        assert [r.run_id for r in machine.queue] == [b["run_id"]]  # still queued

        # The queued run waits for the interrupting one, then starts.
        runner.release(i["run_id"])
        end_i = await expect(c, "run.ended", run_id=i["run_id"])
        start_b = await expect(c, "run.started", run_id=b["run_id"])
        assert start_b["offset"] == end_i["offset"] + 1
        runner.release(b["run_id"])
        await expect(c, "run.ended", run_id=b["run_id"])
        events = await stored_events(gw, "r7")
        # The interrupted run never got to its end: nothing of it comes after its run.ended.
        a_offsets = [e["offset"] for e in events if e.get("run_id") == a["run_id"]]
        assert max(a_offsets) == ended["offset"]
        assert_answered_once(
            events, [a["message_id"], b["message_id"], s["message_id"], i["message_id"]]
        )


# --------------------------------------------------------------------------- 5.4


async def test_leftover_steering_becomes_a_follow_up_ahead_of_queued_runs() -> None:
    runner = Gated()
    async with run_gateway(runners=[runner]) as gw, gw.connect("r8", after=0) as c:
        await c.message("nopull A", "a", runner="gated")
        a = await ack_of(c, "a")
        await c.message("Q", "q", mode="queue")
        q = await ack_of(c, "q")
        await c.message("x", "s1")
        await c.message("y", "s2", mode="steer")
        s1, s2 = await ack_of(c, "s1"), await ack_of(c, "s2")
        assert [(x["route"], x["run_id"]) for x in (s1, s2)] == [("steer", a["run_id"])] * 2
        runner.release(a["run_id"])
        end_a = await expect(c, "run.ended", run_id=a["run_id"])
        assert (end_a["status"], end_a["reason"]) == ("completed", "stop")
        follow = await expect(c, "run.started", offset=end_a["offset"] + 1)
        assert follow["run_id"] not in (a["run_id"], q["run_id"])
        assert follow["trigger_message_ids"] == [s1["message_id"], s2["message_id"]]
        assert follow["runner"] == "gated"
        assert of_run(c, a["run_id"], "steering.dropped") == []
        assert of_run(c, a["run_id"], "steering.absorbed") == []
        first = await expect(c, "message.delta", run_id=follow["run_id"])
        assert first["delta"] == "start x y"
        runner.release(follow["run_id"])
        end_f = await expect(c, "run.ended", run_id=follow["run_id"])
        start_q = await expect(c, "run.started", run_id=q["run_id"])
        assert start_q["offset"] == end_f["offset"] + 1
        runner.release(q["run_id"])
        await expect(c, "run.ended", run_id=q["run_id"])
        assert_answered_once(
            await stored_events(gw, "r8"),
            [a["message_id"], q["message_id"], s1["message_id"], s2["message_id"]],
        )


async def test_leftover_steering_of_a_drop_runner_is_dropped_before_run_ended() -> None:
    runner = Gated("gated-drop", leftover_steering="drop")
    async with run_gateway(runners=[runner]) as gw, gw.connect("r9", after=0) as c:
        await c.message("nopull A", "a", runner="gated-drop")
        a = await ack_of(c, "a")
        await c.message("x", "s1")
        await c.message("y", "s2")
        s1, s2 = await ack_of(c, "s1"), await ack_of(c, "s2")
        runner.release(a["run_id"])
        end = await expect(c, "run.ended", run_id=a["run_id"])
        assert (end["status"], end["reason"]) == ("completed", "stop")
        dropped = of_run(c, a["run_id"], "steering.dropped")
        assert len(dropped) == 1
        assert dropped[0]["offset"] == end["offset"] - 1
        assert dropped[0]["message_ids"] == [s1["message_id"], s2["message_id"]]
        assert dropped[0]["reason"] == "run_ended"
        # No follow-up run: the next event is the next message's.
        await c.message("next", "n")
        n = await ack_of(c, "n")
        assert n["route"] == "run"
        assert n["offset"] == end["offset"] + 1
        runner.release(n["run_id"])
        await expect(c, "run.ended", run_id=n["run_id"])
        assert_answered_once(
            await stored_events(gw, "r9"),
            [a["message_id"], s1["message_id"], s2["message_id"], n["message_id"]],
        )


async def test_echo_drop_runner_drops_what_sleep_never_pulled() -> None:
    echo_drop = EchoRunner(name="echo-drop", delay_ms=1, leftover_steering="drop")
    async with run_gateway(runners=[echo_drop]) as gw, gw.connect("r10", after=0) as c:
        await c.message("/sleep 0.3", "a", runner="echo-drop")
        a = await ack_of(c, "a")
        await c.message("lost words", "s1")
        s1 = await ack_of(c, "s1")
        assert (s1["route"], s1["run_id"]) == ("steer", a["run_id"])
        end = await expect(c, "run.ended", run_id=a["run_id"])
        assert (end["status"], end["reason"]) == ("completed", "stop")
        tail = after_offset(c, s1["offset"])
        assert [e["type"] for e in tail] == [
            "message.delta",
            "message.delta",
            "message.completed",
            "steering.dropped",
            "run.ended",
        ]
        assert tail[2]["message"]["content"] == "echo: slept"
        assert (tail[3]["message_ids"], tail[3]["reason"]) == ([s1["message_id"]], "run_ended")
        assert_answered_once(await stored_events(gw, "r10"), [a["message_id"], s1["message_id"]])


async def test_echo_sleep_never_pulls_so_steering_becomes_a_follow_up(gw: Gateway) -> None:
    async with gw.connect("r11", after=0) as c:
        await c.message("/sleep 0.3", "a")
        a = await ack_of(c, "a")
        await c.message("hello  there", "s1")
        await c.message("friend", "s2", mode="steer")
        s1, s2 = await ack_of(c, "s1"), await ack_of(c, "s2")
        assert [(x["route"], x["run_id"]) for x in (s1, s2)] == [("steer", a["run_id"])] * 2
        end = await expect(c, "run.ended", run_id=a["run_id"])
        follow = await expect(c, "run.started", offset=end["offset"] + 1)
        assert follow["trigger_message_ids"] == [s1["message_id"], s2["message_id"]]
        done = await expect(c, "message.completed", run_id=follow["run_id"])
        assert done["message"]["content"] == "echo: hello there friend"
        await expect(c, "run.ended", run_id=follow["run_id"])
        assert of_run(c, a["run_id"], "steering.absorbed") == []
        assert [
            e["message"]["content"] for e in c.events() if e["type"] == "message.completed"
        ] == [
            "echo: slept",
            "echo: hello there friend",
        ]
        assert_answered_once(
            await stored_events(gw, "r11"),
            [a["message_id"], s1["message_id"], s2["message_id"]],
        )


async def test_cancel_drops_leftover_steering_and_starts_no_follow_up() -> None:
    runner = Gated()
    async with run_gateway(runners=[runner]) as gw, gw.connect("r12", after=0) as c:
        await c.message("A", "a", runner="gated")
        a = await ack_of(c, "a")
        await c.message("Q1", "q1", mode="queue")
        await c.message("Q2", "q2", mode="queue")
        q1, q2 = await ack_of(c, "q1"), await ack_of(c, "q2")
        await c.message("x", "s1")
        s1 = await ack_of(c, "s1")
        # Cancel a queued run: it ends with no run.started.
        await c.send({"type": "cancel", "run_id": q1["run_id"]})
        end_q1 = await expect(c, "run.ended", run_id=q1["run_id"])
        assert (end_q1["status"], end_q1["reason"]) == ("cancelled", "cancel_requested")
        assert of_run(c, q1["run_id"], "run.started") == []
        # Cancel the active run: its steering is dropped, and the queued Q2 starts next.
        await c.send({"type": "cancel"})
        end_a = await expect(c, "run.ended", run_id=a["run_id"])
        assert (end_a["status"], end_a["reason"]) == ("cancelled", "cancel_requested")
        dropped = of_run(c, a["run_id"], "steering.dropped")
        assert [(d["message_ids"], d["reason"]) for d in dropped] == [
            ([s1["message_id"]], "cancelled")
        ]
        assert dropped[0]["offset"] == end_a["offset"] - 1
        start = await expect(c, "run.started", run_id=q2["run_id"])
        assert start["offset"] == end_a["offset"] + 1
        runner.release(q2["run_id"])
        await expect(c, "run.ended", run_id=q2["run_id"])
        assert_answered_once(
            await stored_events(gw, "r12"),
            [a["message_id"], q1["message_id"], q2["message_id"], s1["message_id"]],
        )


async def test_a_burst_of_every_mode_answers_each_message_exactly_once() -> None:
    async with (
        run_gateway(echo_delay_ms=1, rate_burst=200) as gw,
        gw.connect("r13", after=0) as a,
        gw.connect("r13", after=0) as b,
    ):
        modes = ["auto", "steer", "queue", "interrupt", "auto", "queue"]
        for i in range(48):
            client = a if i % 2 == 0 else b
            await client.message(f"m{i} x y", f"m{i}", mode=modes[i % len(modes)])
        resent = [f"m{i}" for i in range(0, 48, 10)]  # keys `a` sent: after their first send
        for key in resent:
            await a.message("again", key)
        for client, expected in ((a, 24 + len(resent)), (b, 24)):
            while sum(1 for f in client.frames if f["type"] in ("ack", "error")) < expected:
                await client.recv()
        acked: list[str] = []
        first: dict[str, Event] = {}
        for f in a.frames + b.frames:
            if f["type"] not in ("ack", "error"):
                continue
            key = f["client_msg_id"]
            if key not in first:  # the original send (each connection answers in order)
                first[key] = f
                if f["type"] == "error":
                    assert f["code"] == "queue_full"
                else:
                    assert f["duplicate"] is False
                    acked.append(f["message_id"])
            elif first[key]["type"] == "ack":  # a resend of a stored key
                assert f == {**first[key], "duplicate": True}
            elif f["type"] == "ack":  # a resend of a refused key: stored now
                assert f["duplicate"] is False
                acked.append(f["message_id"])
            else:
                assert f["code"] == "queue_full"
        assert set(first) == {f"m{i}" for i in range(48)}

        def settled(_: object = None) -> bool:
            answered, runs, ended = accounting(a.events())
            return runs == ended and all(answered[m] for m in acked)

        if not settled():
            await a.until(settled)
        last = a.events()[-1]
        await expect(b, last["type"], offset=last["offset"])
        events = await stored_events(gw, "r13")
        assert events == a.events()
        assert a.events() == b.events()
        assert_answered_once(events, acked)
        routes = Counter(f["route"] for f in first.values() if f["type"] == "ack")
        assert routes["steer"] > 0
        assert routes["queue"] > 0
        assert routes["interrupt"] > 0
