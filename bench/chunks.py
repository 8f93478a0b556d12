"""What the benchmark streams, shared by the gateway runner, the bare baseline and the client.

A run is started by a message whose text is `rate=<chunks per second> count=<chunks>`.
Each chunk is `<seq>@<monotonic_ns>;`: its sequence number (0, 1, ...) and the
CLOCK_MONOTONIC time at which the producer emitted it, comparable across the
processes of one Linux machine.  The trailing `;` lets the client split a
coalesced delta (PROTOCOL.md section 6) back into its chunks.

Pacing uses absolute deadlines (`start + i / rate`), so a late wake-up never
accumulates drift: the producer catches up instead.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator

_SPEC = re.compile(r"rate=(\d+(?:\.\d+)?)\s+count=(\d+)")
MAX_COUNT = 10_000_000


def trigger_text(rate: float, count: int) -> str:
    return f"rate={rate:g} count={count}"


def parse_trigger(text: str) -> tuple[float, int]:
    match = _SPEC.search(text)
    if match is None:
        raise ValueError(f"expected 'rate=<float> count=<int>', got {text[:80]!r}")
    rate, count = float(match.group(1)), int(match.group(2))
    if not 0 < rate <= 1_000_000 or not 0 < count <= MAX_COUNT:
        raise ValueError(f"rate or count out of range: {text[:80]!r}")
    return rate, count


async def paced_chunks(rate: float, count: int) -> AsyncIterator[str]:
    """`count` chunks at `rate` per second, each stamped when it is emitted."""
    monotonic, sleep, stamp = time.monotonic, asyncio.sleep, time.monotonic_ns
    period = 1.0 / rate
    start = monotonic()
    for seq in range(count):
        delay = start + seq * period - monotonic()
        if delay > 0:
            await sleep(delay)
        yield f"{seq}@{stamp()};"
