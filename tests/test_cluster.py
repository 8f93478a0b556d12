"""Cluster mode with real processes (issue 12): three `steerway serve` nodes on one
redis-server and one shared nx-27017; nginx as a round-robin balancer for the
end-to-end test. Every server is started on a free port and stopped by its pid."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.cluster import WITHIN, cluster
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
            head = ended["offset"]
            for r in (on_a, on_b, on_c):
                await r.until("run.ended", run_id=second["run_id"])
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
        assert len([e for e in log if e["type"] == "user.message"]) == 3  # m2 once
        # `after` resumes on any node with exactly what followed
        async with reader(b, "conv", 3) as resumed:
            await resumed.until("run.ended", run_id=second["run_id"])
            assert assert_stream(resumed, 3)[0] == 4
