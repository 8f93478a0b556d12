"""Presence across cluster nodes (issue 15, item 3): real `steerway serve` nodes on one
redis-server; a client on one node sees the clients of another come, type and go, and
the clients of a node killed with SIGKILL are gone within the liveness timeout."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
import websockets

from tests.cluster import cluster
from tests.processes import GatewayProcess, Reader

pytestmark = pytest.mark.slow


@contextlib.asynccontextmanager
async def present(node: GatewayProcess, cid: str, label: str) -> AsyncIterator[Reader]:
    url = f"{node.ws}/ws/conversations/{cid}?presence=1&client={label}"
    async with websockets.connect(url) as ws:
        r = Reader(ws)
        await r.until("ready")
        yield r


async def test_presence_crosses_nodes_and_a_killed_node_s_clients_are_gone(
    tmp_path: Path,
) -> None:
    # liveness timeout 1 + 1 s: a lost node's clients are gone within 2 s (plus a refresh)
    liveness = {"STEERWAY_WS_PING_INTERVAL_S": "1", "STEERWAY_WS_PING_TIMEOUT_S": "1"}
    async with cluster(tmp_path, names=("a", "b"), **liveness) as c:
        a, b = c.nodes
        async with present(a, "room", "on-a") as on_a:
            await on_a.until("presence", client="on-a")
            async with present(b, "room", "on-b") as on_b:
                # each learns of the other through Redis: b of a at once, not at a refresh
                await on_b.until("presence", client="on-a", state="watching")
                await on_a.until("presence", client="on-b", state="watching")
                await on_b.ws.send(orjson.dumps({"type": "presence", "state": "typing"}).decode())
                await on_a.until("presence", client="on-b", state="typing")
                assert not [f for f in on_a.frames if f["type"] == "presence" and "offset" in f]
                started = time.monotonic()
                await b.kill()
                await on_a.until("presence", client="on-b", state="gone")
                assert time.monotonic() - started < 2.0 + 1.0
