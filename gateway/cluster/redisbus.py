"""The Redis bus: a conversation's events reach every node with clients of it.

The owner publishes each stored batch once, on the conversation's channel, as its
frames' texts (encoded once on the owner, relayed as they are). Pub/sub is at most
once: a node that sees an offset jump, or learns from the owner's head ticks that it
missed the end of a stream, reads the gap from the store before it delivers anything
after it, so its subscribers see every offset once, in order (PROTOCOL.md section 2).
Events are published only once stored, so the store always has what a gap lacks.

A message on the wire: one JSON header line, then the frames' texts, one a line
(JSON text never holds a raw newline): `{"n": node, "o": first offset}` for events,
`{"n": node, "h": head}` for a head tick, `{"n": node, "b": 1}` for ephemeral frames
(presence: no offset, delivered as they come, never gap-filled). A node's own messages
come back from Redis and are skipped: it delivered them when it published.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ResponseError

from gateway.bus import MemoryBus, Subscriber
from gateway.errors import StoreUnavailable
from gateway.outbox import Frame
from store.base import Store, StoreError

log = logging.getLogger("steerway.cluster")

PREFIX = "steerway:"
PUBLISH_QUEUE = 8192  # messages waiting for Redis; beyond, dropped (gaps are filled)
PENDING = 256  # messages held while a gap is read; beyond, only their last offset is kept
FILL_PAGE = 500
TICK_S = 1.0  # head ticks of the conversations that published in the last tick
JOIN_TIMEOUT_S = 5.0
SEND_TIMEOUT_S = 2.5  # a write to Redis that takes longer: the connection is made again


def conversation_channel(conversation_id: str) -> bytes:
    return f"{PREFIX}c:{conversation_id}".encode()


def node_channel(node: str) -> bytes:
    return f"{PREFIX}n:{node}".encode()


@dataclass(eq=False)
class _Channel:
    """This node's view of one conversation's stream."""

    refs: int = 0  # joins not yet left
    delivered: int | None = None  # the last offset handed to subscribers; None: loading
    seen: int = 0  # the highest offset known to be published
    filling: bool = False
    pending: list[tuple[int, list[Frame]]] = field(default_factory=list)
    ready: asyncio.Future[None] | None = None
    confirmed: asyncio.Event = field(default_factory=asyncio.Event)


class RedisBus:
    def __init__(
        self,
        redis: Redis,
        store: Store,
        node: str,
        on_node_message: Callable[[bytes], None],
    ) -> None:
        self.redis = redis
        self.store = store
        self.node = node
        self._on_node_message = on_node_message
        self._local = MemoryBus()  # this node's subscribers
        self._own = orjson.dumps({"n": node})[:-1] + b","  # how this node's messages start
        self._node_channel = node_channel(node)
        self.on_broadcast: Callable[[str, list[Frame]], None] | None = None
        self._channels: dict[str, _Channel] = {}
        self._outgoing: asyncio.Queue[tuple[bytes, bytes]] = asyncio.Queue(PUBLISH_QUEUE)
        self._recent: dict[str, int] = {}  # conversation -> head, published since the tick
        self._pubsub: PubSub | None = None
        # other channels this node reads (the dashboards'): (on a message, on subscribed)
        self._listeners: dict[bytes, tuple[Callable[[bytes], None], Callable[[], None]]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._fills: set[asyncio.Task[None]] = set()
        self.connected = asyncio.Event()
        self.dropped = 0  # messages not sent to Redis (queue full or Redis down)
        self.filled = 0  # events read from the store to fill gaps
        self.connections = 0  # subscriptions made to Redis: 1 until it goes away

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._read(), name="redisbus-read"),
            asyncio.create_task(self._send(), name="redisbus-send"),
            asyncio.create_task(self._tick(), name="redisbus-tick"),
        ]

    async def stop(self) -> None:
        for task in [*self._tasks, *self._fills]:
            task.cancel()
        for task in [*self._tasks, *self._fills]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()

    # ------------------------------------------------------------------ the Bus interface

    async def join(self, conversation_id: str) -> None:
        ch = self._channels.get(conversation_id)
        if ch is None:
            ch = self._channels[conversation_id] = _Channel()
            ch.ready = asyncio.get_running_loop().create_future()
            self._spawn(self._open(conversation_id, ch))
        ch.refs += 1
        assert ch.ready is not None
        try:
            async with asyncio.timeout(JOIN_TIMEOUT_S):
                await asyncio.shield(ch.ready)
        except (TimeoutError, StoreError, OSError) as exc:
            self.leave(conversation_id)
            raise StoreUnavailable(f"the cluster bus is unavailable: {exc!r}") from None

    def leave(self, conversation_id: str) -> None:
        ch = self._channels.get(conversation_id)
        if ch is None:
            return
        ch.refs -= 1
        if ch.refs <= 0:
            del self._channels[conversation_id]
            if ch.ready is not None and not ch.ready.done():
                ch.ready.cancel()
            if self._pubsub is not None:
                self._spawn(self._unsubscribe(conversation_channel(conversation_id)))

    def joined(self) -> list[str]:
        """The conversations this node has clients of."""
        return list(self._channels)

    def head(self, conversation_id: str) -> int | None:
        ch = self._channels.get(conversation_id)
        return None if ch is None else ch.delivered

    def subscribe(self, conversation_id: str, subscriber: Subscriber) -> None:
        self._local.subscribe(conversation_id, subscriber)

    def unsubscribe(self, conversation_id: str, subscriber: Subscriber) -> None:
        self._local.unsubscribe(conversation_id, subscriber)

    def count(self, conversation_id: str) -> int:
        return self._local.count(conversation_id)

    def publish(self, conversation_id: str, frames: list[Frame]) -> None:
        """The owner's stored batch: to this node's subscribers now, to the others
        through Redis."""
        if not frames:
            return
        first = frames[0].offset
        self._incoming(conversation_id, first, frames)
        self._recent[conversation_id] = frames[-1].offset
        header = orjson.dumps({"n": self.node, "o": first})
        body = "\n".join(f.text for f in frames).encode()
        self.send(conversation_channel(conversation_id), header + b"\n" + body)

    def listen(
        self, channel: bytes, on_message: Callable[[bytes], None], on_subscribed: Callable[[], None]
    ) -> None:
        """Read `channel` too (before `start`): `on_subscribed` is called each time the
        subscription is made, again after Redis came back."""
        self._listeners[channel] = (on_message, on_subscribed)

    def broadcast(self, conversation_id: str, frames: list[Frame], here: bool = True) -> None:
        """Ephemeral frames: to this node's subscribers now (unless not `here`), to the
        other nodes' through Redis, at most once."""
        if not frames:
            return
        if here:
            self._deliver(conversation_id, frames)
        body = "\n".join(f.text for f in frames).encode()
        header = orjson.dumps({"n": self.node, "b": 1})
        self.send(conversation_channel(conversation_id), header + b"\n" + body)

    def send(self, channel: bytes, data: bytes) -> None:
        """Queue a message for Redis, in order; dropped when the queue is full."""
        try:
            self._outgoing.put_nowait((channel, data))
        except asyncio.QueueFull:
            self.dropped += 1

    # ------------------------------------------------------------------ delivery

    def _deliver(self, conversation_id: str, frames: list[Frame]) -> None:
        self._local.publish(conversation_id, frames)

    def _incoming(self, cid: str, first: int, frames: list[Frame]) -> None:
        ch = self._channels.get(cid)
        if ch is None:
            return
        last = first + len(frames) - 1
        ch.seen = max(ch.seen, last)
        if ch.delivered is None or ch.filling:
            if len(ch.pending) < PENDING:
                ch.pending.append((first, frames))
            return
        if last <= ch.delivered:
            return  # already delivered (a replayed or duplicated message)
        if first > ch.delivered + 1:  # a message was lost or is late: the store has it
            ch.pending.append((first, frames))
            self._fill(cid, ch)
            return
        fresh = frames[ch.delivered + 1 - first :]
        ch.delivered = last
        self._deliver(cid, fresh)

    def _fill(self, cid: str, ch: _Channel) -> None:
        if not ch.filling:
            ch.filling = True
            self._spawn(self._fill_gap(cid, ch))

    async def _fill_gap(self, cid: str, ch: _Channel) -> None:
        """Deliver what waited where it follows on, and the rest from the store, up to
        the highest offset seen."""
        try:
            while self._channels.get(cid) is ch:
                self._drain(cid, ch)
                assert ch.delivered is not None
                if ch.delivered >= ch.seen:
                    return
                # up to what the held messages have, else to the highest offset seen
                upto = min((first - 1 for first, _ in ch.pending), default=ch.seen)
                wanted = min(FILL_PAGE, upto - ch.delivered)
                texts = await self.store.read_events(cid, ch.delivered, wanted)
                if not texts:
                    return  # the next message or head tick tries again
                start = ch.delivered + 1
                if self._channels.get(cid) is not ch or ch.delivered + 1 != start:
                    return
                frames = [_frame(text, start + i) for i, text in enumerate(texts)]
                ch.delivered += len(frames)
                self.filled += len(frames)
                self._deliver(cid, frames)
        except (StoreError, OSError) as exc:
            log.warning("%s: gap not filled yet: %s", cid, exc)
        finally:
            ch.filling = False

    def _drain(self, cid: str, ch: _Channel) -> None:
        """Deliver the held messages that follow on from what was delivered."""
        kept: list[tuple[int, list[Frame]]] = []
        for first, frames in sorted(ch.pending, key=lambda item: item[0]):
            assert ch.delivered is not None
            last = first + len(frames) - 1
            if last <= ch.delivered:
                continue
            if first > ch.delivered + 1:
                kept.append((first, frames))
                continue
            fresh = frames[ch.delivered + 1 - first :]
            ch.delivered = last
            self._deliver(cid, fresh)
        ch.pending = kept

    async def _open(self, cid: str, ch: _Channel) -> None:
        """Subscribe, then read the head: every event after it arrives on the channel."""
        assert ch.ready is not None
        try:
            await self.connected.wait()
            assert self._pubsub is not None
            await self._pubsub.subscribe(conversation_channel(cid))
            await ch.confirmed.wait()
            head = await self.store.last_offset(cid)
        except BaseException as exc:
            if not ch.ready.done():
                ch.ready.set_exception(exc if isinstance(exc, Exception) else StoreError("stopped"))
                ch.ready.exception()
            if self._channels.get(cid) is ch:
                del self._channels[cid]
            raise
        ch.delivered = head
        ch.seen = max(ch.seen, head)
        if ch.pending or ch.seen > head:
            self._fill(cid, ch)
        if not ch.ready.done():
            ch.ready.set_result(None)

    async def _resync(self, cid: str, ch: _Channel) -> None:
        """After Redis came back: whatever was published meanwhile is in the store."""
        try:
            head = await self.store.last_offset(cid)
        except StoreError as exc:
            log.warning("%s: resync failed: %s", cid, exc)
            return
        if ch.delivered is not None and head > ch.delivered:
            ch.seen = max(ch.seen, head)
            self._fill(cid, ch)

    # ------------------------------------------------------------------ Redis I/O

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._fills.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._fills.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("cluster bus task failed: %r", task.exception())

    async def _unsubscribe(self, channel: bytes) -> None:
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.unsubscribe(channel)

    async def _read(self) -> None:
        delay = 0.05
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(node_channel(self.node))
                for channel in self._listeners:
                    await pubsub.subscribe(channel)
                for cid, ch in self._channels.items():
                    ch.confirmed.clear()
                    await pubsub.subscribe(conversation_channel(cid))
                self._pubsub = pubsub
                self.connections += 1
                self.connected.set()
                delay = 0.05
                while True:
                    message = await pubsub.get_message(timeout=None)
                    if message is None:
                        continue
                    try:
                        self._on_message(message)
                    except Exception as exc:  # a malformed message: never the reader's end
                        log.warning("cluster bus: an unreadable message: %s", str(exc)[:200])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.connected.is_set():
                    log.error("cluster bus: Redis connection lost: %s", exc)
                self.connected.clear()
                self._pubsub = None
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _on_message(self, message: dict[str, object]) -> None:
        kind = message.get("type")
        channel = message.get("channel")
        assert isinstance(channel, bytes)
        listener = self._listeners.get(channel)
        if listener is not None:
            if kind == "subscribe":
                listener[1]()
            elif kind == "message":
                data = message.get("data")
                assert isinstance(data, bytes)
                listener[0](data)
            return
        if kind == "subscribe":
            cid = channel.decode()[len(PREFIX) + 2 :]
            ch = self._channels.get(cid)
            if ch is not None and not ch.confirmed.is_set():
                ch.confirmed.set()
                if ch.delivered is not None:  # subscribed again after an outage
                    self._spawn(self._resync(cid, ch))
            return
        if kind != "message":
            return
        data = message.get("data")
        assert isinstance(data, bytes)
        if channel == self._node_channel:
            self._on_node_message(data)
            return
        if data.startswith(self._own):
            return  # delivered here when it was published
        header, _, body = data.partition(b"\n")
        meta = orjson.loads(header)
        cid = channel.decode()[len(PREFIX) + 2 :]
        if "b" in meta:  # ephemeral: no offset, nothing to order or fill
            frames = [Frame.of(text) for text in body.split(b"\n")]
            self._deliver(cid, frames)
            if self.on_broadcast is not None:
                self.on_broadcast(cid, frames)
            return
        if "h" in meta:
            ch = self._channels.get(cid)
            if ch is not None and ch.delivered is not None and meta["h"] > ch.delivered:
                ch.seen = max(ch.seen, int(meta["h"]))
                self._fill(cid, ch)
            return
        first = int(meta["o"])
        texts = body.split(b"\n")
        self._incoming(cid, first, [_frame_bytes(t, first + i) for i, t in enumerate(texts)])

    async def _send(self) -> None:
        """Publish what is queued, in order, on a connection of its own whose replies are
        off (CLIENT REPLY OFF): no reply comes back to wake this node per message, and
        Redis writes none (unless Redis refuses: then the replies are read). A publish is
        at most once either way: receivers fill gaps."""
        pool = self.redis.connection_pool
        timeout = pool.connection_kwargs.get("socket_timeout") or SEND_TIMEOUT_S
        conn: AbstractConnection | None = None
        replies = False
        try:
            while True:
                items = [await self._outgoing.get()]
                while not self._outgoing.empty() and len(items) < 256:
                    items.append(self._outgoing.get_nowait())
                try:
                    async with asyncio.timeout(timeout):  # one timer, not redis-py's wait_for
                        if conn is None:
                            # socket_timeout None: redis-py would wrap each write in a task
                            conn = pool.connection_class(
                                **{**pool.connection_kwargs, "socket_timeout": None}
                            )
                            await conn.connect()  # type: ignore[no-untyped-call]
                            replies = replies or not await _replies_off(conn)
                        packed = conn.pack_commands([("PUBLISH", c, d) for c, d in items])
                        await conn.send_packed_command(packed, check_health=False)
                        for _ in items if replies else ():
                            await conn.read_response()
                except Exception as exc:
                    self.dropped += len(items)
                    log.debug("cluster bus: publish failed: %s", exc)
                    if conn is not None:
                        await _disconnect(conn)
                        conn = None
        finally:
            if conn is not None:
                await _disconnect(conn)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            recent, self._recent = self._recent, {}
            for cid, head in recent.items():
                header = orjson.dumps({"n": self.node, "h": head})
                self.send(conversation_channel(cid), header)


async def _replies_off(conn: AbstractConnection) -> bool:
    """Turn a connection's replies off; False when Redis refuses (an ACL without
    `client|reply`). OFF answers nothing once it works, so ON follows it, whose OK is
    then the first answer (else OFF's error is), and OFF is sent again."""
    both = [("CLIENT", "REPLY", "OFF"), ("CLIENT", "REPLY", "ON")]
    await conn.send_packed_command(conn.pack_commands(both), check_health=False)
    try:
        await conn.read_response()
    except ResponseError as exc:
        with contextlib.suppress(ResponseError):
            await conn.read_response()  # ON's answer
        log.warning("cluster bus: Redis refused CLIENT REPLY OFF, publishing with replies: %s", exc)
        return False
    await conn.send_command("CLIENT", "REPLY", "OFF", check_health=False)
    return True


async def _disconnect(conn: AbstractConnection) -> None:
    with contextlib.suppress(Exception):
        await conn.disconnect()


def _frame(text: str, offset: int) -> Frame:
    return _frame_bytes(text.encode(), offset)


def _frame_bytes(data: bytes, offset: int) -> Frame:
    frame = Frame.of(data, offset)
    frame.unparsed = True  # most clients keep up: no delta is ever merged
    return frame
