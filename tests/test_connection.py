"""The client connection (PROTOCOL.md sections 2 and 3): `ready`, acks, idempotency,
offsets, and `after`."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import orjson
import pytest
import websockets

from gateway.config import Settings
from gateway.errors import ConfigError
from store.base import WriteBatch
from store.memory import MemoryStore
from tests.conftest import Client, Gateway, run_gateway
from tests.helpers import Event, Gated, ack_of, event_texts, expect, stored_events


class HeldStore(MemoryStore):
    """A memory store whose writes wait while `held`, to see what waits for them."""

    def __init__(self) -> None:
        super().__init__()
        self.open = asyncio.Event()
        self.open.set()
        self.waiting = asyncio.Event()  # a write is held

    async def write(self, batch: WriteBatch) -> None:
        if not self.open.is_set():
            self.waiting.set()
            await self.open.wait()
        await super().write(batch)


async def ping(client: Client, nonce: str) -> list[dict[str, Any]]:
    """Send a ping; return every frame received before its pong."""
    await client.send({"type": "ping", "nonce": nonce})
    start = len(client.frames)
    await client.until_type("pong", nonce=nonce)
    return client.frames[start:-1]


async def one_run(client: Client, text: str, key: str, **fields: Any) -> Event:
    """Send a message that starts a run, wait for the run to end; return its ack."""
    await client.message(text, key, **fields)
    ack = await ack_of(client, key)
    await expect(client, "run.ended", run_id=ack["run_id"])
    return ack


def offsets(client: Client) -> list[int]:
    return [e["offset"] for e in client.events()]


# --------------------------------------------------------------------------- ready


async def test_ready_is_the_first_frame_with_the_documented_fields(gw: Gateway) -> None:
    async with gw.connect("c1", ready=False) as a, gw.connect("c1", ready=False, after=0) as b:
        ready_a, ready_b = await a.recv(), await b.recv()
        for ready in (ready_a, ready_b):
            assert ready == {
                "type": "ready",
                "protocol": 1,
                "conversation_id": "c1",
                "session_id": ready["session_id"],
                "head": 0,
                "active_run": None,
                "queued_runs": 0,
            }
            assert re.fullmatch(r"[0-9a-f]{32}", ready["session_id"])
        assert ready_a["session_id"] != ready_b["session_id"]
        # The raw text is exactly that object, and nothing came before it.
        assert a.raw == [orjson.dumps(ready_a).decode()]
        assert await ping(a, "n") == []


async def test_ready_reports_head_active_run_and_queued_runs() -> None:
    runner = Gated()
    async with run_gateway(runners=[runner]) as gw, gw.connect("c2") as c:
        await c.message("A", "a", runner="gated")
        a = await ack_of(c, "a")
        await expect(c, "message.delta", delta="start A")
        await c.message("B", "b", mode="queue")
        b = await ack_of(c, "b")
        await expect(c, "run.queued", run_id=b["run_id"])
        async with gw.connect("c2", ready=False, after=2) as late:
            ready = await late.recv()
            assert ready == {
                "type": "ready",
                "protocol": 1,
                "conversation_id": "c2",
                "session_id": ready["session_id"],
                "head": 5,  # user.message, run.started, delta, user.message, run.queued
                "active_run": {"run_id": a["run_id"], "status": "running", "runner": "gated"},
                "queued_runs": 1,
            }
            # Then the replay: offsets 3..5, in order.
            replay = [await late.recv() for _ in range(3)]
            assert [(e["offset"], e["type"]) for e in replay] == [
                (3, "message.delta"),
                (4, "user.message"),
                (5, "run.queued"),
            ]
        runner.release(a["run_id"])
        runner.release(b["run_id"])
        await expect(c, "run.ended", run_id=b["run_id"])


# --------------------------------------------------------------------------- ack


async def test_ack_comes_only_once_the_message_is_stored() -> None:
    store = HeldStore()
    async with run_gateway(store=store) as gw, gw.connect("c3", after=0) as c:
        store.open.clear()
        await c.message("hello", "m1")
        await store.waiting.wait()
        # The connection goes on (a ping is answered), but neither the ack nor the
        # event is sent while the write is held.
        assert await ping(c, "held") == []
        assert await store.find_client_message("c3", "m1") is None
        store.open.set()
        ack = await ack_of(c, "m1")
        # When the ack arrives, the store holds the message it acknowledges.
        payload = await store.find_client_message("c3", "m1")
        assert payload is not None
        stored = orjson.loads(payload)
        assert (stored["offset"], stored["message_id"], stored["run_id"]) == (
            ack["offset"],
            ack["message_id"],
            ack["run_id"],
        )
        assert (stored["type"], stored["text"], stored["route"]) == ("user.message", "hello", "run")
        # The event the client got is byte-identical to what is stored.
        index = next(i for i, f in enumerate(c.frames) if f["type"] == "user.message")
        assert c.raw[index] == payload
        await expect(c, "run.ended", run_id=ack["run_id"])


# --------------------------------------------------------------------------- idempotency


async def test_a_resend_after_reconnect_returns_the_first_ack(gw: Gateway) -> None:
    async with gw.connect("c4", after=0) as c:
        first = await one_run(c, "hello", "m1")
        assert first["duplicate"] is False
        head = c.events()[-1]["offset"]
    before = await gw.store.read_events("c4", 0, 1000)
    assert len(before) == head

    async with gw.connect("c4", after=head) as c:
        await c.message("a completely different text", "m1", mode="queue")
        again = await ack_of(c, "m1")
        assert again == {**first, "duplicate": True}
        assert await ping(c, "p") == []  # nothing was appended, nothing ran
    assert await gw.store.read_events("c4", 0, 1000) == before
    assert gw.hub.actors["c4"].log.head == head
    payload = await gw.store.find_client_message("c4", "m1")
    assert payload is not None
    assert orjson.loads(payload)["text"] == "hello"

    # REST shares the key.
    async with gw.client() as http:
        res = await http.post(
            "/api/conversations/c4/messages", json={"client_msg_id": "m1", "text": "x"}
        )
    assert res.status_code == 200
    assert res.json() == {**first, "duplicate": True}
    assert await gw.store.read_events("c4", 0, 1000) == before


async def test_a_resend_to_a_restarted_gateway_is_found_in_the_store() -> None:
    store = MemoryStore()
    async with run_gateway(store=store) as gw, gw.connect("c5", after=0) as c:
        first = await one_run(c, "hello", "m1")
    before = await store.read_events("c5", 0, 1000)
    async with run_gateway(store=store) as gw, gw.connect("c5") as c:
        await c.message("other", "m1")
        again = await ack_of(c, "m1")
        assert again == {**first, "duplicate": True}
        assert await ping(c, "p") == []
        # A new key goes on from the stored head.
        second = await one_run(c, "next", "m2")
        assert second["offset"] == len(before) + 1
    assert (await store.read_events("c5", 0, 1000))[: len(before)] == before


async def test_a_duplicate_within_one_burst_is_stored_once(gw: Gateway) -> None:
    async with gw.connect("c6", after=0) as c:
        # Sent back to back: the actor sees them in one batch or in consecutive ones.
        await c.message("first", "m1")
        await c.message("second", "m1", mode="interrupt")
        await c.message("third", "m1", mode="steer")
        acks = [await c.until_type("ack") for _ in range(3)]
        assert [a["duplicate"] for a in acks] == [False, True, True]
        assert acks[1] == acks[2] == {**acks[0], "duplicate": True}
        assert acks[0]["route"] == "run"
        await expect(c, "run.ended", run_id=acks[0]["run_id"])
        events = await stored_events(gw, "c6")
        users = [e for e in events if e["type"] == "user.message"]
        assert [(u["client_msg_id"], u["text"], u["offset"]) for u in users] == [
            ("m1", "first", acks[0]["offset"])
        ]
        assert [e["type"] for e in events].count("run.started") == 1
        assert [e["type"] for e in events].count("run.ended") == 1


async def test_a_duplicate_of_a_steering_message_returns_its_steer_ack() -> None:
    runner = Gated()
    async with run_gateway(runners=[runner]) as gw, gw.connect("c7", after=0) as c:
        await c.message("A", "a", runner="gated")
        a = await ack_of(c, "a")
        await c.message("x", "s")
        await c.message("y", "s")
        s = await ack_of(c, "s")
        dup = await c.until_type("ack", client_msg_id="s", duplicate=True)
        assert s["route"] == "steer"
        assert s["run_id"] == a["run_id"]
        assert dup == {**s, "duplicate": True}
        runner.release(a["run_id"])
        done = await expect(c, "message.completed", run_id=a["run_id"])
        assert done["message"]["content"] == "start A [steer] x"
        await expect(c, "run.ended", run_id=a["run_id"])


# --------------------------------------------------------------------------- offsets


async def test_offsets_start_at_1_and_grow_by_1_per_conversation(gw: Gateway) -> None:
    async with gw.connect("oa", after=0) as a, gw.connect("ob", after=0) as b:
        for i in range(3):
            # Both conversations run at once; each numbers its own events.
            await a.message("x y", f"a{i}")
            await b.message("p q", f"b{i}", mode="queue")
            ack_a, ack_b = await ack_of(a, f"a{i}"), await ack_of(b, f"b{i}")
            assert ack_a["offset"] == ack_b["offset"] == 7 * i + 1
            await expect(a, "run.ended", run_id=ack_a["run_id"])
            await expect(b, "run.ended", run_id=ack_b["run_id"])
        assert offsets(a) == offsets(b) == list(range(1, 22))
        kinds = [e["type"] for e in a.events()]
        assert (
            kinds
            == [
                "user.message",
                "run.started",
                "message.delta",
                "message.delta",
                "message.delta",
                "message.completed",
                "run.ended",
            ]
            * 3
        )
        assert [e["type"] for e in b.events()] == kinds
        for cid, client in (("oa", a), ("ob", b)):
            stored = await stored_events(gw, cid)
            assert stored == client.events()
            assert {e["conversation_id"] for e in stored} == {cid}


# --------------------------------------------------------------------------- after


async def test_after_replays_then_goes_live(gw: Gateway) -> None:
    async with gw.connect("r1", after=0) as live:
        await one_run(live, "x y", "m1")
        await one_run(live, "x y", "m2")
        stored = await gw.store.read_events("r1", 0, 1000)
        assert len(stored) == 14
        async with gw.connect("r1", ready=False, after=5) as c:
            ready = await c.recv()
            assert ready["head"] == 14
            replay = [await c.recv() for _ in range(9)]
            assert [e["offset"] for e in replay] == list(range(6, 15))
            assert c.raw[1:] == stored[5:]  # byte-identical to the stored (and live) texts
            # Then live events, from the next offset on.
            await c.message("x y", "m3")
            ack = await ack_of(c, "m3")
            assert ack["offset"] == 15
            await expect(c, "run.ended", run_id=ack["run_id"])
            await expect(live, "run.ended", run_id=ack["run_id"])
            assert offsets(c) == list(range(6, 22))
            live_raw = dict(zip(offsets(live), event_texts(live), strict=True))
            assert event_texts(c) == [live_raw[o] for o in range(6, 22)]
        async with gw.connect("r1", ready=False, after=21) as c:
            ready = await c.recv()
            assert ready["head"] == 21
            assert await ping(c, "at head") == []


async def test_after_0_replays_everything(gw: Gateway) -> None:
    async with gw.connect("r2", ready=False, after=0) as c:
        assert (await c.recv())["head"] == 0
        await one_run(c, "x y", "m1")
    async with gw.connect("r2", ready=False, after=0) as c:
        assert (await c.recv())["head"] == 7
        replay = [await c.recv() for _ in range(7)]
        assert [e["offset"] for e in replay] == list(range(1, 8))
        assert c.raw[1:] == await gw.store.read_events("r2", 0, 1000)
        assert await ping(c, "p") == []


async def test_after_above_head_replays_nothing(gw: Gateway) -> None:
    async with gw.connect("r3", after=0) as first:
        await one_run(first, "x y", "m1")
    async with gw.connect("r3", ready=False, after=12) as c:
        ready = await c.recv()
        assert ready["head"] == 7
        assert await ping(c, "p") == []
        # A run of 12 events: offsets 8..19; only those above `after` reach this client.
        await c.message("a b c d e f g", "m2")
        ack = await ack_of(c, "m2")
        assert ack["offset"] == 8  # the ack is not an event: it is sent whatever `after`
        ended = await c.until_type("run.ended")
        assert ended["offset"] == 19
        assert offsets(c) == list(range(13, 20))
        stored = await gw.store.read_events("r3", 0, 1000)
        assert event_texts(c) == stored[12:19]


async def test_no_after_means_no_replay(gw: Gateway) -> None:
    async with gw.connect("r4", after=0) as first:
        await one_run(first, "x y", "m1")
    async with gw.connect("r4", ready=False) as c:
        ready = await c.recv()
        assert ready["head"] == 7
        assert await ping(c, "p") == []
        await c.message("x y", "m2")
        ack = await ack_of(c, "m2")
        await expect(c, "run.ended", run_id=ack["run_id"])
        assert offsets(c) == list(range(8, 15))


async def test_permessage_deflate_uses_the_configured_window_and_memory_level() -> None:
    """STEERWAY_WS_DEFLATE_WINDOW_BITS / _MEM_LEVEL (issue 13, item 1): the server asks for
    its window in the handshake, limits the client's, and frames flow compressed both ways."""
    async with run_gateway(ws_compression=True, ws_deflate_window_bits=10) as gw:
        async with websockets.connect(gw.ws_url("deflate"), compression="deflate") as ws:
            agreed = ws.response.headers["Sec-WebSocket-Extensions"]
            assert "server_max_window_bits=10" in agreed
            assert "client_max_window_bits=10" in agreed
            client = Client(ws)
            assert (await client.recv())["type"] == "ready"
            await client.message("x" * 2000, "big")
            ack = await ack_of(client, "big")
            await expect(client, "run.ended", run_id=ack["run_id"])
        protocol = gw.server.config.ws_protocol_class
        assert protocol.deflate_mem_level == 2  # the default


def test_deflate_settings_out_of_zlib_range_are_refused() -> None:
    for bad in ({"ws_deflate_window_bits": 8}, {"ws_deflate_window_bits": 16}):
        with pytest.raises(ConfigError):
            Settings.load(bad, environ={})
    with pytest.raises(ConfigError):
        Settings.load({}, environ={"STEERWAY_WS_DEFLATE_MEM_LEVEL": "10"})
    assert (
        Settings.load({}, environ={"STEERWAY_WS_DEFLATE_MEM_LEVEL": "9"}).ws_deflate_mem_level == 9
    )
