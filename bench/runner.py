"""Benchmark runners.  `ticker`: streams time-stamped chunks at a set rate; `flood`
(bench/runners.py): as many results as fast as it can.

Load it into the gateway with `steerway serve --runners bench.runner:Ticker --runner ticker`
(or STEERWAY_RUNNERS / STEERWAY_RUNNER) with the repo root on PYTHONPATH.  The
trigger message's text says how fast and how much: `rate=200 count=2000`
(see bench/chunks.py).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Literal

from bench.chunks import paced_chunks, parse_trigger
from gateway.runners.base import Result, RunContext, completed, delta, run_completed, run_failed


class Ticker:
    name = "ticker"
    supports_steering = False
    leftover_steering: Literal["follow_up", "drop"] = "drop"
    deadline_s: float | None = 3600.0  # a long measurement must not hit the 300 s default
    idle_s: float | None = None

    async def run(self, ctx: RunContext) -> AsyncIterator[Result]:
        text = " ".join(t.text for t in ctx.triggers)
        try:
            rate, count = parse_trigger(text)
        except ValueError as exc:
            yield run_failed(str(exc), "bad_trigger")
            return
        async for chunk in paced_chunks(rate, count):
            yield delta(chunk)
        yield completed(f"ticker: {count} chunks at {rate:g}/s")
        yield run_completed("stop")


class Flood:
    """`flood`: yields `count=<n>` deltas as fast as it can, then completes: what a runner
    can push through the gateway (bench/runners.py), in-process or remote."""

    name = "flood"
    supports_steering = False
    leftover_steering: Literal["follow_up", "drop"] = "drop"
    deadline_s: float | None = 3600.0
    idle_s: float | None = None

    def __init__(self, name: str = "flood") -> None:
        self.name = name

    async def run(self, ctx: RunContext) -> AsyncIterator[Result]:
        text = " ".join(t.text for t in ctx.triggers)
        found = re.search(r"count=(\d+)", text)
        if found is None:
            yield run_failed("expected count=<n>", "bad_trigger")
            return
        for i in range(int(found.group(1))):
            yield delta(f"{i};")
        yield run_completed("stop")
