"""Presence (issue 15, item 3): who is in a conversation and what they are doing, as
ephemeral `presence` frames that are never stored and never take an offset."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from gateway import auth, presence
from gateway.bus import MemoryBus
from gateway.outbox import Frame, Outbox
from gateway.presence import PresenceBoard
from gateway.protocol.frames import Presence, encode
from tests.conftest import TIMEOUT, Client, run_gateway
from tests.helpers import expect
from tests.test_dashboard import dashboard

SECRET = "steerway-test-secret-of-32-bytes-at-least"


def token(sub: str) -> str:
    return auth.mint(SECRET, sub, "user", 3600, ("room*",), ())


async def seen(ws: Client, **match: Any) -> dict[str, Any]:
    """The first presence frame matching `match`, received already or still to come
    (`expect` cannot match a field named `client`)."""

    def matches(frame: dict[str, Any]) -> bool:
        return frame.get("type") == "presence" and all(frame.get(k) == v for k, v in match.items())

    for frame in ws.frames:
        if matches(frame):
            return frame
    return await ws.until(matches)


def presences(client: Client, **match: Any) -> list[dict[str, Any]]:
    return [
        f
        for f in client.frames
        if f.get("type") == "presence" and all(f.get(k) == v for k, v in match.items())
    ]


async def test_users_see_each_other_come_type_steer_and_go() -> None:
    async with (
        run_gateway(secret=SECRET) as gw,
        gw.connect("room1", presence=1, client="tab-a", token=token("alice")) as alice,
    ):
        mine = await expect(alice, "presence", user="alice")
        assert mine["client"] == "tab-a"
        assert (mine["state"], mine["steering"]) == ("watching", False)
        assert "offset" not in mine
        async with gw.connect("room1", presence=1, token=token("bob")) as bob:
            # bob is told who was here before him, alice that bob came
            seen = await expect(bob, "presence", user="alice", state="watching")
            assert seen["session_id"] == mine["session_id"]
            bob_id = (await expect(alice, "presence", user="bob"))["session_id"]
            await bob.send({"type": "presence", "state": "typing"})
            await expect(alice, "presence", user="bob", state="typing")
            # a message ends the typing and makes its sender the one steering
            await bob.message("hello", "m1")
            now = await expect(alice, "presence", user="bob", state="watching", steering=True)
            assert now["session_id"] == bob_id
            await expect(bob, "run.ended")
            await alice.message("me too", "m2")
            await expect(bob, "presence", user="alice", steering=True)
            people = {p.user: p.steering for p in gw.hub.presence.people("room1")}
            assert people == {"alice": True, "bob": False}
        gone = await expect(alice, "presence", user="bob", state="gone")
        assert gone["session_id"] == bob_id
        assert [p.user for p in gw.hub.presence.people("room1")] == ["alice"]
        # nothing of it was stored: the log holds the two messages' runs only
        stored = await gw.store.read_events("room1", 0, 1000)
        assert not [text for text in stored if '"presence"' in text]


async def test_a_client_that_did_not_ask_gets_no_presence_but_is_present() -> None:
    async with (
        run_gateway() as gw,
        gw.connect("room2", client="sdk") as quiet,
        gw.connect("room2", presence=1) as loud,
    ):
        other = await seen(loud, client="sdk")
        assert (other["user"], other["state"]) == ("anonymous", "watching")
        await quiet.send({"type": "ping", "nonce": "n"})
        assert (await quiet.recv())["type"] == "pong"  # no presence frame before it
        await loud.send({"type": "presence", "state": "typing"})
        await seen(loud, client="", state="typing")
        await quiet.send({"type": "ping", "nonce": "n2"})
        assert (await quiet.recv())["type"] == "pong"
        assert presences(quiet) == []


async def test_bad_presence_input_is_answered_and_changes_nothing() -> None:
    async with run_gateway() as gw:
        for bad in ("2", "yes", ""):
            async with httpx.AsyncClient() as raw:
                answer = await raw.get(
                    f"{gw.http}/ws/conversations/room3?presence={bad}",
                    headers={
                        "connection": "upgrade",
                        "upgrade": "websocket",
                        "sec-websocket-version": "13",
                        "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
                    },
                )
            assert answer.status_code == 400
            assert answer.json()["error"]["code"] == "invalid_frame"
            assert "presence" in answer.json()["error"]["message"]
        async with gw.connect("room3", presence=1) as ws:
            for frame in (
                {"type": "presence", "state": "dancing"},
                {"type": "presence"},
                {"type": "presence", "state": "typing", "extra": 1},
                {"type": "presence", "state": "gone"},
            ):
                await ws.send(frame)
                error = await expect(ws, "error")
                assert error["code"] == "invalid_frame"
                ws.frames.remove(error)
            assert [p.state for p in gw.hub.presence.people("room3")] == ["watching"]


async def test_a_burst_of_typing_goes_out_throttled_and_ends_on_the_last_state() -> None:
    async with (
        run_gateway(rate_burst=200) as gw,
        gw.connect("room4", presence=1) as typist,
        gw.connect("room4", presence=1) as watcher,
    ):
        typist_id = typist.frames[0]["session_id"]
        await expect(watcher, "presence", session_id=typist_id)
        for _ in range(20):
            await typist.send({"type": "presence", "state": "typing"})
            await typist.send({"type": "presence", "state": "watching"})
        await typist.send({"type": "presence", "state": "typing"})
        loop = asyncio.get_running_loop()
        started = loop.time()
        await watcher.until(
            lambda f: f.get("session_id") == typist_id and f.get("state") == "typing"
        )
        # the last state arrives within a throttle period or two of the burst ...
        assert loop.time() - started < TIMEOUT
        await watcher.send({"type": "ping", "nonce": "x"})
        await expect(watcher, "pong")
        frames = presences(watcher, session_id=typist_id)
        # ... and 41 changes went out as a handful of frames, not 41
        assert len(frames) <= 5, frames


async def test_typing_lapses_when_the_client_stops_saying_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(presence, "TYPING_S", 0.5)
    async with (
        run_gateway() as gw,
        gw.connect("room5", presence=1) as typist,
        gw.connect("room5", presence=1) as watcher,
    ):
        typist_id = typist.frames[0]["session_id"]
        await typist.send({"type": "presence", "state": "typing"})
        await expect(watcher, "presence", session_id=typist_id, state="typing")
        await watcher.until(
            lambda f: f.get("session_id") == typist_id and f.get("state") == "watching"
        )


async def test_the_dashboard_shows_the_people_of_each_conversation() -> None:
    async with run_gateway() as gw, gw.connect("room6", presence=1, client="carol") as carol:
        await seen(carol, client="carol")
        async with dashboard(gw) as dash:
            snap = dash.frames[0]
            assert [p["client"] for p in snap["presence"]["room6"]] == ["carol"]
            await carol.send({"type": "presence", "state": "typing"})
            update = await expect(dash, "presence.updated", conversation_id="room6")
            assert [(p["client"], p["state"]) for p in update["people"]] == [("carol", "typing")]
        async with dashboard(gw) as dash:
            await carol.close()
            await dash.until(lambda f: f.get("type") == "presence.updated" and f["people"] == [])


# --------------------------------------------------------------------------- other nodes


class _Wire:
    """Two boards' buses joined by hand: what one broadcasts reaches the other's
    `on_broadcast`, as Redis would carry it (never back to the sender)."""

    def __init__(self) -> None:
        self.buses: list[MemoryBus] = []

    def bus(self) -> MemoryBus:
        wire = self

        class Linked(MemoryBus):
            def broadcast(self, cid: str, frames: list[Frame], here: bool = True) -> None:
                super().broadcast(cid, frames, here)
                for other in wire.buses:
                    if other is not self:
                        other.publish(cid, frames)
                        if other.on_broadcast is not None:
                            other.on_broadcast(cid, frames)

        bus = Linked()
        self.buses.append(bus)
        return bus


async def test_a_lost_node_s_clients_are_gone_within_the_liveness_timeout() -> None:
    wire = _Wire()
    here, there = wire.bus(), wire.bus()
    board = PresenceBoard(here, 0.3, lambda cid: None)
    board.attach(here)
    far = PresenceBoard(there, 0.3, lambda cid: None)
    far.attach(there)
    mine = Outbox()
    here.subscribe("c", mine)
    board.join("c", "s-here", "alice", "", mine)
    theirs = Outbox()
    there.subscribe("c", theirs)
    far.join("c", "s-there", "bob", "", theirs)
    assert sorted(p.user for p in board.people("c")) == ["alice", "bob"]
    # bob's node keeps him alive with its refreshes ...
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 0.9
    while loop.time() < deadline:
        # no event to wait for: that nothing happens over three timeouts is what is tested
        await asyncio.sleep(0.05)
        assert sorted(p.user for p in board.people("c")) == ["alice", "bob"]
    # ... and once it stops (the node died), he is gone within the timeout
    await far.stop()
    while True:
        frame = await asyncio.wait_for(mine.get(), TIMEOUT)
        assert frame is not None
        p = Presence.model_validate_json(frame.text)
        if (p.user, p.state) == ("bob", "gone"):
            break
    assert [p.user for p in board.people("c")] == ["alice"]
    await board.stop()


def test_a_presence_frame_is_never_an_event() -> None:
    frame = Presence(conversation_id="c", session_id="s", user="u", client="", state="watching")
    assert b"offset" not in encode(frame)
