"""Persistence with real processes (issue 4, items 3 and 4): the embedded nx-27017
store is the default, data survives a restart and a `kill -9` of both processes, and a
gateway killed mid-run is taken over by the next one on the same store."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import httpx

from store.embedded import EmbeddedMongo
from tests.processes import GatewayProcess, alive, reader, spawn_gateway

WITHIN = 20.0
ENV = {"STEERWAY_STORE": "auto", "STEERWAY_MONGODB_URI": "", "STEERWAY_ECHO_DELAY_MS": "1"}


@contextlib.asynccontextmanager
async def gateway(data_dir: Path) -> AsyncIterator[GatewayProcess]:
    proc = await spawn_gateway("--data-dir", str(data_dir), env=ENV)
    try:
        yield proc
    finally:
        await proc.kill()  # a no-op when the test already stopped it


def nx_pid(data_dir: Path) -> int:
    return int((data_dir / "nx-27017.pid").read_text().strip())


async def test_embedded_store_is_the_default_and_survives_restarts_and_kill_9(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    async with gateway(data) as proc:
        assert any("embedded nx-27017" in line for line in proc.lines)
        async with reader(proc, "p", after=0) as r:
            ack = await r.send("hello world", "m1")
            await r.until("run.ended", run_id=ack["run_id"])
            head = r.offsets()[-1]
        pid = nx_pid(data)
        assert alive(pid)
        assert await proc.terminate() == 0
    assert not alive(pid)  # stopped with the gateway

    async with gateway(data) as proc:
        async with httpx.AsyncClient(base_url=proc.http, timeout=WITHIN) as http:
            stored = (await http.get("/api/conversations/p/events?after=0")).json()
            assert stored["head"] == head
            assert [e["offset"] for e in stored["events"]] == list(range(1, head + 1))
            again = await http.post(
                "/api/conversations/p/messages", json={"client_msg_id": "m1", "text": "x"}
            )
            assert again.json() == {**ack, "duplicate": True}
        async with reader(proc, "p", after=head) as r:
            ack2 = await r.send("second", "m2")
            assert ack2["offset"] == head + 1  # no offset reused, none skipped
            await r.until("run.ended", run_id=ack2["run_id"])
            head2 = r.offsets()[-1]
        # Both die by SIGKILL, nx first (killed alone, the gateway would have it exit
        # cleanly through its parent-death signal): nx leaves its pid file behind.
        os.kill(nx_pid(data), signal.SIGKILL)
        await proc.kill()

    assert (data / "nx-27017.pid").exists()
    async with gateway(data) as proc:
        async with httpx.AsyncClient(base_url=proc.http, timeout=WITHIN) as http:
            stored = (await http.get("/api/conversations/p/events?after=0")).json()
            assert stored["head"] == head2
            assert (await http.get("/readyz")).status_code == 200
        assert await proc.terminate() == 0


async def test_a_gateway_killed_mid_run_is_taken_over_by_the_next(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with gateway(data) as proc, reader(proc, "k", after=0) as r:
        first = await r.send("/sleep 600", "a1")  # active, never pulls steering
        steer = await r.send("carry me", "a2")
        queued = await r.send("queued one", "a3", mode="queue")
        assert (first["route"], steer["route"], queued["route"]) == ("run", "steer", "queue")
        await r.until("run.queued", run_id=queued["run_id"])
        head = r.offsets()[-1]
        assert r.offsets() == list(range(1, head + 1))
        await proc.kill()  # kill -9, mid-run

    async with gateway(data) as proc, reader(proc, "k", after=head) as r:
        ended = await r.until("run.ended", run_id=first["run_id"])
        assert ended["offset"] == head + 1
        assert (ended["status"], ended["reason"]) == ("failed", "gateway_restart")
        assert ended["error"]["retryable"] is True
        follow = await r.until("run.started")
        assert follow["trigger_message_ids"] == [steer["message_id"]]
        done = await r.until("message.completed", run_id=follow["run_id"])
        assert done["message"]["content"] == "echo: carry me"
        await r.until("run.started", run_id=queued["run_id"])
        done2 = await r.until("message.completed", run_id=queued["run_id"])
        assert done2["message"]["content"] == "echo: queued one"
        await r.until("run.ended", run_id=queued["run_id"])
        assert r.offsets() == list(range(head + 1, r.offsets()[-1] + 1))
        for key, ack in (("a1", first), ("a2", steer), ("a3", queued)):
            assert await r.send("resent", key) == {**ack, "duplicate": True}
        ends = [f["run_id"] for f in r.frames if f["type"] == "run.ended"]
        assert ends.count(first["run_id"]) == 1

    async with gateway(data) as proc, reader(proc, "k", after=0) as r:
        # a fresh reader sees one consistent stream from the start
        await r.until("run.ended", run_id=queued["run_id"])
        assert r.offsets()[: head + 1] == list(range(1, head + 2))
        async with httpx.AsyncClient(base_url=proc.http, timeout=WITHIN) as http:
            doc = (await http.get(f"/api/runs/{first['run_id']}")).json()
            assert (doc["status"], doc["reason"]) == ("failed", "gateway_restart")


async def test_while_the_store_is_down_messages_get_503_and_nothing_acked_is_lost(
    tmp_path: Path,
) -> None:
    server = await EmbeddedMongo.start(tmp_path / "nx")
    port = int(server.uri.split(":")[2].split("/")[0])
    try:
        proc = await spawn_gateway("--store", server.uri, env=ENV)
        try:
            async with httpx.AsyncClient(base_url=proc.http, timeout=WITHIN) as http:
                post = "/api/conversations/down/messages"
                one = await http.post(post, json={"client_msg_id": "m1", "text": "a b"})
                assert one.status_code == 200
                await server.stop()  # the store goes away

                refused = await http.post(post, json={"client_msg_id": "m2", "text": "c"})
                assert refused.status_code == 503
                assert refused.json()["error"]["code"] == "internal"
                assert (await http.get("/readyz")).status_code == 503

                server = await EmbeddedMongo.start(tmp_path / "nx", port=port)  # it is back
                assert (await http.get("/readyz")).status_code == 200
                two = await http.post(post, json={"client_msg_id": "m2", "text": "c"})
                assert two.status_code == 200
                assert two.json()["duplicate"] is False  # the refused key stayed free
                events = (await http.get("/api/conversations/down/events?after=0")).json()
                messages = [e for e in events["events"] if e["type"] == "user.message"]
                assert [m["client_msg_id"] for m in messages] == ["m1", "m2"]
                offsets = [e["offset"] for e in events["events"]]
                assert offsets == list(range(1, len(offsets) + 1))
            assert await proc.terminate() == 0
        finally:
            await proc.kill()
    finally:
        await server.stop()
