"""Graceful shutdown on SIGTERM, with a real process (issue 7, item 6): the gateway
stops accepting, closes its clients with 1001, lets active runs go on for the grace
period, then ends the rest `failed`/`shutdown` through the actor, flushes every write,
stops its embedded store and exits 0. The next gateway on the store has every event,
runs what was queued, and the clients resume with `after`."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from tests.processes import alive, spawn_gateway
from tests.test_persistence import ENV, WITHIN, Reader, gateway, nx_pid, reader

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
