"""The dashboard socket, PROTOCOL.md section 9 (issue 5, item 4), over the real server.

A snapshot first, then live `run.updated`, `conversation.updated` (at most 4 a
second per conversation, the last one always current) and `clients.updated`;
every frame encoded once for every dashboard; bad input answered, a store
outage and a dashboard that stops reading handled.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import websockets

from gateway.dashboard import THROTTLE_S, DashboardSocket
from gateway.outbox import Outbox
from tests.conftest import TIMEOUT, Client, Gateway, run_gateway
from tests.helpers import END, Fed, completed, delta, expect, run_completed


@contextlib.asynccontextmanager
async def dashboard(gw: Gateway) -> AsyncIterator[Client]:
    """A dashboard client; `frames[0]` is its snapshot."""
    async with websockets.connect(
        f"ws://127.0.0.1:{gw.port}/ws/dashboard", max_size=None, open_timeout=TIMEOUT
    ) as ws:
        client = Client(ws)
        snapshot = await client.recv()
        assert snapshot["type"] == "snapshot", snapshot
        yield client


async def conversation_at(dash: Client, head: int) -> dict[str, Any]:
    """The conversation of the first `conversation.updated` (to come) at `head`."""
    frame = await dash.until(
        lambda f: f["type"] == "conversation.updated" and f["conversation"]["head"] == head
    )
    conversation: dict[str, Any] = frame["conversation"]
    return conversation


async def rest_run(http: httpx.AsyncClient, run_id: str) -> dict[str, Any]:
    response = await http.get(f"/api/runs/{run_id}")
    assert response.status_code == 200
    doc: dict[str, Any] = response.json()
    return doc


async def test_snapshot_holds_runs_conversations_clients_and_node() -> None:
    async with run_gateway() as gw, gw.client() as http, gw.connect("snap", after=0) as ws:
        await ws.message("one two", "m1")
        ended = await expect(ws, "run.ended")
        async with dashboard(gw) as dash:
            snap = dash.frames[0]
            assert set(snap) == {
                "type",
                "runs",
                "conversations",
                "clients",
                "node",
                "nodes",
                "presence",
            }
            assert snap["runs"] == [await rest_run(http, ended["run_id"])]
            assert snap["runs"][0]["node"] == gw.hub.node  # the node that ran it
            assert snap["conversations"] == [
                {
                    "conversation_id": "snap",
                    "head": ended["offset"],
                    "last_activity": snap["conversations"][0]["last_activity"],
                    "active_run": None,
                }
            ]
            assert snap["clients"] == {"snap": 1}
            # its one client, anonymous, is the one steering (it started the run)
            person = {
                "session_id": ws.frames[0]["session_id"],
                "user": "anonymous",
                "client": "",
                "state": "watching",
                "steering": True,
            }
            assert snap["presence"] == {"snap": [person]}
            node = snap["node"]
            assert node["name"] == gw.hub.node
            assert (node["protocol"], node["conversations"]) == (1, 1)
            assert node["started_at"] <= ended["ts"]
            assert (node["runs"], node["clients"]) == (0, 1)
            assert isinstance(node["events_per_s"], float)
            assert snap["nodes"] == [node]  # one node: this one


async def test_nodes_updated_gives_the_node_s_figures_every_second() -> None:
    words = " ".join(f"w{i}" for i in range(300))
    async with (
        run_gateway(echo_delay_ms=10) as gw,
        dashboard(gw) as dash,
        gw.connect("figures", after=0) as ws,
    ):
        await ws.message(words, "m1")
        await expect(ws, "run.started")
        busy = await dash.until(
            lambda f: f["type"] == "nodes.updated" and f["nodes"][0]["events_per_s"] > 0,
            within=10,
        )
        [node] = busy["nodes"]
        assert (node["name"], node["conversations"], node["clients"]) == (gw.hub.node, 1, 1)
        assert node["runs"] == 1
        await expect(ws, "run.ended", within=30)
        idle = await dash.until(
            lambda f: f["type"] == "nodes.updated" and f["nodes"][0]["runs"] == 0, within=10
        )
        assert idle["nodes"][0]["name"] == gw.hub.node


async def test_live_run_and_conversation_updates_end_with_the_stored_documents() -> None:
    fed = Fed()
    async with (
        run_gateway(runners=[fed], runner="fed") as gw,
        gw.client() as http,
        dashboard(gw) as dash,
        gw.connect("live", after=0) as ws,
    ):
        assert dash.frames[0]["runs"] == []
        await ws.message("go", "m1")
        started = await expect(ws, "run.started")
        run_id = started["run_id"]
        running = await expect(dash, "run.updated")
        assert running["run"]["run_id"] == run_id
        assert running["run"]["status"] == "running"

        await ws.message("steer", "m2")
        await expect(ws, "ack", client_msg_id="m2")
        waiting = await dash.until(
            lambda f: f["type"] == "run.updated" and f["run"]["steering"]["queued"] == 1
        )
        assert waiting["run"]["status"] == "running"
        update = await conversation_at(dash, started["offset"] + 1)
        assert update["active_run"] == {
            "run_id": run_id,
            "status": "running",
            "runner": "fed",
        }

        fed.put(delta("hi"), completed("hi"), run_completed())
        # the waiting steering becomes a follow-up run; end that one too
        follow = await expect(ws, "run.started", trigger_message_ids=[waiting_id(ws)])
        fed.put(END)
        last = await expect(ws, "run.ended", run_id=follow["run_id"])
        docs = {}
        while len(docs) < 2 or any(d["status"] == "running" for d in docs.values()):
            frame = await dash.until_type("run.updated")
            docs[frame["run"]["run_id"]] = frame["run"]
        assert docs[run_id] == await rest_run(http, run_id)
        assert docs[follow["run_id"]] == await rest_run(http, follow["run_id"])
        final = await conversation_at(dash, last["offset"])
        assert final["active_run"] is None


def waiting_id(ws: Client) -> str:
    message = next(f for f in ws.frames if f.get("client_msg_id") == "m2" and "route" in f)
    message_id: str = message["message_id"]
    return message_id


async def test_clients_updated_as_clients_come_and_go(gw: Gateway) -> None:
    async with dashboard(gw) as dash:
        async with gw.connect("people") as first:
            count = await dash.until_type("clients.updated", conversation_id="people")
            assert count["count"] == 1
            update = await expect(dash, "conversation.updated")
            assert update["conversation"]["conversation_id"] == "people"
            assert update["conversation"]["head"] == 0
            async with gw.connect("people"):
                await dash.until_type("clients.updated", conversation_id="people", count=2)
            await dash.until_type("clients.updated", conversation_id="people", count=1)
            await first.close()
        await dash.until_type("clients.updated", conversation_id="people", count=0)


async def test_conversation_updates_are_throttled_and_the_last_is_current() -> None:
    words = " ".join(f"w{i}" for i in range(400))
    async with run_gateway(echo_delay_ms=1) as gw, dashboard(gw) as dash:
        began = time.monotonic()
        async with gw.connect("busy", after=0) as ws:
            await ws.message(words, "m1")
            ended = await expect(ws, "run.ended", within=30)
            await conversation_at(dash, ended["offset"])
        elapsed = time.monotonic() - began
        updates = [f for f in dash.frames if f["type"] == "conversation.updated"]
        heads = [f["conversation"]["head"] for f in updates]
        assert heads == sorted(heads)
        assert len(updates) < ended["offset"]  # fewer updates than events: throttled
        # at most one per THROTTLE_S window, plus the first of each burst
        assert len(updates) <= elapsed / THROTTLE_S + 2, (len(updates), elapsed)


async def test_every_dashboard_gets_the_same_encoded_frame(gw: Gateway) -> None:
    feed = gw.hub.dashboard
    first, second = Outbox(), Outbox()
    feed.subscribe(first)
    feed.subscribe(second)
    try:
        feed.clients_changed("shared")
        one, two = await first.get(), await second.get()
        assert one is two
        assert one is not None
        assert one.text == '{"type":"clients.updated","conversation_id":"shared","count":0}'
    finally:
        feed.unsubscribe(first)
        feed.unsubscribe(second)


async def test_no_dashboard_no_work(gw: Gateway) -> None:
    """With nobody watching, the hooks build nothing and keep no state."""
    async with gw.connect("quiet", after=0) as ws:
        await ws.message("a b c", "m1")
        await expect(ws, "run.ended")
    feed = gw.hub.dashboard
    assert (feed._outboxes, feed._sent, feed._due, feed._nodes) == ({}, {}, {}, None)


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("nope", "invalid_json"),
        ("[1]", "invalid_frame"),
        ('{"type":"message","client_msg_id":"m1","text":"hi"}', "invalid_frame"),
        ('{"type":"cancel"}', "invalid_frame"),
        (b"\x00binary", "invalid_frame"),
    ],
)
async def test_bad_input_is_answered_and_the_feed_goes_on(
    gw: Gateway, frame: str | bytes, code: str
) -> None:
    async with dashboard(gw) as dash:
        await dash.send(frame)
        error = await dash.until_type("error")
        assert error["code"] == code
        assert error["message"]
        await dash.send({"type": "ping", "nonce": "still-here"})
        assert (await dash.until_type("pong"))["nonce"] == "still-here"
        async with gw.connect("after-bad"):
            await dash.until_type("clients.updated", conversation_id="after-bad")


async def test_store_outage_closes_with_an_error_then_recovers(gw: Gateway) -> None:
    url = f"ws://127.0.0.1:{gw.port}/ws/dashboard"
    gw.store.fail = True
    try:
        async with websockets.connect(url, open_timeout=TIMEOUT) as ws:
            client = Client(ws)
            error = await client.recv()
            assert (error["type"], error["code"]) == ("error", "internal")
            with pytest.raises(websockets.ConnectionClosedError) as closed:
                await client.recv()
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 1011
    finally:
        gw.store.fail = False
    async with dashboard(gw) as dash:
        assert dash.frames[0]["runs"] == []


async def test_a_dashboard_that_stops_reading_is_closed_4008(gw: Gateway) -> None:
    """The socket's writer is stuck in `send` while updates pile up past the bound:
    once `send` returns, the dashboard is closed as a slow consumer."""
    sent: list[dict[str, Any]] = []
    snapshot_sent, unblock, closed = asyncio.Event(), asyncio.Event(), asyncio.Event()
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "websocket.close":
            closed.set()
        elif message["type"] == "websocket.send":
            snapshot_sent.set()
            await unblock.wait()

    inbox.put_nowait({"type": "websocket.connect"})
    task = asyncio.create_task(
        DashboardSocket(gw.hub, gw.app.state.connections)(
            {"type": "websocket", "headers": []}, inbox.get, send
        )
    )
    await asyncio.wait_for(snapshot_sent.wait(), TIMEOUT)
    for n in range(gw.hub.settings.outbox_frames + 1):
        gw.hub.dashboard.clients_changed(f"c{n}")
    unblock.set()
    await asyncio.wait_for(closed.wait(), TIMEOUT)
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.send", "websocket.close"]
    assert sent[-1]["code"] == 4008
    inbox.put_nowait({"type": "websocket.disconnect", "code": 4008})
    await asyncio.wait_for(task, TIMEOUT)
    assert gw.hub.dashboard._outboxes == {}


async def test_dashboard_page_is_served(gw: Gateway) -> None:
    async with gw.client() as http:
        page = await http.get("/dashboard")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "/js/dashboard.js" in page.text
        chat = await http.get("/")
        assert chat.status_code == 200
        assert "/js/chat.js" in chat.text
