"""Drives one run: the runner's generator in its own task, its deadlines, its cancel.

The driver applies the result rules (gateway.core.results) and hands every
valid result to the conversation actor, which alone writes events; a run's
`run.ended` is always written by the actor.  When the actor ends a run (cancel,
interrupt, deadline) it calls `stop()`: the cancel signal is set and the task is
cancelled at once, so a runner stuck in an await that never returns is still
stopped, and its generator is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Literal

from gateway import tracing
from gateway.core.ids import now_ms
from gateway.core.results import Result, ResultNormalizer
from gateway.core.runs import Run, UserText
from gateway.errors import RunnerUnavailable
from gateway.protocol.frames import RunError
from gateway.runners.base import (
    Placed,
    RunContext,
    Runner,
    SteeringMessage,
    TranscriptMessage,
)

log = logging.getLogger("steerway.runs")


@dataclass(slots=True)
class RunOutput:
    run_id: str
    result: Result
    born: float  # perf_counter() when the result reached the gateway


@dataclass(slots=True)
class RunTimeout:
    run_id: str
    reason: Literal["deadline", "idle"]


@dataclass(slots=True)
class RunAssigned:
    """A remote runner took a run that waited for one: it starts now."""

    run_id: str


@dataclass(slots=True)
class RunFinished:
    run_id: str
    error: RunError | None


@dataclass(slots=True)
class SteeringPull:
    run_id: str
    mode: Literal["all", "one"]
    limit: int
    reply: asyncio.Future[list[UserText]]


DriverInput = RunOutput | RunTimeout | RunFinished | SteeringPull | RunAssigned
Post = Callable[[DriverInput], Coroutine[Any, Any, None]]


class _Inbox:
    """`ctx.steering`: pulls go through the actor, which records `steering.absorbed`."""

    def __init__(self, run: Run, post: Post) -> None:
        self._run = run
        self._post = post

    async def pull(
        self, mode: Literal["all", "one"] = "all", limit: int = 100
    ) -> list[SteeringMessage]:
        if not self._run.steering:
            return []  # nothing waits: no round trip through the actor
        reply: asyncio.Future[list[UserText]] = asyncio.get_running_loop().create_future()
        await self._post(SteeringPull(self._run.run_id, mode, limit, reply))
        return [SteeringMessage(m.message_id, m.text, m.author, m.ts) for m in await reply]


class RunDriver:
    def __init__(
        self,
        run: Run,
        runner: Runner,
        post: Post,
        transcript: Callable[[], Awaitable[list[TranscriptMessage]]],
        deadline_s: float,
        idle_s: float,
    ) -> None:
        self.run = run
        self._runner = runner
        self._post = post
        self._transcript = transcript
        self._deadline_s = runner.deadline_s or deadline_s
        self._idle_s = runner.idle_s or idle_s
        self._task: asyncio.Task[None] | None = None
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._last = time.monotonic()
        self._ended = False
        self._pending: set[asyncio.Task[None]] = set()
        self.ctx: RunContext | None = None

    def start(self) -> None:
        if not isinstance(self._runner, Placed):
            self._arm()  # a remote run's limits count from when a runner takes it
        self._task = asyncio.create_task(self._drive(), name=f"run-{self.run.run_id}")

    def _arm(self) -> None:
        loop = asyncio.get_running_loop()
        self._last = time.monotonic()
        self._timers["deadline"] = loop.call_later(self._deadline_s, self._expire, "deadline")
        self._timers["idle"] = loop.call_later(self._idle_s, self._check_idle)

    def stop(self) -> None:
        """The run has ended: stop the runner now, cooperating or not."""
        self._ended = True
        for timer in self._timers.values():
            timer.cancel()
        if self.ctx is not None:
            self.ctx.cancelled.set()
        if self._task is not None and not self._task.done():
            self._task.cancel()

    async def wait(self) -> None:
        """Wait for the runner's task to finish, at most a second (a runner that swallows
        its cancellation is left behind rather than holding up the caller)."""
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                async with asyncio.timeout(1.0):
                    await asyncio.shield(self._task)

    def _expire(self, reason: Literal["deadline", "idle"]) -> None:
        if self._ended:
            return
        task = asyncio.get_running_loop().create_task(
            self._post(RunTimeout(self.run.run_id, reason))
        )
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def _check_idle(self) -> None:
        left = self._idle_s - (time.monotonic() - self._last)
        if left <= 0:
            self._expire("idle")
        elif not self._ended:
            self._timers["idle"] = asyncio.get_running_loop().call_later(left, self._check_idle)

    async def _drive(self) -> None:
        run = self.run
        try:
            messages = await self._transcript()
        except Exception as exc:  # the store failed as the run started: retryable
            log.warning("run %s: transcript unavailable: %s", run.run_id, exc)
            lost = RunError(code="store_unavailable", message=str(exc)[:500], retryable=True)
            await self._post(RunFinished(run.run_id, lost))
            return
        ctx = RunContext(
            run_id=run.run_id,
            conversation_id=run.conversation_id,
            runner=run.runner,
            messages=messages,
            triggers=[SteeringMessage(t.message_id, t.text, t.author, t.ts) for t in run.triggers],
            steering=_Inbox(run, self._post),
            deadline_ms=now_ms() + int(self._deadline_s * 1000),
            traceparent=None if tracing.RUNS is None else tracing.RUNS.traceparent(run.run_id),
        )
        self.ctx = ctx
        runner = self._runner
        if not isinstance(runner, Placed):
            error = await self._consume(ctx)
        else:
            try:
                async with runner.place(ctx):  # waits for a free remote runner
                    await self._post(RunAssigned(run.run_id))
                    ctx.deadline_ms = now_ms() + int(self._deadline_s * 1000)
                    self._arm()
                    error = await self._consume(ctx)
            except RunnerUnavailable as exc:
                error = RunError(code="runner_unavailable", message=str(exc), retryable=True)
        if not self._ended:
            await self._post(RunFinished(run.run_id, error))

    async def _consume(self, ctx: RunContext) -> RunError | None:
        """Feed the runner's results through the result rules to the actor; the error
        that ended it, if it raised."""
        run = self.run
        rules = ResultNormalizer()
        error: RunError | None = None
        gen = self._runner.run(ctx)
        try:
            async for raw in gen:
                self._last = time.monotonic()
                outcome = rules.feed(raw)
                for warning in outcome.warnings:
                    log.warning("run %s (%s): %s", run.run_id, run.runner, warning)
                if outcome.result is not None:
                    await self._post(RunOutput(run.run_id, outcome.result, time.perf_counter()))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("run %s: runner %s raised %r", run.run_id, run.runner, exc)
            error = RunError(
                code="runner_error", message=f"{type(exc).__name__}: {exc}"[:500], retryable=False
            )
        finally:
            with contextlib.suppress(Exception):
                await gen.aclose()  # type: ignore[attr-defined]
        return error
