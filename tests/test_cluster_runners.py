"""Remote runners across nodes (issue 12, item 4), with real processes: a runner connected
to node B serves runs of conversations node A owns; when a node dies, nothing is left
hanging. Every server runs on a free port and is stopped by its pid."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from gateway.cluster.leases import Leases, holder_node
from tests.cluster import LEASE_S, Cluster, cluster
from tests.processes import Reader, reader
from tests.remote import RawRunner, raw_runner, result

pytestmark = pytest.mark.slow

WITHIN = 10.0  # a run is placed on another node's runner within a beat or two


def chunks(r: Reader, run_id: str) -> str:
    return "".join(
        f["delta"] for f in r.frames if f["type"] == "message.delta" and f.get("run_id") == run_id
    )


async def owner(c: Cluster, cid: str) -> str:
    """The node holding the conversation's lease."""
    redis = Redis(port=c.redis.port)
    try:
        value = await redis.get(Leases.key(cid))
    finally:
        await redis.aclose()
    assert value is not None
    return holder_node(value.decode())


async def assigned(runner: RawRunner, run_id: str) -> dict[str, Any]:
    return await runner.expect("run.assign", within=WITHIN, run_id=run_id)


async def test_a_runner_on_one_node_serves_a_run_another_node_owns(tmp_path: Path) -> None:
    """The runner is connected to B only; A owns the conversation: the run is assigned with
    its transcript, results reach clients on A and C in order (more than the relay's
    window), steering sent through C is pulled through B, and a cancel through A ends
    the run within 1 s, the runner told `run.cancel`."""
    async with cluster(tmp_path, STEERWAY_RUNNER="far") as c:
        a, b, cc = c.nodes
        async with (
            raw_runner(b, "far") as runner,
            reader(a, "conv", 0) as on_a,
            reader(cc, "conv", 0) as on_c,
        ):
            ack = await on_a.send("hello there", "m1")  # a takes the lease
            assert await owner(c, "conv") == "a"
            run_id = ack["run_id"]
            assign = await assigned(runner, run_id)
            assert assign["conversation_id"] == "conv"
            assert [m["content"] for m in assign["messages"]] == ["hello there"]
            await on_c.until("run.started", run_id=run_id)
            words = [f"w{i} " for i in range(600)]  # past WINDOW: the owner's credit flows back
            for word in words:
                await runner.result(run_id, result("message.delta", chunk=word))
            # steering through c reaches the run on a, and the runner pulls it through b
            steer = await on_c.send("shorter please", "m2")
            assert (steer["route"], steer["run_id"]) == ("steer", run_id)
            await runner.pull(run_id, "q1")
            batch = await runner.expect("steering.batch", within=WITHIN, request_id="q1")
            assert [m["text"] for m in batch["messages"]] == ["shorter please"]
            absorbed = await on_a.until("steering.absorbed", run_id=run_id)
            assert absorbed["message_ids"] == [steer["message_id"]]
            await on_c.until("steering.absorbed", run_id=run_id)
            assert chunks(on_a, run_id) == chunks(on_c, run_id) == "".join(words)
            # a cancel through a: the run ends, and the runner on b is told, within 1 s
            started = time.monotonic()
            await on_a.ws.send(orjson.dumps({"type": "cancel"}).decode())
            await runner.expect("run.cancel", within=WITHIN, run_id=run_id)
            ended = await on_c.until("run.ended", run_id=run_id)
            assert time.monotonic() - started < 1.0
            assert (ended["status"], ended["reason"]) == ("cancelled", "cancel_requested")
            # the place is free again: the next run goes to the same runner
            again = await on_c.send("next", "m3")
            await assigned(runner, again["run_id"])
            await runner.result(again["run_id"], result("message.completed", message={
                "role": "assistant", "content": "done",
            }))  # fmt: skip
            await runner.result(again["run_id"], result("run.completed", finish_reason="stop"))
            done = await on_a.until("run.ended", run_id=again["run_id"])
            assert done["status"] == "completed"


async def test_the_runners_node_dies_mid_run_and_the_run_fails_runner_lost(
    tmp_path: Path,
) -> None:
    """kill -9 of the runner's node: the owner ends the run failed/runner_lost (retryable)
    within the lease time, and goes on serving."""
    async with cluster(tmp_path, ("a", "b"), STEERWAY_RUNNER="far") as c:
        a, b = c.nodes
        async with reader(a, "conv", 0) as on_a:
            async with raw_runner(b, "far") as runner:
                ack = await on_a.send("go", "m1")
                assert await owner(c, "conv") == "a"
                await assigned(runner, ack["run_id"])
                await runner.result(ack["run_id"], result("message.delta", chunk="before"))
                await on_a.until("message.delta", run_id=ack["run_id"])
                started = time.monotonic()
                await b.kill()
                ended = await on_a.until("run.ended", run_id=ack["run_id"])
                assert time.monotonic() - started < LEASE_S
            assert (ended["status"], ended["reason"]) == ("failed", "runner_lost")
            assert ended["error"]["retryable"] is True
            assert chunks(on_a, ack["run_id"]) == "before"
            async with raw_runner(a, "far") as here:  # the gateway keeps serving
                again = await on_a.send("again", "m2")
                await assigned(here, again["run_id"])


async def test_the_owner_dies_mid_run_and_the_runner_is_told_run_cancel(tmp_path: Path) -> None:
    """kill -9 of the owner: the runner's node tells it `run.cancel` within the lease time;
    the conversation's new owner ends the run failed/node_lost."""
    async with cluster(tmp_path, ("a", "b"), STEERWAY_RUNNER="far") as c:
        a, b = c.nodes
        async with (
            raw_runner(b, "far") as runner,
            reader(a, "conv", 0) as on_a,  # first: a takes the lease
            reader(b, "conv", 0) as on_b,
        ):
            ack = await on_a.send("go", "m1")
            assert await owner(c, "conv") == "a"
            await assigned(runner, ack["run_id"])
            await on_b.until("run.started", run_id=ack["run_id"])  # stored: a's run to end
            started = time.monotonic()
            await a.kill()
            await runner.expect("run.cancel", within=WITHIN, run_id=ack["run_id"])
            assert time.monotonic() - started < LEASE_S
            ended = await on_b.until("run.ended", run_id=ack["run_id"])
            assert (ended["status"], ended["reason"]) == ("failed", "node_lost")
            # b owns the conversation now, and its runner serves the next run
            again = await on_b.send("again", "m2")
            await assigned(runner, again["run_id"])


async def test_a_runner_that_leaves_its_node_fails_the_owners_run_runner_lost(
    tmp_path: Path,
) -> None:
    """The runner disconnects from b: a hears it at once (not a lease time later)."""
    async with cluster(tmp_path, ("a", "b"), STEERWAY_RUNNER="far") as c:
        a, b = c.nodes
        async with reader(a, "conv", 0) as on_a:
            async with raw_runner(b, "far") as runner:
                ack = await on_a.send("go", "m1")
                assert await owner(c, "conv") == "a"
                await assigned(runner, ack["run_id"])
                started = time.monotonic()
            ended = await on_a.until("run.ended", run_id=ack["run_id"])
            assert time.monotonic() - started < 1.0  # told at once, not found out later
            assert (ended["status"], ended["reason"]) == ("failed", "runner_lost")
