"""One node of a cluster: the Redis connection, the bus, leases and forwarding, and the
loops that keep them true.

- The heartbeat renews this node's liveness ten times per lease time; after Redis lost
  it (a restart keeps nothing), the node takes its leases again before anything else.
- The monitor takes over, once a second, the conversations this node has clients of
  whose lease holder is gone, and, every half lease time, every conversation with a
  live run (running or queued, and so its waiting steering) that no live node holds:
  a node that dies (`kill -9`) leaves nothing hanging for longer than the lease time.
  Taking over is crash recovery (`ConversationHub.get`): the runs it was running end
  `failed`/`node_lost`, waiting steering becomes a follow-up, queued runs go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.cluster.dashboard import ClusterDashboard
from gateway.cluster.forwarding import Forwarder, RemoteConversation
from gateway.cluster.leases import Leases, holder_node
from gateway.cluster.redisbus import RedisBus
from gateway.cluster.runners import ClusterRunners
from gateway.conversation import ConversationHub, ConversationRef
from gateway.errors import SteerwayError, StoreUnavailable
from gateway.runners.remote import RemotePool
from store.base import StoreError

log = logging.getLogger("steerway.cluster")

MONITOR_S = 1.0
LEFT = b"steerway:left"  # a node that leaves says so: the others sweep at once


class ClusterNode:
    """Implements the hub's `Ownership`; `attach` makes a hub a cluster node."""

    def __init__(
        self, hub: ConversationHub, redis_url: str, lease_s: float, pool: RemotePool | None = None
    ) -> None:
        self.hub = hub
        self.node = hub.node
        self.redis = Redis.from_url(
            redis_url, socket_timeout=lease_s / 4, socket_connect_timeout=lease_s / 4
        )
        self.leases = Leases(self.redis, self.node, lease_s)
        self.bus = RedisBus(self.redis, hub.store, self.node, self._node_message)
        self.forwarder = Forwarder(hub, self.bus)
        self.runners = (
            ClusterRunners(self.forwarder, self.leases, pool) if pool is not None else None
        )
        self.draining = False
        self._sweep = asyncio.Event()  # sweep for conversations to take over now
        self.bus.listen(LEFT, lambda _: self._sweep.set(), lambda: None)
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[Any]] = set()

    @classmethod
    def attach(
        cls, hub: ConversationHub, redis_url: str, lease_s: float, pool: RemotePool | None = None
    ) -> ClusterNode:
        node = cls(hub, redis_url, lease_s, pool)
        hub.bus = node.bus
        hub.cluster = node
        hub.metrics.cluster(
            lambda: len(node.leases.held), lambda: node.bus.filled, lambda: node.bus.dropped
        )
        ClusterDashboard.attach(hub.dashboard, node.bus, node.leases)
        return node

    def _node_message(self, data: bytes) -> None:
        self.forwarder.on_message(data)

    # ------------------------------------------------------------------ Ownership

    def valid(self) -> bool:
        return self.leases.valid()

    def holds(self, conversation_id: str) -> bool:
        return self.leases.holds(conversation_id)

    async def acquire(self, conversation_id: str) -> str | None:
        if self.draining:
            holder = await self._holder(conversation_id)
            if holder is None:
                raise StoreUnavailable("this node is shutting down; reconnect")
            return holder
        if not self.leases.valid():
            raise StoreUnavailable("the cluster's Redis is unavailable; nothing was stored")
        try:
            return await self.leases.acquire(conversation_id)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"the cluster's Redis is unavailable: {exc}") from None

    async def _holder(self, conversation_id: str) -> str | None:
        """Another live node holding the conversation, if any (asked while draining)."""
        with contextlib.suppress(RedisError, OSError):
            free = await self.leases.free([conversation_id])
            if not free:
                value = await self.redis.get(Leases.key(conversation_id))
                if value is not None:
                    node = holder_node(value.decode() if isinstance(value, bytes) else value)
                    return None if node == self.node else node
        return None

    def release(self, conversation_id: str) -> None:
        self._spawn(self._release(conversation_id))

    async def _release(self, conversation_id: str) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self.leases.release(conversation_id)

    def remote(self, conversation_id: str, holder: str) -> ConversationRef:
        return RemoteConversation(self.forwarder, conversation_id, holder)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self.bus.start()
        self.forwarder.start()
        if self.runners is not None:
            self.runners.start()
        try:
            await self._beat()
        except (RedisError, OSError) as exc:
            log.error("cluster: Redis does not answer yet (%s); not ready until it does", exc)
        self._tasks = [
            asyncio.create_task(self._heartbeat(), name="cluster-heartbeat"),
            asyncio.create_task(self._monitor(), name="cluster-monitor"),
        ]
        log.info("cluster: node %s, lease %.1f s", self.node, self.leases.lease_s)

    def drain(self) -> None:
        """SIGTERM: take no conversation any more (the runs here get their grace)."""
        self.draining = True

    async def stop(self) -> None:
        """Leave the cluster: leases and liveness go at once, so that other nodes take
        this node's conversations over without waiting for them to expire."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.runners is not None:
            await self.runners.stop()
        with contextlib.suppress(RedisError, OSError):
            await self.leases.drop()
            await self.redis.publish(LEFT, self.node)
        await self.forwarder.stop()
        await self.bus.stop()
        for task in list(self._background):
            task.cancel()
        await self.redis.aclose()

    async def ping(self) -> None:
        """Raise unless Redis answers and this node's leases are live."""
        try:
            await self.redis.ping()
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"Redis does not answer: {exc}") from None
        if not self.leases.valid() or not self.bus.connected.is_set():
            raise StoreUnavailable("this node's leases are not live yet")

    # ------------------------------------------------------------------ loops

    def info(self) -> dict[str, Any]:
        """What the liveness key says of this node: the dashboards' figures, and the
        places its remote runners offer to the other nodes."""
        info = self.hub.dashboard.figures().wire()
        info["runners"] = self.runners.offered() if self.runners is not None else {}
        return info

    async def _beat(self) -> None:
        if await self.leases.beat(orjson.dumps(self.info())):
            for cid in await self.leases.reassert():
                log.warning("cluster: %s is held by another node now", cid)
                actor = self.hub.actors.get(cid)
                if actor is not None:
                    actor.fence()
            self.leases.confirm()  # only now: no actor of a lost lease writes meanwhile

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.leases.beat_s)
            try:
                await self._beat()
            except (RedisError, OSError) as exc:
                if self.leases.valid():
                    log.error("cluster: heartbeat failed: %s", exc)

    async def _monitor(self) -> None:
        sweep_every = max(1, round(self.leases.lease_s / 2 / MONITOR_S))
        for tick in range(1 << 62):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(MONITOR_S):
                    await self._sweep.wait()
            sweep = self._sweep.is_set() or tick % sweep_every == 0
            self._sweep.clear()
            if self.draining or not self.leases.valid():
                continue
            try:
                joined = [cid for cid in self.bus.joined() if cid not in self.hub.actors]
                wanted = await self.leases.lost(joined)
                if sweep:
                    live = {doc["conversation_id"] for doc in await self.hub.store.live_runs(None)}
                    live -= set(self.hub.actors)
                    wanted += await self.leases.free(sorted(live))
            except (RedisError, OSError, StoreError) as exc:
                log.warning("cluster: monitor skipped a round: %s", exc)
                continue
            for cid in dict.fromkeys(wanted):
                try:
                    ref = await self.hub.get(cid)
                except SteerwayError as exc:
                    log.warning("cluster: taking %s over failed: %s", cid, exc)
                    continue
                if not isinstance(ref, RemoteConversation):
                    log.info("cluster: took %s over", cid)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
