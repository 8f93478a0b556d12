"""The run state machine (PROTOCOL.md sections 4 and 8).

A run is `queued` or `running` until it ends exactly once with a terminal
status; a terminal status never changes and a queued run may end without
ever starting (a cancel before it starts).
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from gateway.protocol.frames import RunError


class RunStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"

    @property
    def terminal(self) -> bool:
        return self not in (RunStatus.QUEUED, RunStatus.RUNNING)


class RunKind(enum.StrEnum):
    """Why a run exists: a user message with no active run, an explicit queue,
    an interrupt, or steering left over by the previous run (section 5.4)."""

    RUN = "run"
    QUEUE = "queue"
    INTERRUPT = "interrupt"
    FOLLOW_UP = "follow_up"


class InvalidTransition(Exception):
    """A transition the state machine forbids; always a gateway bug, never client input."""


@dataclass(slots=True)
class UserText:
    """A user message as a run sees it: a trigger or a steering message."""

    message_id: str
    text: str
    author: str
    ts: int


@dataclass(slots=True)
class SteeringCounts:
    queued: int = 0  # waiting now
    absorbed: int = 0  # running total
    dropped: int = 0  # running total


@dataclass
class Run:
    run_id: str
    conversation_id: str
    runner: str
    kind: RunKind
    triggers: list[UserText]
    created_at: int
    status: RunStatus = RunStatus.QUEUED
    reason: str | None = None
    error: RunError | None = None
    started_at: int | None = None
    ended_at: int | None = None
    usage: dict[str, Any] | None = None
    steering: deque[UserText] = field(default_factory=deque)
    counts: SteeringCounts = field(default_factory=SteeringCounts)
    # The assistant message being streamed, if any (a new id per message).
    open_message_id: str | None = None

    @property
    def trigger_message_ids(self) -> list[str]:
        return [t.message_id for t in self.triggers]

    def start(self, now: int) -> None:
        if self.status is not RunStatus.QUEUED:
            raise InvalidTransition(f"run {self.run_id}: start from {self.status}")
        self.status = RunStatus.RUNNING
        self.started_at = now

    def end(self, status: RunStatus, reason: str, now: int, error: RunError | None = None) -> None:
        if not status.terminal:
            raise InvalidTransition(f"run {self.run_id}: end with {status}")
        if self.status.terminal:
            raise InvalidTransition(f"run {self.run_id}: already {self.status}")
        self.status = status
        self.reason = reason
        self.error = error
        self.ended_at = now

    def take_steering(self, limit: int) -> list[UserText]:
        taken = [self.steering.popleft() for _ in range(min(limit, len(self.steering)))]
        self.counts.queued = len(self.steering)
        return taken

    def add_steering(self, message: UserText) -> None:
        self.steering.append(message)
        self.counts.queued = len(self.steering)

    def document(self) -> dict[str, Any]:
        """The run document of section 8."""
        return {
            "run_id": self.run_id,
            "conversation_id": self.conversation_id,
            "runner": self.runner,
            "status": self.status.value,
            "reason": self.reason,
            "error": self.error.model_dump() if self.error else None,
            "trigger_message_ids": self.trigger_message_ids,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "usage": self.usage,
            "steering": {
                "queued": self.counts.queued,
                "absorbed": self.counts.absorbed,
                "dropped": self.counts.dropped,
            },
        }
