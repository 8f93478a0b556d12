"""The in-process runner API (PROTOCOL.md section 10).

A runner is an object with a `name`, its options, and `run(ctx)`: an async
generator that yields results, `{"type", "data", "sequence"?, "usage"?}`, for
one run.  It pulls steering with `await ctx.steering.pull(...)` at its turn
boundaries.  The gateway applies the same result rules to every runner, ends
the run on a deadline or a cancel whether or not the runner cooperates, and
closes the generator when the run ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

Result = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class SteeringMessage:
    message_id: str
    text: str
    author: str
    ts: int


@dataclass(frozen=True, slots=True)
class TranscriptMessage:
    message_id: str
    role: Literal["user", "assistant"]
    content: str
    run_id: str
    ts: int


class SteeringInbox(Protocol):
    async def pull(
        self, mode: Literal["all", "one"] = "all", limit: int = 100
    ) -> list[SteeringMessage]:
        """Steering waiting for this run (empty when none); the gateway records
        `steering.absorbed` before this returns."""


@dataclass(slots=True)
class RunContext:
    run_id: str
    conversation_id: str
    runner: str
    messages: list[TranscriptMessage]  # the transcript so far, the trigger messages last
    triggers: list[SteeringMessage]  # the messages that started this run
    steering: SteeringInbox
    deadline_ms: int  # wall-clock deadline, ms since the epoch
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    # the W3C traceparent of the run's span (gateway.tracing), for the runner's own
    # spans and requests; None when runs are not traced
    traceparent: str | None = None


class Runner(Protocol):
    name: str
    supports_steering: bool
    leftover_steering: Literal["follow_up", "drop"]
    deadline_s: float | None  # None: the gateway's default (300 s)
    idle_s: float | None  # None: the gateway's default (60 s)

    def run(self, ctx: RunContext) -> AsyncIterator[Result]: ...


@runtime_checkable
class Placed(Protocol):
    """A runner served elsewhere (gateway.runners.remote): a run first waits for a place
    on one; `place` raises RunnerUnavailable when none comes in time, and frees the
    place when the run is over."""

    def place(self, ctx: RunContext) -> AbstractAsyncContextManager[None]: ...


def context_messages(
    turns: list[TranscriptMessage], triggers: list[str], pending: set[str]
) -> list[TranscriptMessage]:
    """The transcript a run is given: every turn but the user messages no run has taken
    yet (`pending`: the triggers of queued runs, steering still waiting), with this run's
    trigger messages last, in trigger order."""
    first = set(triggers)
    found = {t.message_id: t for t in turns if t.message_id in first}
    kept = [t for t in turns if t.message_id not in first and t.message_id not in pending]
    return kept + [found[m] for m in triggers if m in found]


def delta(chunk: str) -> dict[str, Any]:
    return {"type": "message.delta", "data": {"chunk": chunk}}


def completed(content: str) -> dict[str, Any]:
    return {
        "type": "message.completed",
        "data": {"message": {"role": "assistant", "content": content}},
    }


def run_completed(finish_reason: str = "stop") -> dict[str, Any]:
    return {"type": "run.completed", "data": {"finish_reason": finish_reason}}


def run_failed(error: str, code: str, retryable: bool = False) -> dict[str, Any]:
    return {"type": "run.failed", "data": {"error": error, "code": code, "retryable": retryable}}
