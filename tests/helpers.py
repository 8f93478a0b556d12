"""What several test modules share: runners the tests drive, runner results, waits for
frames, and reading and checking what a client or the store holds.

The harness itself (a gateway on a free port, its clients) is in `tests.conftest`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

import orjson

from gateway.runners.base import RunContext
from tests.conftest import Client, Gateway

Event = dict[str, Any]

TIMEOUT = 5.0  # how long a test waits for one thing it expects

PULL = object()  # fed to a `Fed` runner: it pulls its steering (mode "all")
END = object()  # fed to a `Fed` runner: its generator returns


# --------------------------------------------------------------------------- runners


class Runner:
    """What the gateway reads of a runner besides `run`: its name, whether it steers, what
    becomes of its leftover steering, and no time limits of its own.  `Fed` and `Gated`
    take the same keyword options."""

    def __init__(
        self,
        name: str,
        *,
        supports_steering: bool = True,
        leftover_steering: Literal["follow_up", "drop"] = "follow_up",
    ) -> None:
        self.name = name
        self.supports_steering = supports_steering
        self.leftover_steering: Literal["follow_up", "drop"] = leftover_steering
        self.deadline_s: float | None = None
        self.idle_s: float | None = None


class Fed(Runner):
    """A runner the test drives.  Each run yields what the test puts in `feed`: a result
    (any object), PULL to pull its steering instead, an exception to raise, or END to
    return; it pulls steering only when fed PULL.  `contexts` receives each run's context
    when the run starts, and `closed[run_id]` is set once its generator is closed."""

    def __init__(self, name: str = "fed", **options: Any) -> None:
        super().__init__(name, **options)
        self.feed: asyncio.Queue[Any] = asyncio.Queue()
        self.contexts: asyncio.Queue[RunContext] = asyncio.Queue()
        self.closed: dict[str, asyncio.Event] = {}

    def put(self, *items: Any) -> None:
        for item in items:
            self.feed.put_nowait(item)

    async def run(self, ctx: RunContext) -> AsyncIterator[Any]:
        closed = self.closed.setdefault(ctx.run_id, asyncio.Event())
        self.contexts.put_nowait(ctx)
        try:
            while True:
                item = await self.feed.get()
                if item is END:
                    return
                if item is PULL:
                    await ctx.steering.pull("all")
                    continue
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            closed.set()


class Gated(Runner):
    """A runner whose runs stream `start <triggers>`, wait for their gate, then pull
    steering (unless the trigger text starts with `nopull`) and complete."""

    def __init__(self, name: str = "gated", **options: Any) -> None:
        super().__init__(name, **options)
        self._gates: dict[str, asyncio.Event] = {}

    def gate(self, run_id: str) -> asyncio.Event:
        return self._gates.setdefault(run_id, asyncio.Event())

    def release(self, run_id: str) -> None:
        self.gate(run_id).set()

    async def run(self, ctx: RunContext) -> AsyncIterator[dict[str, Any]]:
        text = " ".join(t.text for t in ctx.triggers)
        parts = [f"start {text}"]
        yield delta(parts[0])
        await self.gate(ctx.run_id).wait()
        if not text.startswith("nopull"):
            for steer in await ctx.steering.pull("all"):
                parts.append(f" [steer] {steer.text}")
                yield delta(parts[-1])
        yield completed("".join(parts))
        yield run_completed("stop")


# --------------------------------------------------------------------------- runner results


def delta(chunk: str, **extra: Any) -> dict[str, Any]:
    return {"type": "message.delta", "data": {"chunk": chunk}, **extra}


def completed(content: str) -> dict[str, Any]:
    return {
        "type": "message.completed",
        "data": {"message": {"role": "assistant", "content": content}},
    }


def run_completed(finish_reason: str = "stop", **extra: Any) -> dict[str, Any]:
    return {"type": "run.completed", "data": {"finish_reason": finish_reason}, **extra}


# --------------------------------------------------------------------------- frames


async def expect(client: Client, kind: str, within: float = TIMEOUT, **match: Any) -> Event:
    """The first frame of `kind` matching `match`, among those received or still to come
    (an event of a batch is sent before the ack of the message that caused it)."""
    for frame in client.frames:
        if frame.get("type") == kind and all(frame.get(k) == v for k, v in match.items()):
            return frame
    return await client.until_type(kind, within, **match)


async def ack_of(client: Client, client_msg_id: str) -> Event:
    return await expect(client, "ack", client_msg_id=client_msg_id)


def event_texts(client: Client) -> list[str]:
    """The events a client received, as the exact texts sent."""
    return [
        raw
        for raw, frame in zip(client.raw, client.frames, strict=True)
        if "offset" in frame and frame["type"] != "ack"
    ]


def assert_gap_free(client: Client, first: int = 1) -> None:
    offsets = [f["offset"] for f in client.events()]
    assert offsets == list(range(first, first + len(offsets))), offsets


async def settled(gw: Gateway, condition: Callable[[], bool], within: float = TIMEOUT) -> None:
    """Until `condition()` holds, for what the server does just after a client is gone:
    each look is a request to the gateway, so its side of the connection gets to end."""
    async with asyncio.timeout(within), gw.client() as http:
        while not condition():
            await http.get("/healthz")


async def stored_events(gw: Gateway, cid: str) -> list[Event]:
    return [orjson.loads(p) for p in await gw.store.read_events(cid, 0, 1_000_000)]
