"""The dashboard of a cluster (issue 12, item 7), with real processes: a dashboard on any
node sees every node's runs (each naming its node), the clients of every node summed,
and every node's figures; a lost node's clients and figures go with it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import websockets

from tests.cluster import WITHIN, cluster
from tests.processes import GatewayProcess, reader

pytestmark = pytest.mark.slow


class Dashboard:
    def __init__(self, ws: websockets.ClientConnection) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []

    async def until(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The first frame so far or to come that matches."""
        for frame in self.frames:
            if predicate(frame):
                return frame
        async with asyncio.timeout(WITHIN):
            while True:
                frame = orjson.loads(await self.ws.recv())
                self.frames.append(frame)
                if predicate(frame):
                    return frame


@contextlib.asynccontextmanager
async def dashboard(node: GatewayProcess) -> AsyncIterator[Dashboard]:
    async with websockets.connect(f"{node.ws}/ws/dashboard", max_size=None) as ws:
        dash = Dashboard(ws)
        snapshot = await dash.until(lambda f: True)
        assert snapshot["type"] == "snapshot", snapshot
        yield dash


def names(nodes: list[dict[str, Any]]) -> list[str]:
    return [n["name"] for n in nodes]


def clients_of(cid: str, count: int) -> Callable[[dict[str, Any]], bool]:
    def match(f: dict[str, Any]) -> bool:
        if f["type"] == "snapshot":
            return bool(f["clients"].get(cid, 0) == count)
        return f["type"] == "clients.updated" and (f["conversation_id"], f["count"]) == (
            cid,
            count,
        )

    return match


async def test_a_dashboard_on_any_node_sees_the_whole_cluster(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        a, b, cc = c.nodes
        async with dashboard(b) as on_b:
            snapshot = on_b.frames[0]
            assert snapshot["node"]["name"] == "b"
            assert names(snapshot["nodes"]) == ["a", "b", "c"]
            async with reader(a, "far", 0) as client_a:
                # a client on a: b's dashboard counts it
                await on_b.until(clients_of("far", 1))
                ack = await client_a.send("one two three", "m1")  # a runs it
                ended = await on_b.until(
                    lambda f: (
                        f["type"] == "run.updated"
                        and f["run"]["run_id"] == ack["run_id"]
                        and f["run"]["status"] == "completed"
                    )
                )
                assert ended["run"]["node"] == "a"
                # the owner's conversation.updated reaches b's dashboard too
                await on_b.until(
                    lambda f: (
                        f["type"] == "conversation.updated"
                        and f["conversation"]["conversation_id"] == "far"
                        and f["conversation"]["active_run"] is None
                        and f["conversation"]["head"] > 0
                    )
                )
                # a client on c as well: the cluster's total
                c_client = reader(cc, "far", 0)
                await c_client.__aenter__()
                await on_b.until(clients_of("far", 2))
                figures = await on_b.until(
                    lambda f: (
                        f["type"] == "nodes.updated"
                        and [n["clients"] for n in f["nodes"]] == [1, 0, 1]
                    )
                )
                assert names(figures["nodes"]) == ["a", "b", "c"]
                assert [n["conversations"] for n in figures["nodes"]] == [1, 0, 0]

                # a node started now learns the others' clients (hello, then counts)
                d = await c.add("d")
                async with dashboard(d) as on_d:
                    await on_d.until(clients_of("far", 2))
                    snap = on_d.frames[0]
                    assert any(r["run_id"] == ack["run_id"] for r in snap["runs"])
                    assert (
                        next(r for r in snap["runs"] if r["run_id"] == ack["run_id"])["node"] == "a"
                    )

                # c is lost: its clients and its figures go with it
                await cc.kill()
                with contextlib.suppress(Exception):
                    await c_client.__aexit__(None, None, None)
                await on_b.until(clients_of("far", 1))
                gone = await on_b.until(
                    lambda f: f["type"] == "nodes.updated" and "c" not in names(f["nodes"])
                )
                assert names(gone["nodes"]) == ["a", "b", "d"]
