"""Slow clients (PROTOCOL.md section 6): a client that stops reading lags alone, its
queued deltas are merged, it is closed with 4008 when still behind, and it resumes
with `after` to the very same text; healthy clients of the conversation see nothing
of it."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import orjson
import websockets

from gateway.outbox import Outbox
from gateway.runners.base import RunContext
from tests.conftest import run_gateway
from tests.helpers import Runner, ack_of, assert_gap_free, delta, expect, run_completed

CHUNK = 8 * 1024


class Flood(Runner):
    """Streams `count` chunks of `size` bytes as fast as it may: with a `window`, at most
    that many chunks ahead of what the test has seen a healthy client receive (`seen`)."""

    def __init__(self, count: int, size: int = CHUNK, window: int | None = None) -> None:
        super().__init__("flood")
        self.count = count
        self.size = size
        self.credit = asyncio.Semaphore(window or count)

    def seen(self) -> None:
        self.credit.release()

    async def run(self, ctx: RunContext) -> AsyncIterator[dict[str, Any]]:
        for i in range(self.count):
            await self.credit.acquire()
            yield delta(f"{i:08d}" + "x" * (self.size - 8))
        yield run_completed()


def small_buffer_socket(port: int) -> socket.socket:
    """A client socket with a small receive buffer, so that a client that stops reading
    pushes back on the server after kilobytes, not megabytes."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


def text_of(frames: list[dict[str, Any]]) -> str:
    return "".join(f["delta"] for f in frames if f.get("type") == "message.delta")


async def test_a_client_that_stops_reading_is_merged_then_closed_4008_and_resumes() -> None:
    flood = Flood(count=3000, window=16)  # ~24 MiB: far more than every buffer on the way
    settings = {"outbox_frames": 64, "outbox_bytes": 256 * 1024}
    async with run_gateway(runners=[flood], **settings) as gw:
        slow_ws = await websockets.connect(
            gw.ws_url("slow", after=0),
            sock=small_buffer_socket(gw.port),
            max_size=None,
            max_queue=1,  # stop reading from the socket once one frame waits
        )
        try:
            async with gw.connect("slow", after=0) as healthy:
                await healthy.message("go", "m1", runner="flood")
                ack = await ack_of(healthy, "m1")
                # the run goes as fast as this healthy client reads, never faster
                ended = lambda f: f.get("type") == "run.ended"  # noqa: E731
                while not ended(frame := await healthy.recv(within=30)):
                    if frame.get("type") == "message.delta":
                        flood.seen()
                assert_gap_free(healthy)
                full = text_of(healthy.events())
                assert len(full) == 3000 * CHUNK

            # The slow client reads only now: what it was sent, then the 4008 close.
            seen: list[dict[str, Any]] = []
            try:
                async with asyncio.timeout(30):
                    async for raw in slow_ws:
                        seen.append(orjson.loads(raw))
            except websockets.ConnectionClosed:
                pass
            assert slow_ws.close_code == 4008
            assert slow_ws.close_reason == "slow_consumer"
        finally:
            await slow_ws.close()
        events = [f for f in seen if f["type"] not in ("ready", "ack")]
        offsets: list[int] = []
        for f in events:  # ascending, no gap, a merged frame covering its whole range
            first = f.get("first_offset", f["offset"])
            assert first == (offsets[-1] + 1 if offsets else 1), (first, offsets[-1:])
            offsets.append(f["offset"])
        assert offsets[-1] < ack["offset"] + 3001  # it fell behind before the end
        assert full.startswith(text_of(events))

        # Resuming with `after` gives exactly the rest: the same text in the end.
        async with gw.connect("slow", after=offsets[-1]) as again:
            await expect(again, "run.ended", run_id=ack["run_id"], within=30)
            assert_gap_free(again, first=offsets[-1] + 1)
            assert text_of(events) + text_of(again.events()) == full
        assert gw.hub.metrics.slow_consumers._value.get() == 1


async def test_a_lagging_client_gets_merged_deltas_with_their_first_offset() -> None:
    # Direct unit of the same rule through the real bus: a subscriber that does not read
    # while 200 deltas of one message arrive sees them merged into few frames.
    flood = Flood(count=200, size=100)
    async with run_gateway(runners=[flood], outbox_frames=16) as gw:
        lagging = Outbox(max_frames=16)
        gw.hub.bus.subscribe("lag", lagging)
        try:
            async with gw.connect("lag", after=0) as client:
                await client.message("go", "m1", runner="flood")
                ack = await ack_of(client, "m1")
                await expect(client, "run.ended", run_id=ack["run_id"], within=30)
                full = text_of(client.events())
        finally:
            gw.hub.bus.unsubscribe("lag", lagging)
        lagging.close()
        frames = []
        while (frame := await lagging.get()) is not None:
            frames.append(orjson.loads(frame.text))
        assert not lagging.overflowed
        assert len(frames) <= 16
        merged = [f for f in frames if "first_offset" in f]
        assert merged
        assert all(f["offset"] > f["first_offset"] for f in merged)
        assert text_of(frames) == full
