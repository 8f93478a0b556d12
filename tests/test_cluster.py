"""Cluster mode with real processes (issue 12): three `steerway serve` nodes on one
redis-server and one shared nx-27017; nginx as a round-robin balancer for the
end-to-end test. Every server is started on a free port and stopped by its pid."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import websockets
from redis.asyncio import Redis

from tests.cluster import LEASE_S, WITHIN, cluster, start_nginx
from tests.processes import GatewayProcess, Reader, reader

pytestmark = pytest.mark.slow


def events(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [f for f in frames if "offset" in f and f["type"] not in ("ack",)]


async def stored(node: GatewayProcess, cid: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=node.http, timeout=WITHIN) as http:
        body = (await http.get(f"/api/conversations/{cid}/events?after=0&limit=5000")).json()
    return list(body["events"])


async def post(
    node: GatewayProcess, cid: str, key: str, text: str, **fields: Any
) -> httpx.Response:
    async with httpx.AsyncClient(base_url=node.http, timeout=WITHIN) as http:
        return await http.post(
            f"/api/conversations/{cid}/messages",
            json={"client_msg_id": key, "text": text, **fields},
        )


async def run_doc(node: GatewayProcess, run_id: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=node.http, timeout=WITHIN) as http:
        return dict((await http.get(f"/api/runs/{run_id}")).json())


def assert_stream(reader: Reader, after: int = 0) -> list[int]:
    """Every offset after `after` once, ascending, no gap (a merged delta covers its range)."""
    seen: list[int] = []
    for frame in reader.frames:
        if frame["type"] in ("ready", "ack", "error", "pong"):
            continue
        first = frame.get("first_offset", frame["offset"])
        seen.extend(range(first, frame["offset"] + 1))
    assert seen == list(range(after + 1, after + 1 + len(seen))), seen
    return seen


async def test_one_stream_and_one_writer_across_nodes(tmp_path: Path) -> None:
    """Items 1-3: clients of one conversation on three nodes get the same events with the
    same offsets; a message sent through another node is run by the owner and acked
    through the sender's node once stored; idempotency holds across nodes; steering
    through B reaches the run on A; a cancel through C ends it within 1 s."""
    async with cluster(tmp_path) as c:
        a, b, cc = c.nodes
        async with (
            reader(a, "conv", 0) as on_a,
            reader(b, "conv", 0) as on_b,
            reader(cc, "conv", 0) as on_c,
        ):
            first = await on_a.send("one two three", "m1")  # a takes the lease
            assert first["route"] == "run"
            await on_b.until("run.ended", run_id=first["run_id"])
            await on_c.until("run.ended", run_id=first["run_id"])
            # junk on a's request channel is logged and skipped
            junk = Redis(port=c.redis.port)
            try:
                for data in (b"", b"{}", b'{"kind":"submit","id":1}', b"\xff", b"[" * 100_000):
                    await junk.publish("steerway:n:a", data)
            finally:
                await junk.aclose()
            # a message through b: forwarded to a, acked on b once stored
            second = await on_b.send("/sleep 30", "m2")
            assert (second["route"], second["duplicate"]) == ("run", False)
            await on_a.until("run.started", run_id=second["run_id"])
            # the same key through c: the first ack, duplicate
            again = await on_c.send("anything else", "m2")
            assert again == {**second, "duplicate": True}
            # steering through c reaches the run on a
            steer = await on_c.send("faster", "m3")
            assert (steer["route"], steer["run_id"]) == ("steer", second["run_id"])
            # cancel through b ends it within 1 s
            started = time.monotonic()
            await on_b.ws.send(orjson.dumps({"type": "cancel"}).decode())
            ended = await on_c.until("run.ended", run_id=second["run_id"])
            assert time.monotonic() - started < 1.0
            assert (ended["status"], ended["reason"]) == ("cancelled", "cancel_requested")
            dropped = await on_a.until("steering.dropped", run_id=second["run_id"])
            assert dropped["message_ids"] == [steer["message_id"]]
            # an interrupt through c ends a run on a within 1 s and starts its own
            third = await on_a.send("/sleep 30", "m4")
            await on_c.until("run.started", run_id=third["run_id"])
            started = time.monotonic()
            fourth = await on_c.send("instead", "m5", mode="interrupt")
            assert fourth["route"] == "interrupt"
            stopped = await on_b.until("run.ended", run_id=third["run_id"])
            assert time.monotonic() - started < 1.0
            assert (stopped["status"], stopped["reason"]) == ("cancelled", "interrupted")
            ended = await on_b.until("run.ended", run_id=fourth["run_id"])
            head = ended["offset"]
            for r in (on_a, on_b, on_c):
                await r.until("run.ended", run_id=fourth["run_id"])
                assert assert_stream(r)[-1] >= head
            texts = [
                [
                    f
                    for f in r.frames
                    if "offset" in f and f["type"] != "ack" and f["offset"] <= head
                ]
                for r in (on_a, on_b, on_c)
            ]
            assert texts[0] == texts[1] == texts[2]  # the same events, the same offsets
        log = await stored(cc, "conv")
        assert [e["offset"] for e in log] == list(range(1, len(log) + 1))
        assert [e for e in log if e["type"] == "user.message"][1]["client_msg_id"] == "m2"
        assert len([e for e in log if e["type"] == "user.message"]) == 5  # m2 once
        # `after` resumes on any node with exactly what followed
        async with reader(b, "conv", 3) as resumed:
            await resumed.until("run.ended", run_id=fourth["run_id"])
            assert assert_stream(resumed, 3)[0] == 4


async def test_a_killed_owner_is_taken_over_and_clients_resume_through_the_balancer(
    tmp_path: Path,
) -> None:
    """Item 5, end to end behind nginx (round robin, no stickiness): `kill -9` of the
    owner; within the lease time another node takes the conversation over: the active run
    ends failed/node_lost, waiting steering becomes a follow-up run, the queued run goes
    on, no acknowledged message is lost, and a client of the dead node reconnects
    through the balancer with `after` and misses nothing."""
    async with cluster(tmp_path) as c:
        a, b, cc = c.nodes
        lb = await start_nginx(tmp_path / "nginx", [n.port for n in c.nodes])
        try:
            async with reader(a, "k", 0) as on_a, reader(b, "k", 0) as on_b:
                run = await on_a.send("/sleep 60", "m1")  # a owns "k"
                await on_b.until("run.started", run_id=run["run_id"])
                steer = await on_b.send("waiting steering", "m2")
                assert (steer["route"], steer["run_id"]) == ("steer", run["run_id"])
                queued = await on_b.send("after it", "m3", mode="queue")
                assert queued["route"] == "queue"
                await on_a.until("run.queued", run_id=queued["run_id"])
                seen_by_a = assert_stream(on_a)[-1]

                killed = time.monotonic()
                await a.kill()
                ended = await on_b.until("run.ended", run_id=run["run_id"])
                took = time.monotonic() - killed
                assert took < LEASE_S, f"taken over after {took:.1f} s"
                assert (ended["status"], ended["reason"]) == ("failed", "node_lost")
                assert ended["error"]["code"] == "node_lost"
                follow = await on_b.until("run.started", trigger_message_ids=[steer["message_id"]])
                await on_b.until("run.ended", run_id=follow["run_id"])
                await on_b.until("run.started", run_id=queued["run_id"])
                last = await on_b.until("run.ended", run_id=queued["run_id"])
                assert last["status"] == "completed"
                assert assert_stream(on_b)[-1] == last["offset"]

            # the dead node's client comes back through the balancer, from where it was
            async with reader(lb, "k", seen_by_a) as back:
                await back.until("run.ended", run_id=queued["run_id"])
                assert assert_stream(back, seen_by_a)[-1] == last["offset"]
            log = await stored(b, "k")
            assert [e["offset"] for e in log] == list(range(1, len(log) + 1))
            keys = [e["client_msg_id"] for e in log if e["type"] == "user.message"]
            assert keys == ["m1", "m2", "m3"]  # every acknowledged message, once
            assert (await run_doc(cc, run["run_id"]))["reason"] == "node_lost"
            # REST through the balancer reaches whichever node, and is routed to the owner
            async with httpx.AsyncClient(base_url=lb.http, timeout=WITHIN) as http:
                for i in range(4):
                    got = await http.post(
                        "/api/conversations/k/messages",
                        json={"client_msg_id": f"r{i}", "text": "x", "mode": "queue"},
                    )
                    assert got.status_code == 200, got.text
        finally:
            await lb.stop()


async def test_a_paused_owner_loses_its_lease_and_writes_nothing_when_it_wakes(
    tmp_path: Path,
) -> None:
    """Item 2, fencing: SIGSTOP the owner past its lease; another node takes over; on
    SIGCONT the old owner writes nothing more and forwards to the new one."""
    async with cluster(tmp_path, names=("a", "b")) as c:
        a, b = c.nodes
        async with reader(b, "p", 0) as on_b:
            run = await on_b.send("/sleep 60", "m1")
            # b forwarded it, or took it: make a the owner through a's own client
            holder = await c.holder("p")
            owner, other = (a, b) if holder == "a" else (b, a)
            os.kill(owner.proc.pid, signal.SIGSTOP)
            try:
                async with reader(other, "p", 0) as watch:
                    ended = await watch.until("run.ended", run_id=run["run_id"])
                    assert ended["reason"] == "node_lost"
            finally:
                os.kill(owner.proc.pid, signal.SIGCONT)
            # the woken node forwards to the lease holder; nothing is written twice
            got = await post(owner, "p", "m2", "after the pause", mode="queue")
            assert got.status_code == 200, got.text
            log = await stored(other, "p")
            assert [e["offset"] for e in log] == list(range(1, len(log) + 1))
            ends = [e for e in log if e["type"] == "run.ended" and e["run_id"] == run["run_id"]]
            assert len(ends) == 1
            assert got.json()["offset"] > ended["offset"]


async def test_redis_down_refuses_new_work_and_recovers_with_no_gap(tmp_path: Path) -> None:
    """Item 6: with Redis gone, nodes are not ready and refuse messages (internal/503)
    rather than lose them; when a new, empty Redis comes back on the same port, leases
    and subscriptions are rebuilt by themselves and no stream has a gap."""
    async with cluster(tmp_path, names=("a", "b")) as c:
        a, b = c.nodes
        async with reader(a, "r", 0) as on_a, reader(b, "r", 0) as on_b:
            first = await on_a.send("one two three", "m1")
            await on_b.until("run.ended", run_id=first["run_id"])
            await c.redis.stop()
            async with httpx.AsyncClient(timeout=WITHIN) as http:
                for node in (a, b):
                    await until_status(http, f"{node.http}/readyz", 503)
                refused = await post(b, "r", "m2", "while redis is down")
                assert refused.status_code == 503
                assert refused.json()["error"]["code"] == "internal"
                await c.redis.start()  # empty: it keeps nothing on disk
                for node in (a, b):
                    await until_status(http, f"{node.http}/readyz", 200)
            again = await on_b.send("after redis", "m2")
            assert again["duplicate"] is False  # the refused key stayed free
            await on_a.until("run.ended", run_id=again["run_id"])
            await on_b.until("run.ended", run_id=again["run_id"])
            assert assert_stream(on_a) == assert_stream(on_b)
        log = await stored(a, "r")
        assert [e["offset"] for e in log] == list(range(1, len(log) + 1))


async def until_status(http: httpx.AsyncClient, url: str, status: int) -> None:
    """Poll a readiness endpoint until it answers `status` (it has no event to wait on)."""
    async with asyncio.timeout(WITHIN):
        while True:
            try:
                if (await http.get(url)).status_code == status:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)


async def test_a_draining_node_hands_its_conversations_over(tmp_path: Path) -> None:
    """SIGTERM of one node: its clients get 1001, its active run gets the grace and ends
    failed/shutdown, and once it has released its leases another node goes on with the
    queued run at once, well within the lease time."""
    async with cluster(tmp_path, names=("a", "b"), STEERWAY_SHUTDOWN_GRACE_S="1") as c:
        a, b = c.nodes
        async with reader(a, "d", 0) as on_a, reader(b, "d", 0) as on_b:
            run = await on_a.send("/sleep 60", "m1")
            assert await c.holder("d") == "a"
            queued = await on_a.send("next one", "m2", mode="queue")
            await on_b.until("run.queued", run_id=queued["run_id"])
            a.proc.send_signal(signal.SIGTERM)
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await on_a.until("never")
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 1001
            ended = await on_b.until("run.ended", run_id=run["run_id"])
            assert (ended["status"], ended["reason"]) == ("failed", "shutdown")
            # (one SIGTERM: a second would be a request to stop at once)
            assert await asyncio.wait_for(a.proc.wait(), WITHIN) == 0
            stopped = time.monotonic()
            await on_b.until("run.started", run_id=queued["run_id"])
            # it said it left: b did not wait for its next sweep (every half lease time)
            assert time.monotonic() - stopped < LEASE_S / 2
            last = await on_b.until("run.ended", run_id=queued["run_id"])
            assert last["status"] == "completed"
            assert assert_stream(on_b)[-1] == last["offset"]
        assert await c.holder("d") == "b"
        async with httpx.AsyncClient(base_url=b.http, timeout=WITHIN) as http:
            scrape = (await http.get("/metrics")).text
        assert "steerway_cluster_leases 1.0" in scrape.splitlines()
