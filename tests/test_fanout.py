"""Fan-out (PROTOCOL.md section 6): every client of a conversation gets the same events
in the same order, each event is encoded once, and the same bytes go to every client."""

from __future__ import annotations

from collections import Counter
from contextlib import AsyncExitStack
from typing import Any

import pytest

from gateway import ws
from gateway.outbox import Frame, Outbox
from gateway.protocol.frames import Event, MessageFrame, Strict
from tests.conftest import Client, Gateway
from tests.helpers import ack_of, event_texts, expect

RUN_KINDS = [
    "user.message",
    "run.started",
    *["message.delta"] * 6,  # "echo:" and five words
    "message.completed",
    "run.ended",
]


async def test_every_client_gets_the_same_events_in_the_same_order(gw: Gateway) -> None:
    async with AsyncExitStack() as stack:
        clients: list[Client] = [
            await stack.enter_async_context(gw.connect("f1", **query))
            for query in ({}, {"after": 0}, {}, {"after": 0})
        ]
        assert gw.hub.bus.count("f1") == 4
        await clients[0].message("a b c d e", "m1")
        first = await ack_of(clients[0], "m1")
        await expect(clients[2], "run.ended", run_id=first["run_id"])
        await clients[2].message("v w x y z", "m2")
        second = await ack_of(clients[2], "m2")
        for c in clients:
            await expect(c, "run.ended", run_id=second["run_id"])
        reference = event_texts(clients[0])
        assert len(reference) == 2 * len(RUN_KINDS)
        for c in clients[1:]:
            assert event_texts(c) == reference
        events = clients[0].events()
        assert [e["offset"] for e in events] == list(range(1, len(events) + 1))
        for ack in (first, second):
            kinds = [e["type"] for e in events if e.get("run_id") == ack["run_id"]]
            assert kinds == RUN_KINDS
        assert reference == await gw.store.read_events("f1", 0, 1000)
        # Acks go to their sender only.
        assert [f["client_msg_id"] for f in clients[0].frames if f["type"] == "ack"] == ["m1"]
        assert [f["client_msg_id"] for f in clients[2].frames if f["type"] == "ack"] == ["m2"]
        assert [f for c in (clients[1], clients[3]) for f in c.frames if f["type"] == "ack"] == []


@pytest.mark.parametrize("n_clients", [1, 6])
async def test_each_event_is_encoded_once_and_the_same_message_is_sent_to_all(
    gw: Gateway, monkeypatch: pytest.MonkeyPatch, n_clients: int
) -> None:
    encoded: Counter[str] = Counter()  # event type -> model encodings
    event_frames: list[Frame] = []
    # id(session) -> what it sent for each event: the ASGI message, or the prebuilt frame
    sent: dict[int, list[object]] = {}

    wire = Strict.wire

    def counting_wire(self: Strict) -> dict[str, Any]:
        if isinstance(self, Event):
            encoded[self.type] += 1
        return wire(self)

    frame_of = Frame.of.__func__  # type: ignore[attr-defined]

    def counting_of(cls: type[Frame], *args: Any, **kwargs: Any) -> Frame:
        frame: Frame = frame_of(cls, *args, **kwargs)
        if frame.offset:
            event_frames.append(frame)
        return frame

    init = ws.Session.__init__

    def recording_init(self: ws.Session, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        send, log = self.send, sent.setdefault(id(self), [])

        async def recording_send(message: dict[str, Any]) -> None:
            if message.get("type") == "websocket.send" and '"offset"' in message["text"]:
                log.append(message)
            await send(message)

        self.send = recording_send
        prebuilt = getattr(self, "_prebuilt", None)
        if prebuilt is not None:

            def recording_prebuilt(data: bytes) -> bool:
                if b'"offset"' in data:
                    log.append(data)
                written: bool = prebuilt(data)
                return written

            self._prebuilt = recording_prebuilt

    monkeypatch.setattr(Strict, "wire", counting_wire)
    monkeypatch.setattr(Frame, "of", classmethod(counting_of))
    monkeypatch.setattr(ws.Session, "__init__", recording_init)

    async with AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(gw.connect("f2")) for _ in range(n_clients)]
        assert gw.hub.bus.count("f2") == n_clients
        await clients[0].message("a b c d e", "m1")
        ack = await ack_of(clients[0], "m1")
        for c in clients:
            await expect(c, "run.ended", run_id=ack["run_id"])

    # One model encoding and one shared frame per event, however many clients.
    assert encoded == Counter(RUN_KINDS)
    assert [f.offset for f in event_frames] == list(range(1, len(RUN_KINDS) + 1))
    # Every session sent, for each event, the very same object: the shared ASGI message,
    # or (the fast path, taken while a client keeps up) the shared prebuilt frame.
    assert len(sent) == n_clients
    per_session = list(sent.values())
    for log in per_session:
        # (the ack also carries an offset: it is this session's own frame)
        events = [m for m in log if b'"type":"ack"' not in _payload(m)]
        assert len(events) == len(event_frames)
        for item, frame in zip(events, event_frames, strict=True):
            assert item is frame.message or item is frame._framed
    assert any(isinstance(item, bytes) for log in per_session for item in log)


def _payload(item: object) -> bytes:
    if isinstance(item, bytes):
        return item
    assert isinstance(item, dict)
    text: str = item["text"]
    return text.encode()


async def test_the_bus_hands_the_same_frame_objects_to_every_subscriber(gw: Gateway) -> None:
    one, two = Outbox(), Outbox()
    gw.hub.bus.subscribe("f3", one)
    gw.hub.bus.subscribe("f3", two)
    try:
        assert gw.hub.bus.count("f3") == 2
        frame = MessageFrame(type="message", client_msg_id="m1", text="a b c d e")
        ack = await gw.hub.submit("f3", frame, "anonymous")
        got: dict[int, list[Frame]] = {1: [], 2: []}
        for index, outbox in ((1, one), (2, two)):
            while not got[index] or '"type":"run.ended"' not in got[index][-1].text:
                item = await outbox.get()
                assert item is not None
                got[index].append(item)
        assert len(got[1]) == len(got[2]) == len(RUN_KINDS)
        for a, b in zip(got[1], got[2], strict=True):
            assert a is b
            assert a.text is b.text
            assert a.message is b.message
        assert [f.offset for f in got[1]] == list(range(1, len(RUN_KINDS) + 1))
        assert got[1][0].offset == ack.offset
        stored = await gw.store.read_events("f3", 0, 1000)
        assert [f.text for f in got[1]] == stored
        assert one.merged == two.merged == 0
    finally:
        gw.hub.bus.unsubscribe("f3", one)
        gw.hub.bus.unsubscribe("f3", two)
    assert gw.hub.bus.count("f3") == 0
