"""The per-client send queue (PROTOCOL.md sections 2 and 6): bounded, deduplicating by offset,
merging the deltas of a lagging client.  No socket: frames go in with `put`, out with `get`."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from hypothesis import event as observe
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.outbox import Frame, Outbox
from gateway.protocol.frames import Ack, MessageDelta, StateUpdated, encode


def delta_frame(offset: int, text: str, message_id: str = "m1", born: float = 0.0) -> Frame:
    event = MessageDelta(
        conversation_id="c1",
        run_id="r1",
        offset=offset,
        ts=1000 + offset,
        message_id=message_id,
        delta=text,
    )
    frame = Frame.of(encode(event), offset, event)
    frame.born = born
    return frame


def event_frame(offset: int) -> Frame:
    event = StateUpdated(
        conversation_id="c1", run_id="r1", offset=offset, ts=1000 + offset, scope="actor",
        key="k", value=offset,
    )  # fmt: skip
    return Frame.of(encode(event), offset)


def ack_frame() -> Frame:
    ack = Ack(client_msg_id="m1", offset=1, message_id="msg", route="run", run_id="r1")
    return Frame.of(encode(ack))  # not an event: offset 0


async def take(box: Outbox, n: int) -> list[Frame]:
    out = []
    for _ in range(n):
        frame = await box.get()
        assert frame is not None
        out.append(frame)
    return out


def loads(frame: Frame) -> dict[str, Any]:
    obj: dict[str, Any] = orjson.loads(frame.text)
    return obj


async def test_a_frame_is_built_once() -> None:
    frame = delta_frame(3, "héllo")
    assert frame.size == len(frame.text.encode())
    assert frame.message == {"type": "websocket.send", "text": frame.text}
    assert frame.offset == 3
    assert frame.delta is not None
    assert frame.delta.delta == "héllo"


async def test_frames_come_out_in_order() -> None:
    box = Outbox()
    frames = [ack_frame(), event_frame(1), delta_frame(2, "a"), event_frame(3)]
    box.deliver(frames)
    assert len(box) == 4
    assert await take(box, 4) == frames
    assert len(box) == 0


async def test_offsets_at_or_below_the_floor_are_dropped() -> None:
    box = Outbox(floor=5)
    box.put(event_frame(4))
    box.put(event_frame(5))
    box.put(event_frame(6))
    box.put(event_frame(6))  # a duplicate
    box.put(event_frame(3))  # late and old
    box.put(ack_frame())  # not an event: always goes
    box.put(event_frame(7))
    assert [f.offset for f in await take(box, 3)] == [6, 0, 7]
    assert box.floor == 7
    assert len(box) == 0


async def test_get_waits_for_a_frame() -> None:
    box = Outbox()
    getter = asyncio.create_task(box.get())
    await asyncio.sleep(0)  # let it reach its wait (a yield, not a delay)
    assert not getter.done()
    frame = event_frame(1)
    box.put(frame)
    assert await getter is frame


async def test_close_wakes_the_reader_and_lets_it_finish_the_queue() -> None:
    box = Outbox()
    getter = asyncio.create_task(box.get())
    await asyncio.sleep(0)
    box.close()
    assert await getter is None
    # frames queued before a close are still handed out; later puts are ignored
    box = Outbox()
    first = event_frame(1)
    box.put(first)
    box.close()
    box.put(event_frame(2))
    assert len(box) == 1
    assert await box.get() is first
    assert await box.get() is None


async def test_deltas_of_one_message_merge_when_the_client_lags() -> None:
    box = Outbox(max_frames=3)
    frames = [delta_frame(o, t, born=float(o)) for o, t in [(1, "a"), (2, "bé"), (3, "c")]]
    box.deliver(frames)
    assert len(box) == 3
    assert box.merged == 0
    box.put(delta_frame(4, "d", born=4.0))  # over the bound: merge
    assert len(box) == 1
    assert box.merged == 3
    assert not box.overflowed
    [merged] = await take(box, 1)
    assert loads(merged) == {
        "type": "message.delta",
        "offset": 4,
        "ts": 1004,
        "conversation_id": "c1",
        "run_id": "r1",
        "message_id": "m1",
        "delta": "abécd",
        "first_offset": 1,
    }
    assert merged.offset == 4
    assert merged.size == len(merged.text.encode())
    assert merged.born == 1.0  # the oldest result behind it


def relayed(frame: Frame) -> Frame:
    """The same event as another node relays it (gateway/cluster/redisbus.py): text only."""
    out = Frame.of(frame.text.encode(), frame.offset)
    out.unparsed = True
    return out


async def test_relayed_deltas_are_parsed_only_to_merge_and_merge_alike() -> None:
    box = Outbox(max_frames=2)
    frames = [relayed(delta_frame(o, t)) for o, t in [(1, "a"), (2, "b"), (3, "c")]]
    box.put(frames[0])
    assert frames[0].delta is None
    assert frames[0].unparsed
    box.put(frames[1])
    box.put(frames[2])  # over the bound: merge
    [merged] = await take(box, 1)
    assert loads(merged)["delta"] == "abc"
    assert loads(merged)["first_offset"] == 1
    assert box.merged == 2


async def test_a_relayed_frame_that_is_no_valid_delta_is_never_merged() -> None:
    box = Outbox(max_frames=3)
    bad = Frame.of(b'{"type":"message.delta","offset":2,"broken', 2)
    bad.unparsed = True
    later = [relayed(delta_frame(o, t)) for o, t in [(3, "c"), (4, "d")]]
    for frame in (relayed(delta_frame(1, "a")), bad, *later):
        box.put(frame)  # the fourth is over the bound: merge
    assert bad.delta is None
    assert not bad.unparsed
    out = await take(box, 3)
    assert [f.offset for f in out] == [1, 2, 4]  # kept as it came; only 3 and 4 merged
    assert out[1] is bad
    assert loads(out[2])["delta"] == "cd"
    assert box.merged == 1


async def test_merging_stops_at_other_frames_and_other_messages() -> None:
    box = Outbox(max_frames=6)
    box.deliver(
        [
            delta_frame(1, "a"),
            delta_frame(2, "b"),
            event_frame(3),
            delta_frame(4, "c"),
            delta_frame(5, "x", message_id="m2"),
            delta_frame(6, "y", message_id="m2"),
        ]
    )
    box.put(ack_frame())
    frames = await take(box, 5)
    assert [(loads(f)["type"], loads(f).get("first_offset"), f.offset) for f in frames] == [
        ("message.delta", 1, 2),
        ("state.updated", None, 3),
        ("message.delta", None, 4),  # alone: left as it was
        ("message.delta", 5, 6),
        ("ack", None, 0),
    ]
    assert [loads(f).get("delta") for f in frames] == ["ab", None, "c", "xy", None]
    assert frames[2].text == delta_frame(4, "c").text
    assert box.merged == 2


async def test_a_merged_frame_merges_again_keeping_its_first_offset() -> None:
    box = Outbox(max_frames=2)
    box.deliver([delta_frame(1, "a"), delta_frame(2, "b"), delta_frame(3, "c")])
    assert len(box) == 1
    box.deliver([delta_frame(4, "d"), delta_frame(5, "e")])
    assert len(box) == 1
    [frame] = await take(box, 1)
    obj = loads(frame)
    assert (obj["first_offset"], obj["offset"], obj["ts"], obj["delta"]) == (1, 5, 1005, "abcde")
    assert box.merged == 4


async def test_a_client_still_behind_after_merging_overflows() -> None:
    box = Outbox(max_frames=2)
    box.deliver([event_frame(1), event_frame(2)])
    assert not box.overflowed
    box.put(event_frame(3))
    assert box.overflowed
    assert len(box) == 0
    assert await box.get() is None
    box.put(event_frame(4))  # ignored from now on
    assert len(box) == 0
    assert await box.get() is None


async def test_overflow_wakes_a_waiting_reader() -> None:
    box = Outbox(max_frames=0)
    getter = asyncio.create_task(box.get())
    await asyncio.sleep(0)
    box.put(event_frame(1))
    assert await getter is None
    assert box.overflowed


async def test_the_byte_bound() -> None:
    one = event_frame(1)
    box = Outbox(max_frames=100, max_bytes=2 * one.size)
    box.deliver([event_frame(1), event_frame(2)])
    assert not box.overflowed
    box.put(event_frame(3))
    assert box.overflowed


async def test_one_frame_alone_is_taken_however_large() -> None:
    big = event_frame(1)
    box = Outbox(max_frames=4, max_bytes=big.size - 1)
    box.put(big)
    assert (box.overflowed, len(box)) == (False, 1)
    box.put(event_frame(2))  # a backlog over the bound
    assert box.overflowed


async def test_a_merged_delta_over_the_byte_bound_overflows() -> None:
    """A stuck client does not hold an ever-growing merged delta: it is closed instead."""
    box = Outbox(max_frames=2, max_bytes=400)
    for offset in range(1, 10):
        box.put(delta_frame(offset, "x" * 40))
        if box.overflowed:
            break
    assert box.overflowed
    assert offset == 7  # six deltas merged make 368 bytes, seven 408
    assert len(box) == 0


async def test_merging_saves_bytes_too() -> None:
    sizes = [delta_frame(o, "x" * 50).size for o in (1, 2, 3)]
    box = Outbox(max_frames=100, max_bytes=sum(sizes) - 1)
    box.deliver([delta_frame(o, "x" * 50) for o in (1, 2, 3)])
    assert not box.overflowed
    assert len(box) == 1
    [frame] = await take(box, 1)
    assert loads(frame)["delta"] == "x" * 150
    assert box._bytes == 0


# --------------------------------------------------------------------------- any stream

# A stream of events of one conversation (offsets 1, 2, 3, ...): deltas of two messages,
# other events and acks, with the client reading now and then.
deltas = st.tuples(st.just("delta"), st.sampled_from(["m1", "m2"]), st.text(max_size=5))
items = st.lists(
    st.one_of(
        deltas,
        st.lists(deltas.map(lambda d: ("delta", "m1", d[2])), min_size=2, max_size=12).map(
            lambda run: ("burst", run)
        ),
        st.tuples(st.just("event")),
        st.tuples(st.just("ack")),
        st.tuples(st.just("read"), st.integers(1, 4)),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(items=items, max_frames=st.integers(1, 8), max_bytes=st.integers(150, 2000))
async def test_any_stream_is_delivered_whole_or_overflows(
    items: list[tuple[Any, ...]], max_frames: int, max_bytes: int
) -> None:
    box = Outbox(max_frames=max_frames, max_bytes=max_bytes)
    offset = 0
    sent: list[tuple[int, str, str | None]] = []  # (offset, type, delta) in order, acks 0
    got: list[Frame] = []
    flat = [d for item in items for d in (item[1] if item[0] == "burst" else [item])]
    for item in flat:
        if item[0] == "read":
            for _ in range(min(item[1], len(box))):
                frame = await box.get()
                assert frame is not None
                got.append(frame)
            continue
        if item[0] == "ack":
            box.put(ack_frame())
            sent.append((0, "ack", None))
        else:
            offset += 1
            if item[0] == "delta":
                box.put(delta_frame(offset, item[2], item[1]))
                sent.append((offset, item[1], item[2]))
            else:
                box.put(event_frame(offset))
                sent.append((offset, "event", None))
        if box.overflowed:
            break
        assert len(box) <= max_frames
        # one frame alone always fits, unless it is a merge of several
        alone = len(box) == 1 and "first_offset" not in loads(box._q[0])
        assert box._bytes <= max_bytes or alone
        assert box._bytes == sum(f.size for f in box._q or ())
    if not box.overflowed:
        got.extend(await take(box, len(box)))
    observe("overflowed" if box.overflowed else "merged" if box.merged else "as sent")
    # What was delivered covers a prefix of what was sent (all of it, unless overflowed):
    # every offset exactly once and in order, each merged delta the concatenation it replaces.
    covered: list[tuple[int, str, str | None]] = []
    for frame in got:
        obj = loads(frame)
        if obj["type"] == "ack":
            covered.append((0, "ack", None))
        elif obj["type"] == "message.delta":
            first = obj.get("first_offset", obj["offset"])
            span = sent[len(covered) : len(covered) + obj["offset"] - first + 1]
            assert [s[0] for s in span] == list(range(first, obj["offset"] + 1))
            assert {s[1] for s in span} == {obj["message_id"]}
            assert "".join(s[2] or "" for s in span) == obj["delta"]
            assert obj["ts"] == 1000 + obj["offset"]
            assert frame.offset == obj["offset"]
            covered.extend(span)
        else:
            covered.append((obj["offset"], "event", None))
    assert covered == sent[: len(covered)]
    if not box.overflowed:
        assert covered == sent
