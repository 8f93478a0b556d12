"""Leases: which node runs each conversation's actor.

A conversation's lease is a Redis key naming its holder (`node token`). It is valid
while the holder's liveness key lives: every node renews its own liveness key, one
command a beat for all its conversations, instead of one renewal per conversation.
A node whose liveness key expired (killed, paused, cut off) loses every lease at
once, and any node may take them. A node that cannot renew in time stops writing
by itself (`valid`), before another can take over; the store's fencing epochs
(`Store.claim`) refuse whatever a late writer still sends.

Keys (prefix `steerway:`): `alive:<node>` (PX = the lease time's half, renewed ten
times per lease time), `lease:<conversation>` (no expiry needed: a dead holder's
lease is taken over; kept for a day at most).
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from redis.asyncio import Redis

PREFIX = "steerway:"
LEASE_KEEP_MS = 24 * 3600 * 1000
# A node stops writing this share of the liveness time before its key can expire,
# so that clock rate differences and a slow command do not let two nodes write.
SAFETY = 0.8

# KEYS[1] lease; ARGV: our value, our node, alive prefix, keep ms.
# The holder's node is the value up to its first space.
ACQUIRE = """
local held = redis.call('GET', KEYS[1])
if held then
  local node = string.match(held, '^[^ ]+')
  if node ~= ARGV[2] and redis.call('EXISTS', ARGV[3] .. node) == 1 then
    return held
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[4])
return ARGV[1]
"""

# KEYS[1] lease; ARGV[1] our value: delete only our own lease
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def holder_node(value: str) -> str:
    return value.split(" ", 1)[0]


class Leases:
    def __init__(self, redis: Redis, node: str, lease_s: float) -> None:
        if " " in node:
            raise ValueError(f"a node name has no spaces: {node!r}")
        self.redis = redis
        self.node = node
        self.lease_s = lease_s
        self.alive_ms = max(int(lease_s * 1000 / 2), 200)
        self.beat_s = lease_s / 10
        self._alive_key = f"{PREFIX}alive:{node}"
        self._alive_prefix = f"{PREFIX}alive:"
        self._valid_until = 0.0  # monotonic: this node may write until then
        self._renewed = 0.0  # what a renewal that must be confirmed would make it
        self.held: dict[str, str] = {}  # conversation -> our lease value
        self._acquire: Any = redis.register_script(ACQUIRE)
        self._release: Any = redis.register_script(RELEASE)

    @staticmethod
    def key(conversation_id: str) -> str:
        return f"{PREFIX}lease:{conversation_id}"

    def valid(self) -> bool:
        return time.monotonic() < self._valid_until

    async def beat(self, info: bytes) -> bool:
        """Renew this node's liveness. True when Redis had lost it (restarted, or this
        node was cut off for longer than the liveness time) while this node held leases:
        they must be asserted again (`reassert`, then `confirm`) before it writes."""
        sent = time.monotonic()
        old = await self.redis.set(self._alive_key, info, px=self.alive_ms, get=True)
        until = sent + SAFETY * self.alive_ms / 1000
        if old is None and self.held:
            # Another node may have taken some of them meanwhile: this node writes
            # nothing until it knows which (`reassert`, then `confirm`).
            self._valid_until = 0.0
            self._renewed = until
            return True
        self._valid_until = until
        return False

    def confirm(self) -> None:
        """The held leases were asserted again after `beat` said they had to be."""
        self._valid_until = max(self._valid_until, self._renewed)

    async def reassert(self) -> list[str]:
        """Take the held leases again after Redis lost them; the conversations another
        node holds by now are returned (and forgotten here)."""
        lost: list[str] = []
        for cid, value in list(self.held.items()):
            got = await self._acquire(
                keys=[self.key(cid)], args=[value, self.node, self._alive_prefix, LEASE_KEEP_MS]
            )
            if _text(got) != value:
                del self.held[cid]
                lost.append(cid)
        return lost

    async def acquire(self, conversation_id: str) -> str | None:
        """None when this node holds the lease now; else the node that holds it."""
        value = f"{self.node} {secrets.token_hex(6)}"
        got = _text(
            await self._acquire(
                keys=[self.key(conversation_id)],
                args=[value, self.node, self._alive_prefix, LEASE_KEEP_MS],
            )
        )
        if got == value:
            self.held[conversation_id] = value
            return None
        return holder_node(got)

    async def release(self, conversation_id: str) -> None:
        value = self.held.pop(conversation_id, None)
        if value is not None:
            await self._release(keys=[self.key(conversation_id)], args=[value])

    async def drop(self) -> None:
        """Leaving the cluster: every lease and the liveness key go at once, so other
        nodes take over without waiting for them to expire."""
        for cid in list(self.held):
            await self.release(cid)
        await self.redis.delete(self._alive_key)
        self._valid_until = 0.0

    def holds(self, conversation_id: str) -> bool:
        return conversation_id in self.held and self.valid()

    async def lost(self, conversation_ids: list[str]) -> list[str]:
        """Of these conversations (none of which this node runs), those whose lease holder
        is gone (its liveness key expired), or is this node (an actor that stopped while
        Redis was away), in one round trip for the leases and one for the holders."""
        if not conversation_ids:
            return []
        values = await self.redis.mget([self.key(cid) for cid in conversation_ids])
        holders = {
            cid: holder_node(_text(v))
            for cid, v in zip(conversation_ids, values, strict=True)
            if v is not None
        }
        nodes = sorted({n for n in holders.values() if n != self.node})
        alive: dict[str, int] = {self.node: 0}
        if nodes:
            async with self.redis.pipeline(transaction=False) as pipe:
                for node in nodes:
                    pipe.exists(self._alive_prefix + node)
                alive.update(zip(nodes, await pipe.execute(), strict=True))
        return [cid for cid, node in holders.items() if not alive[node]]

    async def free(self, conversation_ids: list[str]) -> list[str]:
        """Of these conversations, those no live node holds (no lease, or a dead holder)."""
        if not conversation_ids:
            return []
        values = await self.redis.mget([self.key(cid) for cid in conversation_ids])
        unheld = [cid for cid, v in zip(conversation_ids, values, strict=True) if v is None]
        return unheld + await self.lost([c for c in conversation_ids if c not in unheld])

    async def nodes(self) -> dict[str, bytes]:
        """Every live node and what it said of itself at its last beat."""
        keys = [key async for key in self.redis.scan_iter(match=self._alive_prefix + "*")]
        if not keys:
            return {}
        values = await self.redis.mget(keys)
        prefix = len(self._alive_prefix)
        return {
            _text(k)[prefix:]: v if isinstance(v, bytes) else _text(v).encode()
            for k, v in zip(keys, values, strict=True)
            if v is not None
        }


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
