"""Graceful shutdown on SIGTERM, with a real process (issue 7, item 6): the gateway
stops accepting, closes its clients with 1001, lets active runs go on for the grace
period, then ends the rest `failed`/`shutdown` through the actor, flushes every write,
stops its embedded store and exits 0. The next gateway on the store has every event,
runs what was queued, and the clients resume with `after`. Remote runners keep their
socket through the grace (issue 11, item 8)."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from tests.processes import Reader, alive, reader, spawn_gateway
from tests.remote import raw_runner
from tests.test_persistence import ENV, WITHIN, gateway, nx_pid
from tests.test_remote_runners import complete

GRACE_S = 4


async def closed_1001(r: Reader) -> None:
    with pytest.raises(ConnectionClosed) as closed:
        await r.until("nothing comes but the close")
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1001, "server shutting down")


async def test_sigterm_closes_1001_gives_runs_their_grace_then_ends_the_rest(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    env = {**ENV, "STEERWAY_ECHO_DELAY_MS": "200", "STEERWAY_SHUTDOWN_GRACE_S": str(GRACE_S)}
    proc = await spawn_gateway("--data-dir", str(data), env=env)
    try:
        async with reader(proc, "quick", after=0) as q, reader(proc, "stuck", after=0) as s:
            quick = await q.send("one two three four", "q1")  # about a second to go
            await q.until("message.delta", run_id=quick["run_id"])
            stuck = await s.send("/sleep 600", "s1")  # never looks at its cancel signal
            steer = await s.send("left over", "s2")
            queued = await s.send("queued one", "s3", mode="queue")
            assert (steer["route"], queued["route"]) == ("steer", "queue")
            await s.until("run.queued", run_id=queued["run_id"])
            seen = {"quick": q.offsets()[-1], "stuck": s.offsets()[-1]}
            pid = nx_pid(data)

            proc.proc.send_signal(signal.SIGTERM)
            await closed_1001(q)
            await closed_1001(s)
            with pytest.raises(httpx.ConnectError):  # no longer accepting
                async with httpx.AsyncClient(base_url=proc.http, timeout=WITHIN) as http:
                    await http.get("/healthz")
        assert await proc.terminate() == 0
    finally:
        await proc.kill()
    assert not alive(pid)  # the embedded store was stopped
    log = "".join(proc.lines)
    assert "Traceback" not in log

    async with (
        gateway(data) as proc,
        reader(proc, "quick", after=seen["quick"]) as q,
        reader(proc, "stuck", after=seen["stuck"]) as s,
    ):
        # the quick run finished within the grace period
        done = await q.until("run.ended", run_id=quick["run_id"])
        assert done["status"] == "completed"
        content = (await q.until("message.completed", run_id=quick["run_id"]))["message"]
        assert content["content"] == "echo: one two three four"
        assert q.offsets() == list(range(seen["quick"] + 1, done["offset"] + 1))

        # the stuck one ended failed/shutdown as the grace ran out, its leftover steering
        # as a follow-up that could not run either; the queued run waited for this gateway
        ended = await s.until("run.ended", run_id=stuck["run_id"])
        assert (ended["status"], ended["reason"]) == ("failed", "shutdown")
        assert ended["error"] == {
            "code": "shutdown",
            "message": "the gateway shut down before the run ended",
            "retryable": True,
        }
        follow = await s.until("run.started", offset=ended["offset"] + 1)
        assert follow["trigger_message_ids"] == [steer["message_id"]]
        follow_end = await s.until("run.ended", run_id=follow["run_id"])
        assert (follow_end["offset"], follow_end["reason"]) == (follow["offset"] + 1, "shutdown")
        await s.until("run.started", run_id=queued["run_id"])
        again = await s.until("message.completed", run_id=queued["run_id"])
        assert again["message"]["content"] == "echo: queued one"
        await s.until("run.ended", run_id=queued["run_id"])
        assert s.offsets() == list(range(seen["stuck"] + 1, s.offsets()[-1] + 1))
        async with httpx.AsyncClient(base_url=proc.http, timeout=WITHIN) as http:
            doc = (await http.get(f"/api/runs/{stuck['run_id']}")).json()
            assert (doc["status"], doc["reason"]) == ("failed", "shutdown")
        assert await proc.terminate() == 0


async def test_sigterm_gives_remote_runs_their_grace_and_places_no_new_one(
    tmp_path: Path,
) -> None:
    """Issue 11, item 8: the runner socket stays open through the grace. A remote run that
    finishes in it completes; one that outlasts it ends `failed`/`shutdown`, its runner
    told `run.cancel` before the socket closes 1001; a run that waited for a runner, and
    one that started during the grace, are not placed: the next gateway runs them."""
    data = tmp_path / "data"
    env = {**ENV, "STEERWAY_RUNNER": "far", "STEERWAY_SHUTDOWN_GRACE_S": str(GRACE_S)}
    proc = await spawn_gateway("--data-dir", str(data), env=env)
    try:
        async with (
            raw_runner(proc, max_concurrency=2) as runner,
            reader(proc, "x", after=0) as x,
            reader(proc, "y", after=0) as y,
            reader(proc, "z", after=0) as z,
        ):
            quick = await x.send("finishes in the grace", "a")
            await runner.expect("run.assign", run_id=quick["run_id"])
            behind = await x.send("queued behind it", "c", mode="queue")
            await x.until("run.queued", run_id=behind["run_id"])
            stuck = await y.send("outlasts the grace", "d")
            await runner.expect("run.assign", run_id=stuck["run_id"])
            waiting = await z.send("no runner is free", "b")  # the runner is full

            proc.proc.send_signal(signal.SIGTERM)
            for r in (x, y, z):  # clients are closed at once, the runner is not
                await closed_1001(r)
            await complete(runner, quick["run_id"], "done in time")
            cancel = await runner.expect("run.cancel", within=GRACE_S + WITHIN)
            assert cancel == {"type": "run.cancel", "run_id": stuck["run_id"]}
            assert await runner.closed() == 1001
            assert runner.ws.close_reason == "server shutting down"
            sent = [(f["type"], f.get("run_id")) for f in runner.frames]
            assert [s for s in sent if s[0] in ("run.assign", "run.cancel")] == [
                ("run.assign", quick["run_id"]),
                ("run.assign", stuck["run_id"]),
                ("run.cancel", stuck["run_id"]),
            ]
        assert await proc.terminate() == 0
    finally:
        await proc.kill()
    log = "".join(proc.lines)
    assert "Traceback" not in log

    proc = await spawn_gateway("--data-dir", str(data), env=env)
    try:
        async with (
            reader(proc, "x", after=0) as x,
            reader(proc, "y", after=0) as y,
            reader(proc, "z", after=0) as z,
            raw_runner(proc, max_concurrency=2) as runner,
        ):
            done = await x.until("run.ended", run_id=quick["run_id"])
            assert done["status"] == "completed"
            content = (await x.until("message.completed", run_id=quick["run_id"]))["message"]
            assert content["content"] == "done in time"
            ended = await y.until("run.ended", run_id=stuck["run_id"])
            assert (ended["status"], ended["reason"]) == ("failed", "shutdown")
            assert ended["error"]["code"] == "shutdown"
            # neither was started by the first gateway: this one runs them
            for r, ack, before in ((x, behind, ["run.queued"]), (z, waiting, [])):
                await runner.expect("run.assign", run_id=ack["run_id"])
                await complete(runner, ack["run_id"], "later")
                end = await r.until("run.ended", run_id=ack["run_id"])
                assert end["status"] == "completed"
                kinds = [f["type"] for f in r.frames if f.get("run_id") == ack["run_id"]]
                after = ["run.started", "message.completed", "run.ended"]
                assert kinds == ["user.message", *before, *after]
            for r in (x, y, z):
                assert r.offsets() == list(range(1, r.offsets()[-1] + 1))
                assert "runner_lost" not in str(r.frames)
        assert await proc.terminate() == 0
    finally:
        await proc.kill()
