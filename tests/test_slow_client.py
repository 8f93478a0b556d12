"""Slow clients (PROTOCOL.md section 6): a client that stops reading lags alone, its
queued deltas are merged, it is closed with 4008 when still behind, and it resumes
with `after` to the very same text; healthy clients of the conversation see nothing
of it."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import websockets

from gateway.outbox import Outbox
from gateway.runners.base import RunContext
from tests.conftest import Client, Gateway, run_gateway
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


# --------------------------------------------------------------------------- among 20 others

HEALTHY = 20
PACED = 600  # chunks of one run
PACE_S = 0.001
CHUNK_BYTES = 4096
STAMP = re.compile(r"(\d+)@(\d+\.\d+)\|")


class Paced(Runner):
    """A fast run: `count` chunks of `size` bytes, one every `pace_s`, each stamped with
    its index and the perf_counter() at which the runner yields it."""

    def __init__(self, count: int, size: int, pace_s: float) -> None:
        super().__init__("paced")
        self.count, self.size, self.pace_s = count, size, pace_s

    async def run(self, ctx: RunContext) -> AsyncIterator[dict[str, Any]]:
        for i in range(self.count):
            stamp = f"{i}@{time.perf_counter():.6f}|"
            yield delta(stamp + "x" * (self.size - len(stamp)))
            await asyncio.sleep(self.pace_s)  # the agent's own pace
        yield run_completed()


def small_server_buffer(gw: Gateway, client_port: int) -> None:
    """The server's kernel buffer of one connection made small too: Linux lets it grow to
    megabytes, which would make "behind" depend on the machine instead of the outbox."""
    for conn in gw.server.server_state.connections:
        if conn.transport.get_extra_info("peername")[1] == client_port:
            conn.transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_SNDBUF, 4096
            )
            return
    raise AssertionError("no such connection")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def healthy_latencies(client: Client, run_id: str, sample: Callable[[], None]) -> list[float]:
    """Read to the run's end: for each chunk, from its runner yield to its arrival here."""
    latencies: list[float] = []
    while (frame := await client.recv(within=30))["type"] != "run.ended":
        if frame["type"] == "message.delta":
            now = time.perf_counter()
            latencies += [now - float(t) for _, t in STAMP.findall(frame["delta"])]
            sample()
    assert frame["run_id"] == run_id
    return latencies


async def test_one_slow_client_among_20_healthy_ones_costs_them_nothing() -> None:
    """Latency of 20 healthy clients over a fast run (600 chunks of 4 KiB, 2.4 MiB), with
    and without one client that stops reading, on the same gateway in the same test:
    their median and 95th percentile stay within 2x of the run without it, or within
    +20 ms where that is larger (a shared 2-core machine jitters by milliseconds).
    The gateway's buffers for any one client stay within the outbox bound plus one
    transport high-water mark, however far the slow client falls behind; it is closed
    4008 and, resuming with `after`, ends with exactly the text the others got."""
    paced = Paced(PACED, CHUNK_BYTES, PACE_S)
    outbox_bytes = 256 * 1024
    settings = {"outbox_frames": 64, "outbox_bytes": outbox_bytes, "rate_burst": 1000}
    async with run_gateway(runners=[paced], **settings) as gw:
        most = {"outbox": 0, "transport": 0}

        def sample() -> None:
            subs = gw.hub.bus._subs.get("with-slow", {})  # type: ignore[attr-defined]
            most["outbox"] = max([most["outbox"], *(s.queued_bytes for s in subs)])
            most["transport"] = max([most["transport"], *gw.write_buffers()])

        async def one_run(cid: str) -> tuple[list[float], str, dict[str, Any]]:
            async with contextlib.AsyncExitStack() as stack:
                clients = [
                    await stack.enter_async_context(gw.connect(cid, after=0))
                    for _ in range(HEALTHY)
                ]
                await clients[0].message("go", "m1", runner="paced")
                ack = await ack_of(clients[0], "m1")
                runs = await asyncio.gather(
                    *(healthy_latencies(c, ack["run_id"], sample) for c in clients)
                )
                texts = {text_of(c.events()) for c in clients}
                assert len(texts) == 1
                return [x for run in runs for x in run], texts.pop(), ack

        baseline, _, _ = await one_run("baseline")
        slow_ws = await websockets.connect(
            gw.ws_url("with-slow", after=0),
            sock=small_buffer_socket(gw.port),
            max_size=None,
            max_queue=1,  # stop reading from the socket once one frame waits
        )
        small_server_buffer(gw, slow_ws.local_address[1])
        try:
            with_slow, full, ack = await one_run("with-slow")
            seen: list[dict[str, Any]] = []
            with contextlib.suppress(websockets.ConnectionClosed):
                async with asyncio.timeout(30):
                    async for raw in slow_ws:
                        seen.append(orjson.loads(raw))
            assert (slow_ws.close_code, slow_ws.close_reason) == (4008, "slow_consumer")
        finally:
            await slow_ws.close()

        assert len(baseline) == len(with_slow) == HEALTHY * PACED
        for q in (0.5, 0.95):
            base, slow = percentile(baseline, q), percentile(with_slow, q)
            assert slow <= max(2 * base, base + 0.020), (q, base, slow)

        assert len(full) == PACED * CHUNK_BYTES  # the run streamed 2.4 MiB ...
        assert most["outbox"] <= outbox_bytes  # ... and no client's backlog grew past this
        assert most["transport"] <= 64 * 1024 + 2 * CHUNK_BYTES

        events = [f for f in seen if f["type"] not in ("ready", "ack")]
        last = events[-1]["offset"]
        assert last < ack["offset"] + PACED  # it fell behind before the end
        async with gw.connect("with-slow", after=last) as again:
            await expect(again, "run.ended", run_id=ack["run_id"], within=30)
            assert_gap_free(again, first=last + 1)
            assert text_of(events) + text_of(again.events()) == full
