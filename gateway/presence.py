"""Presence: who is in each conversation and what they are doing, never stored.

Each client connection (a session) is one entry: its user (the token's `sub`, or
"anonymous"), its `client` label, whether it is watching or typing, and whether it
is the one steering (its message was the latest to start, steer or interrupt a run
of the conversation: one session at a time, docs/protocol.md). A change goes out as
one `presence` frame through the bus's `broadcast`, without an offset, to every
client of the conversation on every node, at most 4 a second per session (the last
state always goes out, late). A client that joins is sent every entry known.

Typing lapses back to watching TYPING_S after the last `presence` typing frame, so
a client that vanishes mid-word does not type forever. A session that ends is
`gone` at once; a vanished client's session ends within the liveness timeout (the
WebSocket ping). In a cluster each node re-broadcasts its own entries every third
of that timeout, and forgets another node's entries not refreshed within it (that
node died), telling its clients they are `gone`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from pydantic import ValidationError

from gateway.bus import Bus
from gateway.outbox import Frame, Outbox
from gateway.protocol.frames import Person, Presence, PresenceState, encode

State = Literal["watching", "typing", "gone"]
THROTTLE_S = 0.25  # a session's presence frames: at most 4 a second
TYPING_S = 6.0  # typing lapses without a new `presence` typing frame within this


@dataclass(eq=False, slots=True)
class _Entry:
    session_id: str
    user: str
    client: str
    state: State = "watching"
    steering: bool = False
    outbox: Outbox | None = None  # a session of this node; None: another node's
    expires: float = math.inf  # another node's: forgotten after this (loop time)
    sent: float = -math.inf  # this node's: when its last frame went out
    due: asyncio.TimerHandle | None = None
    typing: asyncio.TimerHandle | None = None
    frame: Frame | None = field(default=None)  # the last frame built, while unchanged

    def person(self) -> Person:
        state: PresenceState = "typing" if self.state == "typing" else "watching"
        return Person(
            session_id=self.session_id,
            user=self.user,
            client=self.client,
            state=state,
            steering=self.steering,
        )

    def cancel(self) -> None:
        for timer in (self.due, self.typing):
            if timer is not None:
                timer.cancel()
        self.due = self.typing = None


class PresenceBoard:
    """This node's view of presence in the conversations its clients are in."""

    def __init__(self, bus: Bus, liveness_s: float, on_change: Callable[[str], None]) -> None:
        self.bus = bus
        self.liveness_s = liveness_s
        self._on_change = on_change  # the dashboard: a conversation's people changed
        self._rooms: dict[str, dict[str, _Entry]] = {}
        self._shared = False
        self._task: asyncio.Task[None] | None = None
        self._announcing: dict[str, asyncio.TimerHandle] = {}  # conversation -> announce

    def attach(self, bus: Bus) -> None:
        """Cluster mode: presence crosses nodes through `bus`, refreshed and expired."""
        self.bus = bus
        self._shared = True
        bus.on_broadcast = self.received

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for room in self._rooms.values():
            for entry in room.values():
                entry.cancel()
        for timer in self._announcing.values():
            timer.cancel()
        self._announcing.clear()

    # ------------------------------------------------------------------ sessions

    def join(self, cid: str, session_id: str, user: str, client: str, outbox: Outbox) -> None:
        """A session of this node subscribed to `cid`: it is told everyone present (unless
        its outbox takes events only), and everyone is told of it."""
        room = self._rooms.setdefault(cid, {})
        entry = room[session_id] = _Entry(session_id, user, client, outbox=outbox)
        for other in room.values():
            if other is not entry and not outbox.events_only:  # its own comes by the bus
                outbox.put(self._frame(cid, other))
        self._send(cid, entry)
        self._on_change(cid)
        if self._shared and self._task is None:
            self._task = asyncio.create_task(self._refresh(), name="presence-refresh")

    def leave(self, cid: str, session_id: str) -> None:
        room = self._rooms.get(cid)
        entry = room.pop(session_id, None) if room is not None else None
        if room is None or entry is None:
            return
        entry.cancel()
        entry.state = "gone"
        entry.frame = None
        self.bus.broadcast(cid, [self._frame(cid, entry)])
        if not room:
            del self._rooms[cid]
        self._on_change(cid)

    def _stop_typing(self, cid: str, session_id: str) -> _Entry | None:
        """The session's entry, its typing timer cancelled; None when it has none."""
        entry = self._rooms.get(cid, {}).get(session_id)
        if entry is not None and entry.typing is not None:
            entry.typing.cancel()
            entry.typing = None
        return entry

    def set_state(self, cid: str, session_id: str, state: PresenceState) -> None:
        """The session said what it is doing (a `presence` frame)."""
        entry = self._stop_typing(cid, session_id)
        if entry is None:
            return
        if state == "typing":
            loop = asyncio.get_running_loop()
            entry.typing = loop.call_later(TYPING_S, self._lapse, cid, entry)
        self._change(cid, entry, state, entry.steering)

    def steered(self, cid: str, session_id: str) -> None:
        """The session's message started, steered or interrupted a run: it is the one
        steering now, and has stopped typing."""
        entry = self._stop_typing(cid, session_id)
        if entry is None:
            return
        self._others_stop_steering(cid, entry)
        self._change(cid, entry, "watching", True)

    def people(self, cid: str) -> list[Person]:
        return [entry.person() for entry in self._rooms.get(cid, {}).values()]

    def rooms(self) -> list[str]:
        return list(self._rooms)

    # ------------------------------------------------------------------ other nodes

    def received(self, cid: str, frames: list[Frame]) -> None:
        """Another node's presence frames (already delivered to this node's clients)."""
        room = self._rooms.get(cid)
        if room is None:
            return  # no client here: nobody to tell, nothing to keep
        now = asyncio.get_running_loop().time()
        for frame in frames:
            try:
                p = Presence.model_validate_json(frame.text)
            except ValidationError:
                continue  # not a presence frame of this version: nothing to keep
            entry = room.get(p.session_id)
            if entry is not None and entry.outbox is not None:
                continue  # ours, echoed
            if p.state == "gone":
                if room.pop(p.session_id, None) is not None:
                    self._on_change(cid)
                continue
            if entry is None:
                entry = room[p.session_id] = _Entry(p.session_id, p.user, p.client)
                self._announce(cid)  # a newcomer elsewhere: it learns of ours now
            changed = (entry.state, entry.steering) != (p.state, p.steering)
            entry.state, entry.steering, entry.expires = p.state, p.steering, now + self.liveness_s
            if p.steering and changed:
                self._others_stop_steering(cid, entry)
            if changed:
                self._on_change(cid)

    def _announce(self, cid: str) -> None:
        """This node's entries to the other nodes, once per THROTTLE_S at most."""
        if cid not in self._announcing:
            loop = asyncio.get_running_loop()
            self._announcing[cid] = loop.call_later(THROTTLE_S, self._announced, cid)

    def _announced(self, cid: str) -> None:
        del self._announcing[cid]
        self._broadcast_mine(cid)

    def _broadcast_mine(self, cid: str) -> None:
        room = self._rooms.get(cid, {})
        mine = [self._frame(cid, e) for e in room.values() if e.outbox is not None]
        if mine:
            self.bus.broadcast(cid, mine, here=False)

    async def _refresh(self) -> None:
        """Cluster mode: re-broadcast this node's entries, forget lost nodes' entries."""
        period = self.liveness_s / 3
        while True:
            await asyncio.sleep(period)
            now = asyncio.get_running_loop().time()
            for cid, room in list(self._rooms.items()):
                self._broadcast_mine(cid)
                lost = [e for e in room.values() if e.outbox is None and e.expires < now]
                for entry in lost:
                    del room[entry.session_id]
                    entry.state, entry.frame = "gone", None
                    self._tell_here(cid, room, self._frame(cid, entry))
                if lost:
                    self._on_change(cid)

    # ------------------------------------------------------------------ sending

    def _others_stop_steering(self, cid: str, steering: _Entry) -> None:
        """One session steers at a time: every node and client applies the same rule
        when told of a new one, so no frame is sent for the others."""
        for other in self._rooms.get(cid, {}).values():
            if other is not steering and other.steering:
                other.steering = False
                other.frame = None

    def _lapse(self, cid: str, entry: _Entry) -> None:
        entry.typing = None
        self._change(cid, entry, "watching", entry.steering)

    def _change(self, cid: str, entry: _Entry, state: State, steering: bool) -> None:
        if (entry.state, entry.steering) == (state, steering):
            return
        entry.state, entry.steering, entry.frame = state, steering, None
        if entry.due is None:
            self._send(cid, entry)
        self._on_change(cid)

    def _send(self, cid: str, entry: _Entry) -> None:
        """Now, or once THROTTLE_S has passed since the last frame (then the state as it
        is by that time)."""
        loop = asyncio.get_running_loop()
        wait = entry.sent + THROTTLE_S - loop.time()
        if wait > 0:
            if entry.due is None:
                entry.due = loop.call_later(wait, self._due, cid, entry)
            return
        entry.sent = loop.time()
        self.bus.broadcast(cid, [self._frame(cid, entry)])

    def _due(self, cid: str, entry: _Entry) -> None:
        entry.due = None
        if self._rooms.get(cid, {}).get(entry.session_id) is entry:
            self._send(cid, entry)

    @staticmethod
    def _tell_here(cid: str, room: dict[str, _Entry], frame: Frame) -> None:
        for entry in room.values():
            if entry.outbox is not None and not entry.outbox.events_only:
                entry.outbox.put(frame)

    @staticmethod
    def _frame(cid: str, entry: _Entry) -> Frame:
        if entry.frame is None:
            presence = Presence(
                conversation_id=cid,
                session_id=entry.session_id,
                user=entry.user,
                client=entry.client,
                state=entry.state,
                steering=entry.steering,
            )
            entry.frame = Frame.of(encode(presence))
        return entry.frame
