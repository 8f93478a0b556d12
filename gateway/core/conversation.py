"""The conversation state machine: one conversation's runs, queues and steering.

Sans-I/O in the manner of `websockets`: the engine feeds it inputs (a user
message, a runner result, a steering pull, a cancel, a deadline) and takes back
`Effects`: the events to append (without offsets), the runners to start and
stop, the run documents that changed. It never awaits, never reads a clock and
never touches a socket or a store, so every rule of PROTOCOL.md section 5 is
tested here directly.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, cast

from gateway.core.ids import new_id
from gateway.core.recovery import Recovered
from gateway.core.results import Result
from gateway.core.routing import MAX_QUEUED_RUNS, MAX_STEERING, Refusal, Route, RoutingView, decide
from gateway.core.runs import Run, RunKind, RunStatus, UserText
from gateway.protocol.codes import ErrorCode
from gateway.protocol.frames import (
    AssistantMessage,
    CompletedData,
    DeltaData,
    EndStatus,
    Event,
    MessageCompleted,
    MessageDelta,
    MessageFrame,
    QueuePosition,
    QueueUpdated,
    RunCompletedData,
    RunEnded,
    RunError,
    RunFailedData,
    RunQueued,
    RunStarted,
    StateData,
    StateUpdated,
    SteeringAbsorbed,
    SteeringDropped,
    ToolCallCompleted,
    ToolCallStarted,
    ToolCompletedData,
    ToolStartedData,
    UserMessage,
)

Leftover = Literal["follow_up", "drop"]


@dataclass(frozen=True, slots=True)
class RunnerSpec:
    """What the machine needs to know of a runner."""

    name: str
    supports_steering: bool = True
    leftover_steering: Leftover = "follow_up"
    # Served by remote runners: a run it starts stays `queued`, though active, until a
    # runner takes it (`assigned`); only then is `run.started` written.
    remote: bool = False


@dataclass(slots=True)
class Turn:
    """A transcript turn (section 8): one per user message, one per completed assistant message."""

    role: Literal["user", "assistant"]
    content: str
    message_id: str
    run_id: str
    ts: int


@dataclass
class Effects:
    """What the engine must do after feeding the machine."""

    events: list[Event] = field(default_factory=list)
    start: list[Run] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    runs: dict[str, Run] = field(default_factory=dict)  # changed run documents
    turns: list[Turn] = field(default_factory=list)
    steering: Counter[str] = field(default_factory=Counter)  # outcome -> messages

    def __bool__(self) -> bool:
        return bool(self.events or self.start or self.stop or self.runs)


class ConversationMachine:
    """The single-writer state of one conversation (DESIGN.md: one writer per conversation)."""

    def __init__(
        self,
        conversation_id: str,
        specs: Callable[[str], RunnerSpec | None],
        default_runner: str,
        runner: str | None = None,
        *,
        max_queued_runs: int = MAX_QUEUED_RUNS,
        max_steering: int = MAX_STEERING,
    ) -> None:
        self.conversation_id = conversation_id
        self.max_queued_runs = max_queued_runs
        self.max_steering = max_steering
        self._specs = specs
        self.default_runner = default_runner
        self.runner = runner  # fixed by the conversation's first message
        self.active: Run | None = None
        # Runs waiting to start, in order. Follow-ups never wait here: one starts the
        # moment the run that left its steering ends, ahead of everything queued.
        self.queue: deque[Run] = deque()
        # The queue as its clients last heard of it (`run.queued`, `queue.updated`): the
        # run at index i was told position i + 1.
        self._announced: list[str] = []
        self.fx = Effects()

    # ------------------------------------------------------------------ reading

    def take_effects(self) -> Effects:
        fx, self.fx = self.fx, Effects()
        return fx

    @property
    def queued_user_runs(self) -> int:
        return len(self.queue)

    def live_run(self, run_id: str) -> Run | None:
        if self.active is not None and self.active.run_id == run_id:
            return self.active
        return next((r for r in self.queue if r.run_id == run_id), None)

    @property
    def idle(self) -> bool:
        return self.active is None and not self.queue

    def _spec(self, run: Run) -> RunnerSpec:
        return self._specs(run.runner) or RunnerSpec(run.runner, supports_steering=False)

    # ------------------------------------------------------------------ inputs

    def message(
        self, frame: MessageFrame, author: str, now: int
    ) -> tuple[UserMessage, Route] | Refusal:
        """Route a user message (section 5) and record it; a Refusal records nothing."""
        runner = self.runner or frame.runner or self.default_runner
        if self._specs(runner) is None:
            return Refusal(ErrorCode.RUNNER_UNAVAILABLE, f"no runner named {runner!r}")
        active = self.active
        view = RoutingView(
            active=active is not None,
            can_steer=active is not None and self._spec(active).supports_steering,
            steering_waiting=len(active.steering) if active is not None else 0,
            queued_runs=self.queued_user_runs,
            max_queued_runs=self.max_queued_runs,
            max_steering=self.max_steering,
        )
        route = decide(view, frame.mode)
        if isinstance(route, Refusal):
            return route
        self.runner = runner
        message_id = new_id("msg")
        text = UserText(message_id, frame.text, author, now)
        run_id = active.run_id if active is not None and route is Route.STEER else new_id("run")
        event = UserMessage(
            conversation_id=self.conversation_id,
            run_id=run_id,
            ts=now,
            message_id=message_id,
            client_msg_id=frame.client_msg_id,
            text=frame.text,
            route=route.value,
            author=author,
            metadata=frame.metadata,
        )
        self._emit(event)
        self.fx.turns.append(Turn("user", frame.text, message_id, run_id, now))
        if route is Route.STEER:
            assert active is not None
            active.add_steering(text)
            self.fx.steering["queued"] += 1
            self._changed(active)
        elif route is Route.QUEUE:
            run = self._new_run(run_id, RunKind.QUEUE, [text], now)
            self.queue.append(run)
            self._announced.append(run_id)
            self._emit(
                RunQueued(
                    conversation_id=self.conversation_id,
                    run_id=run_id,
                    ts=now,
                    runner=run.runner,
                    trigger_message_ids=run.trigger_message_ids,
                    position=len(self.queue),
                )
            )
            self._changed(run)
        else:  # RUN, or INTERRUPT: end the active run, then start at once
            run = self._new_run(run_id, RunKind(route.value), [text], now)
            if active is not None:
                self._end(active, RunStatus.CANCELLED, "interrupted", now, start_next=False)
            self._start(run, now)
        return event, route

    def restore(self, state: Recovered, now: int, reason: str = "gateway_restart") -> None:
        """Take over what a stopped gateway left (gateway.core.recovery): end the runs it
        was running `failed` with `reason` (`gateway_restart`; `node_lost` when another
        node of a cluster takes over), then carry on as section 5.4 says."""
        if state.runner is not None and self.runner is None:
            self.runner = state.runner
        for run in state.settled:
            self._changed(run)
        self.queue.extend(state.queue)
        message = (
            "the gateway node running it was lost"
            if reason == "node_lost"
            else "the gateway restarted while the run was active"
        )
        error = RunError(code=reason, message=message, retryable=True)
        carry: list[UserText] = []
        for run in state.interrupted:
            self.active = run
            carry += self._end(run, RunStatus.FAILED, reason, now, error, False)
        self._start_next(carry + state.leftover, now)

    def cancel(self, run_id: str | None, now: int) -> bool:
        """Cancel the active run (run_id None) or a live run of this conversation.

        False when there is no such live run: the engine tells `no_active_run`
        from `unknown_run` by asking the store about ended runs."""
        run = self.active if run_id is None else self.live_run(run_id)
        if run is None:
            return False
        self._end(run, RunStatus.CANCELLED, "cancel_requested", now)
        return True

    def shutdown(self, now: int) -> None:
        """The gateway is stopping and its grace period is over (PROTOCOL.md section 7):
        the active run ends `failed`/`shutdown` (retryable). Steering it leaves over
        becomes its follow-up run (5.4), which cannot run here either and ends the same
        way, so that no message is left without an outcome; queued runs stay queued for
        the next gateway on the store, and so does an active run that no remote runner
        took (it never started: its `user.message` makes it a queued run to recovery).
        A follow-up has no message of its own to be recovered from: it ends."""
        run = self.active
        if run is None:
            return
        if run.status is RunStatus.QUEUED and run.kind is not RunKind.FOLLOW_UP:
            self.active = None
            self.queue.appendleft(run)
            self.fx.stop.append(run.run_id)  # its driver, waiting for a runner
            return
        error = RunError(
            code="shutdown", message="the gateway shut down before the run ended", retryable=True
        )
        carry = self._end(run, RunStatus.FAILED, "shutdown", now, error, start_next=False)
        if carry:
            follow_up = self._new_run(new_id("run"), RunKind.FOLLOW_UP, carry, now)
            self._start(follow_up, now)
            self._end(follow_up, RunStatus.FAILED, "shutdown", now, error, start_next=False)

    def result(self, run_id: str, result: Result, now: int) -> None:
        """A normalized runner result of a running run; results of ended runs are ignored."""
        run = self.active
        if run is None or run.run_id != run_id:
            return
        if result.usage is not None:
            run.usage = result.usage
        data = result.data
        cid = self.conversation_id
        if isinstance(data, DeltaData):
            if run.open_message_id is None:
                run.open_message_id = new_id("msg")
            self._emit(
                MessageDelta(
                    conversation_id=cid,
                    run_id=run_id,
                    ts=now,
                    message_id=run.open_message_id,
                    delta=data.chunk,
                )
            )
        elif isinstance(data, CompletedData):
            self._complete_message(run, data.message, now)
        elif isinstance(data, ToolStartedData):
            self._emit(
                ToolCallStarted(
                    conversation_id=cid,
                    run_id=run_id,
                    ts=now,
                    tool_call_id=data.tool_call_id,
                    name=data.name,
                    arguments=data.arguments,
                )
            )
        elif isinstance(data, ToolCompletedData):
            self._emit(
                ToolCallCompleted(
                    conversation_id=cid,
                    run_id=run_id,
                    ts=now,
                    tool_call_id=data.tool_call_id,
                    name=data.name,
                    result=data.result,
                    error=data.error,
                )
            )
        elif isinstance(data, StateData):
            self._emit(
                StateUpdated(
                    conversation_id=cid,
                    run_id=run_id,
                    ts=now,
                    scope=data.scope,
                    key=data.key,
                    value=data.value,
                )
            )
        elif isinstance(data, RunCompletedData):
            if data.message is not None:
                self._complete_message(run, data.message, now)
            self._end(run, RunStatus.COMPLETED, data.finish_reason or "completed", now)
        elif isinstance(data, RunFailedData):
            error = RunError(code=data.code, message=data.error, retryable=data.retryable)
            self._end(run, RunStatus.FAILED, data.code, now, error=error)

    def pull(self, run_id: str, mode: str, limit: int, now: int) -> list[UserText]:
        """The runner of `run_id` asks for steering at a turn boundary (section 10)."""
        run = self.active
        if run is None or run.run_id != run_id or not run.steering:
            return []
        taken = run.take_steering(1 if mode == "one" else max(1, min(limit, 100)))
        run.counts.absorbed += len(taken)
        self.fx.steering["absorbed"] += len(taken)
        self._emit(
            SteeringAbsorbed(
                conversation_id=self.conversation_id,
                run_id=run_id,
                ts=now,
                message_ids=[m.message_id for m in taken],
            )
        )
        self._changed(run)
        return taken

    def assigned(self, run_id: str, now: int) -> None:
        """A remote runner took the active run, which waited for one: it starts now."""
        run = self.active
        if run is not None and run.run_id == run_id and run.status is RunStatus.QUEUED:
            run.start(now)
            self._emit_started(run, now)

    def timeout(self, run_id: str, reason: Literal["deadline", "idle"], now: int) -> None:
        run = self.active
        if run is not None and run.run_id == run_id:
            self._end(run, RunStatus.TIMEOUT, reason, now)

    def runner_finished(self, run_id: str, error: RunError | None, now: int) -> None:
        """The runner's generator ended; a run it did not end itself ends here."""
        run = self.active
        if run is None or run.run_id != run_id:
            return
        if error is None:
            self._end(run, RunStatus.COMPLETED, "completed", now)
        else:
            self._end(run, RunStatus.FAILED, error.code, now, error=error)

    # ------------------------------------------------------------------ internals

    def _emit(self, event: Event) -> None:
        self.fx.events.append(event)

    def _changed(self, run: Run) -> None:
        self.fx.runs[run.run_id] = run

    def _new_run(self, run_id: str, kind: RunKind, triggers: list[UserText], now: int) -> Run:
        runner = self.runner or self.default_runner
        return Run(run_id, self.conversation_id, runner, kind, triggers, created_at=now)

    def _start(self, run: Run, now: int) -> None:
        self.active = run
        self.fx.start.append(run)
        if self._spec(run).remote:
            self._changed(run)  # active, but queued until a remote runner takes it
            return
        run.start(now)
        self._emit_started(run, now)

    def _emit_started(self, run: Run, now: int) -> None:
        self._emit(
            RunStarted(
                conversation_id=self.conversation_id,
                run_id=run.run_id,
                ts=now,
                runner=run.runner,
                trigger_message_ids=run.trigger_message_ids,
            )
        )
        self._changed(run)

    def _complete_message(self, run: Run, message: AssistantMessage, now: int) -> None:
        message_id = run.open_message_id or new_id("msg")
        run.open_message_id = None
        self._emit(
            MessageCompleted(
                conversation_id=self.conversation_id,
                run_id=run.run_id,
                ts=now,
                message_id=message_id,
                message=message,
            )
        )
        self.fx.turns.append(Turn("assistant", message.content, message_id, run.run_id, now))

    def _end(
        self,
        run: Run,
        status: RunStatus,
        reason: str,
        now: int,
        error: RunError | None = None,
        start_next: bool = True,
    ) -> list[UserText]:
        """End a run exactly once: leftover steering, `run.ended`, then what runs next (5.4).

        With `start_next` False nothing is started: steering to carry into a follow-up
        is returned to the caller instead."""
        leftover = run.take_steering(len(run.steering))
        carry: list[UserText] = []
        if leftover:
            if status is RunStatus.CANCELLED or self._spec(run).leftover_steering == "drop":
                why: Literal["cancelled", "run_ended"] = (
                    "cancelled" if status is RunStatus.CANCELLED else "run_ended"
                )
                run.counts.dropped += len(leftover)
                self.fx.steering["dropped"] += len(leftover)
                self._emit(
                    SteeringDropped(
                        conversation_id=self.conversation_id,
                        run_id=run.run_id,
                        ts=now,
                        message_ids=[m.message_id for m in leftover],
                        reason=why,
                    )
                )
            else:
                carry = leftover
                self.fx.steering["follow_up"] += len(leftover)
        run.end(status, reason, now, error)
        self._emit(
            RunEnded(
                conversation_id=self.conversation_id,
                run_id=run.run_id,
                ts=now,
                status=cast(EndStatus, status.value),
                reason=reason,
                error=error,
                usage=run.usage,
            )
        )
        self._changed(run)
        self.fx.stop.append(run.run_id)
        if run is not self.active:
            self.queue.remove(run)
            self._announce_queue(now)
            return []
        self.active = None
        if not start_next:
            return carry
        self._start_next(carry, now)
        return []

    def _start_next(self, carry: list[UserText], now: int) -> None:
        """With nothing active: a follow-up for `carry`, else the next queued run."""
        if carry:
            self._start(self._new_run(new_id("run"), RunKind.FOLLOW_UP, carry, now), now)
        elif self.queue:
            self._start(self.queue.popleft(), now)
        self._announce_queue(now)

    def _announce_queue(self, now: int) -> None:
        """After the queue lost runs (one started, one was cancelled; or a recovered queue
        nobody was told of): `queue.updated` when a run still queued has a new position.
        Runs that left only from the end change no one's position: nothing to say."""
        order = [run.run_id for run in self.queue]
        if order != self._announced[: len(order)]:
            self._emit(
                QueueUpdated(
                    conversation_id=self.conversation_id,
                    ts=now,
                    runs=[QueuePosition(run_id=rid, position=n) for n, rid in enumerate(order, 1)],
                )
            )
        self._announced = order
