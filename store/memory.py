"""The memory store: everything in dicts, for tests and for `--store memory`."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from store.base import (
    ConversationFilter,
    ConversationRecord,
    StoreConflict,
    StoreError,
    TurnRecord,
    WriteBatch,
)


class MemoryStore:
    """A Store in process memory. `fail` makes every call raise, to test outages."""

    def __init__(self) -> None:
        self._events: dict[str, list[str]] = {}
        self._keys: dict[tuple[str, str], int] = {}  # (conversation, client_msg_id) -> offset
        self._by_run: dict[tuple[str, str], list[int]] = {}  # (conversation, run) -> offsets
        self._conversations: dict[str, ConversationRecord] = {}
        self._runs: dict[str, dict[str, Any]] = {}
        self._turns: dict[str, list[TurnRecord]] = {}
        self._turn_ids: set[tuple[str, str]] = set()
        self._epochs: dict[str, int] = {}
        self._deliveries: dict[str, dict[str, Any]] = {}
        self.fail = False

    def _check(self) -> None:
        if self.fail:
            raise StoreError("memory store is set to fail")

    async def claim(self, conversation_id: str) -> int:
        self._check()
        self._epochs[conversation_id] = self._epochs.get(conversation_id, 0) + 1
        return self._epochs[conversation_id]

    async def write(self, batch: WriteBatch) -> None:
        self._check()
        for cid, epoch in batch.fences.items():
            if self._epochs.get(cid, 0) > epoch:
                raise StoreConflict(cid, f"{cid}: fenced, epoch {epoch} is stale")
        for ev in batch.events:
            log = self._events.setdefault(ev.conversation_id, [])
            if ev.offset <= len(log):
                if log[ev.offset - 1] != ev.payload:
                    raise StoreConflict(
                        ev.conversation_id,
                        f"{ev.conversation_id}: offset {ev.offset} is already stored "
                        "with another event",
                    )
                continue  # already written by an earlier try of this batch
            if ev.offset != len(log) + 1:
                raise StoreConflict(
                    ev.conversation_id, f"{ev.conversation_id}: offset {ev.offset} after {len(log)}"
                )
            if (
                ev.client_msg_id is not None
                and (ev.conversation_id, ev.client_msg_id) in self._keys
            ):
                raise StoreConflict(
                    ev.conversation_id,
                    f"{ev.conversation_id}: client_msg_id {ev.client_msg_id!r} is already "
                    f"stored at another offset than {ev.offset}",
                )
            log.append(ev.payload)
            if ev.run_id is not None:
                self._by_run.setdefault((ev.conversation_id, ev.run_id), []).append(ev.offset)
            if ev.client_msg_id is not None:
                self._keys[(ev.conversation_id, ev.client_msg_id)] = ev.offset
        for run in batch.runs:
            self._runs[run["run_id"]] = copy.deepcopy(run)
        for conv in batch.conversations:
            stored = self._conversations.get(conv.conversation_id)
            self._conversations[conv.conversation_id] = copy.copy(conv)
            if stored is not None and stored.head > conv.head:  # a head never goes back
                self._conversations[conv.conversation_id].head = stored.head
        for turn in batch.turns:
            if (turn.conversation_id, turn.message_id) not in self._turn_ids:
                self._turn_ids.add((turn.conversation_id, turn.message_id))
                self._turns.setdefault(turn.conversation_id, []).append(turn)
        for delivery in batch.deliveries:
            self._deliveries.setdefault(delivery.id, delivery.document())

    async def ping(self) -> None:
        self._check()

    async def get_conversation(self, conversation_id: str) -> ConversationRecord | None:
        self._check()
        conv = self._conversations.get(conversation_id)
        return copy.copy(conv) if conv else None

    async def read_events(self, conversation_id: str, after: int, limit: int) -> list[str]:
        self._check()
        log = self._events.get(conversation_id, [])
        return log[max(after, 0) : max(after, 0) + limit]

    async def read_pages(
        self, conversation_ids: Sequence[str], after: int, limit: int
    ) -> dict[str, list[str]]:
        self._check()
        start, end = max(after, 0), max(after, 0) + max(limit, 0)
        return {cid: self._events.get(cid, [])[start:end] for cid in conversation_ids}

    async def last_offset(self, conversation_id: str) -> int:
        self._check()
        return len(self._events.get(conversation_id, []))

    async def find_client_message(self, conversation_id: str, client_msg_id: str) -> str | None:
        self._check()
        offset = self._keys.get((conversation_id, client_msg_id))
        return None if offset is None else self._events[conversation_id][offset - 1]

    async def transcript(
        self, conversation_id: str, limit: int | None = None, before: int | None = None
    ) -> list[TurnRecord]:
        self._check()
        turns = sorted(self._turns.get(conversation_id, []), key=lambda turn: turn.offset)
        if before is not None:
            turns = [turn for turn in turns if turn.offset < before]
        if limit is not None:
            turns = turns[-limit:] if limit > 0 else []
        return turns

    async def list_conversations(
        self, limit: int, before: tuple[int, str] | None, only: ConversationFilter | None = None
    ) -> list[ConversationRecord]:
        self._check()
        items = sorted(
            (
                c
                for c in self._conversations.values()
                if only is None or only.matches(c.conversation_id)
            ),
            key=lambda c: (c.last_activity, c.conversation_id),
            reverse=True,
        )
        if before is not None:
            items = [c for c in items if (c.last_activity, c.conversation_id) < before]
        return [copy.copy(c) for c in items[:limit]]

    async def get_run(self, run_id: str) -> dict[str, Any] | None:
        self._check()
        run = self._runs.get(run_id)
        return copy.deepcopy(run) if run else None

    async def list_runs(
        self, status: str | None, conversation_id: str | None, limit: int, before: str | None
    ) -> list[dict[str, Any]]:
        self._check()
        out: list[dict[str, Any]] = []
        if limit <= 0:
            return out
        for run_id in sorted(self._runs, reverse=True):
            run = self._runs[run_id]
            if before is not None and run_id >= before:
                continue
            if status is not None and run["status"] != status:
                continue
            if conversation_id is not None and run["conversation_id"] != conversation_id:
                continue
            out.append(copy.deepcopy(run))
            if len(out) >= limit:
                break
        return out

    async def live_runs(self, conversation_id: str | None) -> list[dict[str, Any]]:
        self._check()
        return [
            copy.deepcopy(run)
            for run_id, run in sorted(self._runs.items())
            if run["status"] in ("queued", "running")
            and conversation_id in (None, run["conversation_id"])
        ]

    async def run_events(self, conversation_id: str, run_id: str) -> list[str]:
        self._check()
        log = self._events.get(conversation_id, [])
        return [log[offset - 1] for offset in self._by_run.get((conversation_id, run_id), [])]

    async def due_deliveries(self, now: int, limit: int) -> list[dict[str, Any]]:
        self._check()
        due = [
            d for d in self._deliveries.values() if d["status"] == "pending" and d["next_at"] <= now
        ]
        due.sort(key=lambda d: d["next_at"])
        return [dict(d) for d in due[: max(limit, 0)]]

    def _pending(self, endpoint: str, conversation_id: str, after: int) -> list[dict[str, Any]]:
        return [
            d
            for d in self._deliveries.values()
            if d["endpoint"] == endpoint
            and d["conversation_id"] == conversation_id
            and d["status"] == "pending"
            and d["offset"] > after
        ]

    async def delivery_head(self, endpoint: str, conversation_id: str) -> dict[str, Any] | None:
        self._check()
        pending = self._pending(endpoint, conversation_id, -1)
        return dict(min(pending, key=lambda d: d["offset"])) if pending else None

    async def claim_delivery(
        self, delivery_id: str, owner: str, now: int, lease_until: int
    ) -> dict[str, Any] | None:
        self._check()
        d = self._deliveries.get(delivery_id)
        if d is None or d["status"] != "pending" or d["lease_until"] > now:
            return None
        d.update(owner=owner, lease_until=lease_until)
        return dict(d)

    async def settle_delivery(self, delivery_id: str, owner: str, changes: dict[str, Any]) -> bool:
        self._check()
        d = self._deliveries.get(delivery_id)
        if d is None or d["owner"] != owner:
            return False
        d.update(changes, lease_until=0, owner=None)
        return True

    async def hold_deliveries(
        self, endpoint: str, conversation_id: str, after: int, until: int
    ) -> None:
        self._check()
        for d in self._pending(endpoint, conversation_id, after):
            d["next_at"] = max(d["next_at"], until)

    async def wake_deliveries(
        self, endpoint: str, conversation_id: str, after: int, now: int
    ) -> None:
        self._check()
        for d in self._pending(endpoint, conversation_id, after):
            d["next_at"] = min(d["next_at"], now)

    async def list_deliveries(
        self, endpoint: str, limit: int, status: str | None = None
    ) -> list[dict[str, Any]]:
        self._check()
        found = [
            d
            for d in self._deliveries.values()
            if d["endpoint"] == endpoint and status in (None, d["status"])
        ]
        found.sort(key=lambda d: (d["created"], d["_id"]), reverse=True)
        return [dict(d) for d in found[: max(limit, 0)]]

    async def replay_delivery(self, delivery_id: str, now: int) -> dict[str, Any] | None:
        self._check()
        d = self._deliveries.get(delivery_id)
        if d is None:
            return None
        d.update(status="pending", next_at=now, since=now, lease_until=0, owner=None)
        return dict(d)

    async def close(self) -> None:
        return None
