"""The dashboards of a cluster: every node's runs, clients and figures on every node.

Each node publishes on one Redis channel, `steerway:dashboard`, through the bus's
ordered publisher: its `run.updated` and `conversation.updated` frames as encoded
for its own dashboards (a message holds the frames of one batch), and its client
count of a conversation whenever a socket connects or goes. Every other node fans
the frames out to its dashboards unchanged and keeps the counts per node, so that
`clients.updated` and the snapshot give the cluster's total. A node that
(re)subscribes says hello, and every node answers with all its counts; a node whose
liveness key expired is forgotten, with its clients.

A message is a JSON header line, `{"n": node, "k": kind}`, then its body:
`f` frames, one per line; `c` some counts, `C` all of a node's counts (a JSON
object, conversation to count); `h` hello (no body). Like the conversations' channels
it is at most once: a lost message is a dashboard out of date until the run's next
change or a new snapshot (the store has every run document), never a lost event.

The per-node figures come from each node's liveness info (`Leases.nodes()`), which
the heartbeat writes from `DashboardFeed.figures()`.
"""

from __future__ import annotations

import logging

import orjson
from redis.exceptions import RedisError

from gateway.cluster.leases import Leases
from gateway.cluster.redisbus import PREFIX, RedisBus
from gateway.dashboard import DashboardFeed
from gateway.outbox import Frame
from gateway.protocol.frames import NodeInfo

log = logging.getLogger("steerway.cluster")

CHANNEL = f"{PREFIX}dashboard".encode()


class ClusterDashboard:
    """Implements the feed's `Peers`."""

    def __init__(self, feed: DashboardFeed, bus: RedisBus, leases: Leases) -> None:
        self.feed = feed
        self.bus = bus
        self.leases = leases
        self.node = leases.node

    @classmethod
    def attach(cls, feed: DashboardFeed, bus: RedisBus, leases: Leases) -> ClusterDashboard:
        peers = cls(feed, bus, leases)
        feed.peers = peers
        bus.listen(CHANNEL, peers.on_message, peers.on_subscribed)
        return peers

    def _send(self, kind: str, body: bytes = b"") -> None:
        self.bus.send(CHANNEL, orjson.dumps({"n": self.node, "k": kind}) + b"\n" + body)

    # ------------------------------------------------------------------ Peers

    def relay(self, frames: list[Frame]) -> None:
        self._send("f", "\n".join(f.text for f in frames).encode())

    def relay_clients(self, conversation_id: str, count: int) -> None:
        self._send("c", orjson.dumps({conversation_id: count}))

    async def nodes(self) -> list[NodeInfo] | None:
        try:
            infos = await self.leases.nodes()
        except (RedisError, OSError) as exc:
            log.warning("cluster: the nodes' figures are not readable: %s", exc)
            return None
        nodes = []
        for name, info in infos.items():
            try:
                fields = orjson.loads(info)
                known = {k: v for k, v in fields.items() if k in NodeInfo.model_fields}
                nodes.append(NodeInfo.model_validate({**known, "name": name}, strict=False))
            except (ValueError, AttributeError) as exc:  # another version's, say
                log.warning("cluster: node %s's figures are unreadable: %s", name, exc)
        return nodes

    # ------------------------------------------------------------------ the channel

    def on_subscribed(self) -> None:
        """(Re)subscribed: the others' counts may have changed meanwhile; ours too."""
        self._send("h")
        self._send("C", orjson.dumps(self.feed.local))

    def on_message(self, data: bytes) -> None:
        try:
            header, _, body = data.partition(b"\n")
            meta = orjson.loads(header)
            node, kind = str(meta["n"]), meta["k"]
            if node == self.node:
                return
            if kind == "f":
                self.feed.received([Frame.of(line) for line in body.split(b"\n") if line])
            elif kind in ("c", "C"):
                counts = orjson.loads(body)
                self.feed.received_clients(
                    node, {str(c): int(n) for c, n in counts.items()}, full=kind == "C"
                )
            elif kind == "h":
                self._send("C", orjson.dumps(self.feed.local))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("cluster: an unreadable dashboard message: %s", str(exc)[:200])
