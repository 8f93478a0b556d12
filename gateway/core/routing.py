"""Where a user message goes (PROTOCOL.md section 5): a pure decision.

`decide` looks only at what the conversation holds at that instant; the
conversation machine applies the decision in the same step, so no message can
slip between "a run is active" and "that run ended".
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from gateway.protocol.codes import ErrorCode

MAX_QUEUED_RUNS = 16  # section 5.3: user-queued runs waiting per conversation
MAX_STEERING = 100  # section 5.2: messages waiting in one run's steering queue


class Route(enum.StrEnum):
    RUN = "run"
    STEER = "steer"
    QUEUE = "queue"
    INTERRUPT = "interrupt"


@dataclass(frozen=True, slots=True)
class Refusal:
    code: ErrorCode
    message: str


@dataclass(frozen=True, slots=True)
class RoutingView:
    """What routing needs to know about a conversation."""

    active: bool
    can_steer: bool  # the active run's runner supports steering
    steering_waiting: int  # messages in the active run's steering queue
    queued_runs: int  # user-queued runs waiting (follow-ups do not count)
    max_queued_runs: int = MAX_QUEUED_RUNS
    max_steering: int = MAX_STEERING


def decide(view: RoutingView, mode: str) -> Route | Refusal:
    """Route a message sent with `mode` (auto, steer, queue, interrupt)."""
    if not view.active:
        return Route.RUN  # 5.1, whatever the mode
    if mode == "interrupt":
        return Route.INTERRUPT
    if mode in ("auto", "steer"):
        if view.can_steer and view.steering_waiting < view.max_steering:
            return Route.STEER
        if mode == "steer":
            if not view.can_steer:
                return Refusal(ErrorCode.RUNNER_UNAVAILABLE, "the active run's runner cannot steer")
            return Refusal(
                ErrorCode.QUEUE_FULL,
                f"the active run already has {view.max_steering} steering messages waiting",
            )
    # mode "queue", or "auto" that cannot steer
    if view.queued_runs >= view.max_queued_runs:
        return Refusal(ErrorCode.QUEUE_FULL, f"{view.max_queued_runs} runs are already queued")
    return Route.QUEUE
