"""Per-client delivery: a bounded send queue that merges deltas when the client lags.

Events are encoded once, into a `Frame` that every client's outbox shares (the
text, the ASGI message dict and the WebSocket frame alike).  While a client keeps
up, a frame goes straight to its socket (`direct`) and the queue stays empty.
An outbox holds at most `max_frames` frames or `max_bytes` bytes; when a put
goes over, consecutive `message.delta` frames of one message still queued are
merged (PROTOCOL.md section 6), and if the client is still over the bound it is
marked `overflowed` and `on_overflow` is called: the connection is closed with 4008 at
once (its writer may be waiting for a socket that the client no longer reads), and
nothing else waits for it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.protocol.frames import CoalescedDelta, MessageDelta, coalesce, delta_of, encode
from gateway.wsserver import text_frame


@dataclass(slots=True, eq=False)
class Frame:
    """One encoded frame, shared by every client it goes to."""

    text: str
    size: int  # bytes of the UTF-8 text
    offset: int = 0  # 0 for frames that are not events (ready, ack, error, pong)
    delta: MessageDelta | None = None  # set on message.delta, for merging
    born: float = 0.0  # perf_counter() of the runner result behind it; 0 when none
    # a relayed event's text (cluster): `delta` is parsed only if a client lags
    unparsed: bool = False
    message: dict[str, Any] = field(init=False)  # the ASGI send message, built once
    _framed: bytes | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.message = {"type": "websocket.send", "text": self.text}

    @classmethod
    def of(cls, data: bytes, offset: int = 0, delta: MessageDelta | None = None) -> Frame:
        return cls(data.decode(), len(data), offset, delta)

    def message_delta(self) -> MessageDelta | None:
        """The delta to merge (section 6), None for any other frame."""
        if self.unparsed:
            self.unparsed = False
            try:
                self.delta = delta_of(self.text)
            except ValueError:  # pydantic's ValidationError too: a frame never merged
                self.delta = None
        return self.delta

    def framed(self) -> bytes:
        """The whole WebSocket frame, built on first use and shared by every client."""
        if self._framed is None:
            self._framed = text_frame(self.text.encode())
        return self._framed


class Outbox:
    """The bounded, coalescing send queue of one client connection."""

    __slots__ = (
        "_bytes",
        "_loop",
        "_q",
        "_waiter",
        "closed",
        "direct",
        "events_only",
        "floor",
        "max_bytes",
        "max_frames",
        "merged",
        "on_overflow",
        "overflowed",
    )

    def __init__(self, max_frames: int = 256, max_bytes: int = 1024 * 1024, floor: int = 0):
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self.floor = floor  # highest event offset queued or sent: later ones only
        self._q: deque[Frame] | None = None  # made on first use: most clients keep up
        self._bytes = 0
        self._waiter: asyncio.Future[None] | None = None
        self._loop = asyncio.get_running_loop()
        self.overflowed = False
        self.closed = False
        self.merged = 0  # frames saved by merging, for metrics and tests
        # a client that did not ask for presence: the bus's ephemeral frames are not for it
        self.events_only = False
        # Writes a frame to the socket at once, or says False: used only while the queue is
        # empty and its writer is parked, so that order is kept.
        self.direct: Callable[[Frame], bool] | None = None
        self.on_overflow: Callable[[], None] | None = None

    def __len__(self) -> int:
        return len(self._q) if self._q is not None else 0

    @property
    def queued_bytes(self) -> int:
        return self._bytes

    def deliver(self, frames: list[Frame]) -> None:
        """Bus subscriber entry point: events of this conversation, ascending, and
        ephemeral frames (offset 0)."""
        for frame in frames:
            if frame.offset or not self.events_only:
                self.put(frame)

    def put(self, frame: Frame) -> None:
        if self.closed or self.overflowed:
            return
        if frame.offset:
            if frame.offset <= self.floor:
                return  # already sent by the replay: every offset exactly once
            self.floor = frame.offset
        if not self._q and self.direct is not None:
            waiter = self._waiter
            if waiter is not None and not waiter.done() and self.direct(frame):
                return
        q = self._q
        if q is None:
            q = self._q = deque()
        q.append(frame)
        self._bytes += frame.size
        if len(q) > self.max_frames or self._bytes > self.max_bytes:
            q = self._q = self._merge(q)
            # One frame alone is always taken, however large (a result of up to 1 MiB
            # makes an event a little over it): only a backlog overflows, and a merged
            # delta over the bound is one (else it would grow with the message, unbounded).
            alone = len(q) == 1 and not isinstance(q[0].message_delta(), CoalescedDelta)
            backlog = self._bytes > self.max_bytes and not alone
            if len(q) > self.max_frames or backlog:
                self.overflowed = True
                q.clear()
                self._bytes = 0
                if self.on_overflow is not None:
                    self.on_overflow()
        self._wake()

    def close(self) -> None:
        self.closed = True
        self._wake()

    async def get(self) -> Frame | None:
        """The next frame to send; None once the outbox is closed or overflowed."""
        while not (q := self._q):
            if self.closed or self.overflowed:
                return None
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self.overflowed:
            return None
        frame = q.popleft()
        self._bytes -= frame.size
        return frame

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _merge(self, q: deque[Frame]) -> deque[Frame]:
        """Merge runs of consecutive deltas of one message into single frames."""
        out: deque[Frame] = deque()
        run: list[Frame] = []

        def flush() -> None:
            if len(run) == 1:
                out.append(run[0])
            elif run:
                parts = [d for f in run if (d := f.message_delta()) is not None]
                merged = coalesce(parts[0], parts)
                frame = Frame.of(encode(merged), merged.offset, merged)
                frame.born = run[0].born
                out.append(frame)
                self.merged += len(run) - 1
            run.clear()

        for frame in q:
            d = frame.message_delta()
            last = run[-1].delta if run else None  # parsed when it joined the run
            if d is not None and last is not None and last.message_id == d.message_id:
                run.append(frame)
                continue
            flush()
            if d is not None:
                run.append(frame)
            else:
                out.append(frame)
        flush()
        self._bytes = sum(f.size for f in out)
        return out
