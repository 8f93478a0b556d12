"""Remote runners over `/ws/runners` (PROTOCOL.md section 10, issue 6 item 2), end to end:
a real gateway, real WebSockets, runners driven frame by frame by the test."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.core.ids import now_ms
from tests.conftest import Gateway, run_gateway
from tests.helpers import ack_of, expect
from tests.remote import RawRunner, raw_runner, result
from tests.test_runs_ws import get_run, run_events, start


async def assigned(runner: RawRunner, **match: Any) -> dict[str, Any]:
    frame = await runner.expect("run.assign", **match)
    return frame


async def complete(runner: RawRunner, run_id: str, content: str = "done") -> None:
    await runner.result(
        run_id, result("message.completed", message={"role": "assistant", "content": content})
    )
    await runner.result(run_id, result("run.completed", finish_reason="stop"))


async def test_a_remote_runner_serves_a_run_with_the_transcript_and_steering() -> None:
    async with (
        run_gateway(runner="far") as gw,
        raw_runner(gw, max_concurrency=2) as runner,
        gw.connect("rr", after=0) as client,
    ):
        ack, started = await start(client, "hello there", "m1")
        assert started["runner"] == "far"
        run_id = ack["run_id"]
        assign = await assigned(runner, run_id=run_id)
        assert assign["conversation_id"] == "rr"
        assert assign["trigger_message_ids"] == [ack["message_id"]]
        last = assign["messages"][-1]
        assert {k: last[k] for k in ("message_id", "role", "content", "run_id")} == {
            "message_id": ack["message_id"],
            "role": "user",
            "content": "hello there",
            "run_id": run_id,
        }
        assert assign["deadline_ms"] > now_ms() + 200_000  # the default 300 s
        await runner.result(run_id, {**result("message.delta", chunk="a"), "sequence": 1})
        await client.message("steer me", "m2")
        steer = await ack_of(client, "m2")
        assert steer["route"] == "steer"
        assert steer["run_id"] == run_id
        await runner.pull(run_id, "q1", mode="all", limit=10)
        batch = await runner.expect("steering.batch", request_id="q1")
        assert [(m["message_id"], m["text"], m["author"]) for m in batch["messages"]] == [
            (steer["message_id"], "steer me", "anonymous")
        ]
        await expect(client, "steering.absorbed", message_ids=[steer["message_id"]])
        # The result rules of every runner: a duplicate sequence, a bad schema and an
        # unknown type are dropped (the run goes on); a missing sequence is previous+1.
        await runner.result(run_id, {**result("message.delta", chunk="dup"), "sequence": 1})
        await runner.result(run_id, result("message.delta", chunk=5))
        await runner.result(run_id, result("no.such.type", x=1))
        await runner.result(run_id, result("message.delta", chunk="b"))
        await runner.result(
            run_id, {**result("run.completed", finish_reason="stop"), "usage": {"tokens": 3}}
        )
        ended = await expect(client, "run.ended", run_id=run_id)
        assert (ended["status"], ended["reason"], ended["usage"]) == (
            "completed",
            "stop",
            {"tokens": 3},
        )
        deltas = [f["delta"] for f in run_events(client, run_id) if f["type"] == "message.delta"]
        assert deltas == ["a", "b"]
        doc = await get_run(gw, run_id)
        assert (doc["runner"], doc["status"], doc["steering"]["absorbed"]) == (
            "far",
            "completed",
            1,
        )
        # A second run sees the transcript so far, its trigger last.
        ack2, _ = await start(client, "again", "m3")
        assign = await assigned(runner, run_id=ack2["run_id"])
        assert [m["content"] for m in assign["messages"]] == ["hello there", "steer me", "again"]
        await complete(runner, ack2["run_id"])
        await expect(client, "run.ended", run_id=ack2["run_id"], status="completed")


async def test_a_run_waits_queued_until_a_runner_connects() -> None:
    async with run_gateway(runner="far") as gw, gw.connect("wait", after=0) as client:
        await client.message("hi", "m1")
        ack = await ack_of(client, "m1")
        assert ack["route"] == "run"
        doc = await get_run(gw, ack["run_id"])
        assert doc["status"] == "queued"
        async with gw.connect("wait") as other:
            assert other.frames[0]["active_run"] == {
                "run_id": ack["run_id"],
                "status": "queued",
                "runner": "far",
            }
        assert not [f for f in client.events() if f["type"] == "run.started"]
        async with raw_runner(gw) as runner:
            await assigned(runner, run_id=ack["run_id"])
            started = await expect(client, "run.started", run_id=ack["run_id"])
            assert started["trigger_message_ids"] == [ack["message_id"]]
            await complete(runner, ack["run_id"])
            await expect(client, "run.ended", run_id=ack["run_id"], status="completed")
        assert (await get_run(gw, ack["run_id"]))["started_at"] is not None


async def test_the_wait_is_bounded_in_time_and_in_length() -> None:
    async with (
        run_gateway(runner="far", runner_wait_s=1.0, runner_queue=1) as gw,
        gw.connect("wa", after=0) as a,
        gw.connect("wb", after=0) as b,
    ):
        await a.message("first", "m1")
        ack_a = await ack_of(a, "m1")
        await b.message("second", "m1")
        ack_b = await ack_of(b, "m1")
        full = await expect(b, "run.ended", run_id=ack_b["run_id"])  # at once: one waits already
        assert full["status"] == "failed"
        assert full["error"]["code"] == "runner_unavailable"
        assert "already wait" in full["error"]["message"]
        late = await expect(a, "run.ended", run_id=ack_a["run_id"])
        assert late["reason"] == "runner_unavailable"
        assert late["error"]["retryable"] is True
        assert "within 1 s" in late["error"]["message"]
        for client in (a, b):
            assert "run.started" not in [f["type"] for f in client.events()]


async def test_runs_go_to_the_least_loaded_runner_and_wait_when_all_are_full() -> None:
    async with (
        run_gateway(runner="far") as gw,
        raw_runner(gw, max_concurrency=2) as one,
        raw_runner(gw, max_concurrency=2) as two,
    ):
        acks = []
        for i in range(5):
            async with gw.connect(f"ll{i}") as client:
                await client.message("go", "m1")
                acks.append(await ack_of(client, "m1"))
        ids = [a["run_id"] for a in acks]
        await assigned(one, run_id=ids[0])
        await assigned(two, run_id=ids[1])
        await assigned(one, run_id=ids[2])
        await assigned(two, run_id=ids[3])
        assert (await get_run(gw, ids[4]))["status"] == "queued"  # both are full
        await complete(two, ids[1])
        await assigned(two, run_id=ids[4])  # the freed place goes to the waiting run
        assert [f["run_id"] for f in one.frames if f["type"] == "run.assign"] == [ids[0], ids[2]]


async def test_cancel_reaches_the_runner_and_late_results_are_ignored() -> None:
    async with (
        run_gateway(runner="far") as gw,
        raw_runner(gw) as runner,
        gw.connect("cx", after=0) as client,
    ):
        ack, _ = await start(client, "go", "m1")
        run_id = ack["run_id"]
        await assigned(runner, run_id=run_id)
        await client.send({"type": "cancel"})
        ended = await expect(client, "run.ended", run_id=run_id)
        assert (ended["status"], ended["reason"]) == ("cancelled", "cancel_requested")
        await runner.expect("run.cancel", run_id=run_id)
        await runner.result(run_id, result("message.delta", chunk="late"))  # ignored quietly
        await runner.pull(run_id, "q1")
        assert (await runner.expect("steering.batch", request_id="q1"))["messages"] == []
        await runner.result("run_nobody", result("message.delta", chunk="x"))
        error = await runner.expect("error")
        assert (error["code"], error["run_id"]) == ("unknown_run", "run_nobody")
        # The place is free again: the next run is assigned to the same runner.
        ack2, _ = await start(client, "again", "m2")
        await assigned(runner, run_id=ack2["run_id"])


async def test_a_runner_that_disconnects_fails_its_runs_runner_lost() -> None:
    async with run_gateway(runner="far") as gw, gw.connect("lost", after=0) as client:
        async with raw_runner(gw, max_concurrency=2) as runner:
            ack, _ = await start(client, "go", "m1")
            await assigned(runner, run_id=ack["run_id"])
            await runner.result(ack["run_id"], result("message.delta", chunk="before"))
            await expect(client, "message.delta", run_id=ack["run_id"])
        ended = await expect(client, "run.ended", run_id=ack["run_id"])
        assert (ended["status"], ended["reason"]) == ("failed", "runner_lost")
        assert ended["error"]["retryable"] is True
        # The gateway keeps serving, with in-process runners and with a new remote runner.
        async with gw.connect("other", after=0) as other:
            ack2, _ = await start(other, "still here", "m1", runner="echo")
            done = await expect(other, "run.ended", run_id=ack2["run_id"])
            assert done["status"] == "completed"
        async with raw_runner(gw) as again:
            ack3, _ = await start(client, "go on", "m2")
            await assigned(again, run_id=ack3["run_id"])


async def test_bad_frames_get_errors_and_do_not_disturb_runs() -> None:
    async with (
        run_gateway(runner="far") as gw,
        raw_runner(gw) as good,
        raw_runner(gw) as bad,
        gw.connect("bad", after=0) as client,
    ):
        ack, _ = await start(client, "go", "m1")
        run_id = ack["run_id"]
        await assigned(good, run_id=run_id)
        cases: list[tuple[str | bytes | dict[str, Any], str]] = [
            ("{not json", "invalid_json"),
            (b"\x00binary", "invalid_frame"),
            ("[1, 2]", "invalid_frame"),
            ({"type": "bogus"}, "invalid_frame"),
            ({"type": "result", "run_id": run_id}, "invalid_frame"),
            ({"type": "result", "run_id": run_id, "result": {}, "extra": 1}, "invalid_frame"),
            (
                {"type": "steering.pull", "run_id": run_id, "request_id": "q", "limit": 101},
                "invalid_frame",
            ),
            ({"type": "hello", "runner": "again"}, "invalid_frame"),
            (
                {"type": "result", "run_id": run_id, "result": result("message.delta", chunk="x")},
                "unknown_run",
            ),
        ]
        for frame, code in cases:
            await bad.send(frame)
            error = await bad.recv()
            assert (error["type"], error["code"]) == ("error", code), (frame, error)
        await bad.pull(run_id, "q9")
        error = await bad.recv()
        assert (error["code"], error["request_id"], error["run_id"]) == (
            "unknown_run",
            "q9",
            run_id,
        )
        # The run `bad` tried to write into is untouched and its own runner ends it.
        await good.result(run_id, result("message.delta", chunk="fine"))
        await complete(good, run_id, "fine")
        await expect(client, "run.ended", run_id=run_id, status="completed")
        texts = [f.get("delta") for f in run_events(client, run_id) if f["type"] == "message.delta"]
        assert texts == ["fine"]


@pytest.mark.parametrize(
    ("first", "code"),
    [
        ({"type": "result", "run_id": "r", "result": {}}, 1008),  # anything before hello
        ({"type": "hello", "runner": "echo"}, 1008),  # an in-process runner's name
    ],
)
async def test_a_runner_that_does_not_say_a_valid_hello_is_closed(
    first: dict[str, Any], code: int
) -> None:
    async with run_gateway() as gw, raw_runner(gw, hello=False) as runner:
        await runner.send(first)
        assert await runner.closed() == code
        assert runner.frames[0]["type"] == "error"


async def test_abuse_and_oversized_frames_close_the_runner_and_fail_only_its_runs() -> None:
    async with (
        run_gateway(runner="far") as gw,
        raw_runner(gw, name="far") as abuser,
        raw_runner(gw, name="big") as big,
        raw_runner(gw, name="calm") as calm,
        gw.connect("ab", after=0) as a,
        gw.connect("bg", after=0) as b,
        gw.connect("cm", after=0) as c,
    ):
        ack_a, _ = await start(a, "go", "m1")
        ack_b, _ = await start(b, "go", "m1", runner="big")
        ack_c, _ = await start(c, "go", "m1", runner="calm")
        for runner, ack in ((abuser, ack_a), (big, ack_b), (calm, ack_c)):
            await assigned(runner, run_id=ack["run_id"])
        # A truncated result first: over 1 MiB is cut, not refused (section 10).
        await big.result(ack_b["run_id"], result("message.delta", chunk="x" * (1536 * 1024)))
        cut = await expect(b, "message.delta", run_id=ack_b["run_id"])
        assert 1000 * 1024 < len(cut["delta"]) <= 1024 * 1024
        for _ in range(60):
            await abuser.send("{not json")
        assert await abuser.closed() == 4029
        await big.result(ack_b["run_id"], result("message.delta", chunk="x" * (3 * 1024 * 1024)))
        assert await big.closed() == 1009
        for client, ack in ((a, ack_a), (b, ack_b)):
            ended = await expect(client, "run.ended", run_id=ack["run_id"])
            assert ended["reason"] == "runner_lost"
        await complete(calm, ack_c["run_id"])
        ended = await expect(c, "run.ended", run_id=ack_c["run_id"])
        assert ended["status"] == "completed"


async def test_a_flood_is_slowed_down_and_loses_nothing() -> None:
    async with (
        run_gateway(runner="far", runner_rate_per_s=100) as gw,
        raw_runner(gw) as runner,
        gw.connect("flood", after=0) as client,
    ):
        ack, _ = await start(client, "go", "m1")
        run_id = ack["run_id"]
        await assigned(runner, run_id=run_id)
        for i in range(150):  # over the burst of 100: the rest is read at 100 a second
            await runner.result(run_id, result("message.delta", chunk=f"{i};"))
        await complete(runner, run_id)
        await expect(client, "run.ended", run_id=run_id, status="completed")
        deltas = "".join(
            f["delta"] for f in run_events(client, run_id) if f["type"] == "message.delta"
        )
        assert deltas == "".join(f"{i};" for i in range(150))


async def test_the_runner_is_chosen_per_conversation_and_recorded_on_every_run(gw: Gateway) -> None:
    async with raw_runner(gw, name="far") as runner, gw.connect("pick", after=0) as client:
        ack, started = await start(client, "go", "m1", runner="far")
        assert started["runner"] == "far"
        await assigned(runner, run_id=ack["run_id"])
        await complete(runner, ack["run_id"])
        await expect(client, "run.ended", run_id=ack["run_id"])
        ack2, started2 = await start(client, "again", "m2", runner="echo")  # later: ignored
        assert started2["runner"] == "far"
        await assigned(runner, run_id=ack2["run_id"])
        await complete(runner, ack2["run_id"])
        for run_id in (ack["run_id"], ack2["run_id"]):
            assert (await get_run(gw, run_id))["runner"] == "far"
    async with gw.connect("plain", after=0) as client:
        _, started = await start(client, "go", "m1")
        assert started["runner"] == "echo"  # the gateway's default
        await client.message("x", "m9", runner="nobody")  # not the first: ignored
        await ack_of(client, "m9")
    async with gw.connect("nobody", after=0) as client:
        await client.message("x", "m1", runner="nobody")
        error = await expect(client, "error", client_msg_id="m1")
        assert error["code"] == "runner_unavailable"


async def test_a_runner_that_reads_nothing_is_closed_4008() -> None:
    """RunnerConnection.queue, with a socket that never takes a frame."""
    from gateway.auth import OPEN
    from gateway.protocol.frames import RunCancel
    from gateway.runnersocket import RUNNER_OUTBOX, RunnerConnection

    sent: list[dict[str, Any]] = []
    stuck = asyncio.Event()

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "websocket.send":
            await stuck.wait()

    async with run_gateway() as gw:
        conn = RunnerConnection(gw.hub, gw.hub.runners.remote, OPEN, send, None)  # type: ignore[arg-type]
        for i in range(RUNNER_OUTBOX + 1):
            conn.queue(RunCancel(run_id=f"r{i}"))
        for task in list(conn._closing):
            await task
        assert conn.close_code == 4008
        assert sent[-1] == {"type": "websocket.close", "code": 4008, "reason": "slow_consumer"}
