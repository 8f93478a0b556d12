"""The demo runner `echo` (PROTOCOL.md section 11): needs no model, shows steering."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Literal

from gateway.runners.base import (
    Result,
    RunContext,
    completed,
    delta,
    run_completed,
    run_failed,
)

_SLEEP = re.compile(r"/sleep\s+(\d+(?:\.\d+)?)")


class EchoRunner:
    """Streams `echo:` then the trigger words, weaving in steering as it arrives."""

    def __init__(
        self,
        name: str = "echo",
        delay_ms: float = 50.0,
        leftover_steering: Literal["follow_up", "drop"] = "follow_up",
    ) -> None:
        self.name = name
        self.delay = delay_ms / 1000
        self.supports_steering = True
        self.leftover_steering: Literal["follow_up", "drop"] = leftover_steering
        self.deadline_s: float | None = None
        self.idle_s: float | None = None

    async def run(self, ctx: RunContext) -> AsyncIterator[Result]:
        text = " ".join(t.text for t in ctx.triggers)
        command = text.strip()
        if command == "/fail":
            yield run_failed("the echo runner was asked to fail", "demo_failure")
            return
        sleep = _SLEEP.fullmatch(command)
        if sleep is not None and 0 < float(sleep.group(1)) <= 600:
            # Deliberately uncooperative: it never looks at ctx.cancelled nor pulls steering.
            await asyncio.sleep(float(sleep.group(1)))
            for chunk in ("echo:", " slept"):
                yield delta(chunk)
            yield completed("echo: slept")
            yield run_completed("stop")
            return
        parts = ["echo:"]
        yield delta("echo:")
        for word in text.split():
            for steer in await ctx.steering.pull("all"):
                parts.append(" [steer]")
                yield delta(" [steer]")
                for extra in steer.text.split():
                    await asyncio.sleep(self.delay)
                    parts.append(" " + extra)
                    yield delta(" " + extra)
            await asyncio.sleep(self.delay)
            parts.append(" " + word)
            yield delta(" " + word)
        yield completed("".join(parts))
        yield run_completed("stop")
