"""The replay/live boundary under load (PROTOCOL.md section 2).

A runner streams deltas as fast as the gateway takes them while clients connect
with every kind of `after`, in bursts and one after another, round after round.
Every client must see every offset after its cursor exactly once, ascending, with
no gap, up to the run's end; every event's text is the same for every client,
replayed or live, and the same as the store's.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.runners.base import RunContext
from tests.conftest import Gateway, run_gateway
from tests.helpers import ack_of, delta, event_texts, expect, run_completed

CHUNKS = 1000  # at least this many deltas per run
TAIL = 400  # deltas streamed after the last client of a round has connected
ROUNDS = 3
GROUPS = 4  # per round, groups connect one after the other...
GROUP_SIZE = 3  # ...and the clients of a group all at once: 36 connections in all


class Firehose:
    """Streams deltas until told to stop (and at least CHUNKS of them), then TAIL more."""

    name = "firehose"
    supports_steering = False
    leftover_steering = "follow_up"
    deadline_s = None
    idle_s = None

    def __init__(self) -> None:
        self.stop: dict[str, asyncio.Event] = {}
        self.streamed: dict[str, int] = {}

    def stopper(self, run_id: str) -> asyncio.Event:
        return self.stop.setdefault(run_id, asyncio.Event())

    async def run(self, ctx: RunContext) -> AsyncIterator[dict[str, Any]]:
        stop = self.stopper(ctx.run_id)
        n = 0
        while n < CHUNKS or not stop.is_set():
            yield delta(f"<{n}>")
            n += 1
            if n % 4 == 0:
                await asyncio.sleep(0)  # give the connecting clients a turn
        for _ in range(TAIL):
            yield delta(f"<{n}>")
            n += 1
        self.streamed[ctx.run_id] = n
        yield run_completed("stop")


@dataclass
class Seen:
    after: int | None
    head: int  # ready.head
    offsets: list[int]  # every offset the client saw, coalesced frames expanded
    texts: dict[int, str]  # offset -> text of each event frame (not coalesced)


async def watch(
    gw: Gateway, cid: str, cursor: Callable[[], int | None], ready: asyncio.Event, run_id: str
) -> Seen:
    after = cursor()
    query = {} if after is None else {"after": after}
    async with gw.connect(cid, ready=False, **query) as c:
        first = await c.recv()
        assert first["type"] == "ready"
        ready.set()
        await c.until_type("run.ended", run_id=run_id)
    seen = Seen(after, first["head"], [], {})
    for raw, frame in zip(c.raw[1:], c.frames[1:], strict=True):
        assert "offset" in frame, frame  # this client sends nothing: only events come
        if "first_offset" in frame:  # merged for a lagging client: covers a range
            seen.offsets.extend(range(frame["first_offset"], frame["offset"] + 1))
        else:
            seen.offsets.append(frame["offset"])
            seen.texts[frame["offset"]] = raw
    return seen


def cursors(gw: Gateway, cid: str) -> list[Callable[[], int | None]]:
    """Ways to pick `after` at the moment of connecting, relative to the head then."""

    def head() -> int:
        return gw.hub.actors[cid].log.published

    return [
        lambda: None,  # live only
        lambda: head(),  # at the head: the boundary itself
        lambda: max(head() - 50, 0),  # a short replay, then live
        lambda: head() + 200,  # ahead of the head: live events up to it are skipped
        lambda: 0 if head() % 3 == 0 else head() - 1,  # sometimes the whole conversation
    ]


async def test_every_offset_exactly_once_across_the_replay_live_boundary() -> None:
    runner = Firehose()
    cid = "fire"
    async with (
        run_gateway(runners=[runner], outbox_frames=1_000_000, outbox_bytes=1 << 30) as gw,
        gw.connect(cid) as control,
    ):
        picks = cursors(gw, cid)
        results: list[Seen] = []
        ends: list[int] = []
        for r in range(ROUNDS):
            await control.message(f"round {r}", f"r{r}", runner="firehose")
            run_id = (await ack_of(control, f"r{r}"))["run_id"]
            watchers: list[asyncio.Task[Seen]] = []
            for g in range(GROUPS):
                group = [asyncio.Event() for _ in range(GROUP_SIZE)]
                for k, ready in enumerate(group):
                    pick = picks[(g * GROUP_SIZE + k + r) % len(picks)]
                    watchers.append(asyncio.create_task(watch(gw, cid, pick, ready, run_id)))
                for ready in group:
                    await ready.wait()
            # Every client is connected and the run is still streaming: let it finish.
            assert runner.streamed.get(run_id) is None
            runner.stopper(run_id).set()
            ended = await expect(control, "run.ended", run_id=run_id)
            assert (ended["status"], ended["reason"]) == ("completed", "stop")
            ends.append(ended["offset"])
            async with asyncio.timeout(30):
                round_results = await asyncio.gather(*watchers)
            for seen in round_results:
                start = (seen.head if seen.after is None else seen.after) + 1
                assert seen.offsets == list(range(start, ended["offset"] + 1)), (
                    seen.after,
                    seen.head,
                )
            results.extend(round_results)

        assert len(results) == ROUNDS * GROUPS * GROUP_SIZE
        # Each run: user.message, run.started, its deltas, run.ended.
        assert ends[0] == runner.streamed[next(iter(runner.streamed))] + 3
        assert sorted(runner.streamed.values())[0] >= CHUNKS + TAIL

        # Byte-identical: every client got the same text for an offset, replayed or live,
        # and that text is the stored one.
        stored = await gw.store.read_events(cid, 0, 1_000_000)
        assert len(stored) == ends[-1]
        for seen in results:
            for offset, text in seen.texts.items():
                assert text == stored[offset - 1]
        replayed = {o for s in results for o in s.texts if o <= s.head}
        live = {o for s in results for o in s.texts if o > s.head}
        assert len(replayed & live) >= 100  # the same events went out both ways
        # Clients that connected with a short replay crossed the boundary mid-stream.
        crossed = [s for s in results if s.after is not None and s.after < s.head < s.offsets[-1]]
        assert len(crossed) >= ROUNDS * GROUPS * GROUP_SIZE // 5
        # Clients whose cursor was ahead of the head got nothing at or below it.
        ahead = [s for s in results if s.after is not None and s.after > s.head]
        assert ahead
        assert all(s.offsets[0] == s.after + 1 for s in ahead)

        # The live control client saw the whole stream too, in the same bytes.
        control_offsets = [e["offset"] for e in control.events()]
        control_texts = dict(zip(control_offsets, event_texts(control), strict=True))
        assert sorted(control_texts) == list(range(1, ends[-1] + 1))
        assert [control_texts[o] for o in sorted(control_texts)] == stored
        assert [orjson.loads(t)["offset"] for t in stored] == list(range(1, ends[-1] + 1))
