"""Serve a runner from a process of its own, over `/ws/runners` (PROTOCOL.md section 10).

A remote runner is the same object as an in-process one (gateway.runners.base):
a `name`, `supports_steering`, and `run(ctx)`, an async generator of results.
`ctx.steering.pull(...)` becomes a `steering.pull` request over the socket, and
a `run.cancel` sets `ctx.cancelled` and closes the generator.  So:

    import asyncio
    from gateway.runner_client import RunnerClient
    from gateway.runners.echo import EchoRunner

    client = RunnerClient("ws://127.0.0.1:8000/ws/runners", EchoRunner(name="echo-remote"))
    asyncio.run(client.serve_forever())

`serve_forever` reconnects when the connection drops or cannot be made, after
a delay that doubles from `backoff_min` to `backoff_max` (with jitter) and is
reset once the gateway has said `ready`.  Runs in flight when a connection
drops are abandoned: the gateway has failed them `runner_lost` already.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
from collections.abc import Callable
from typing import Any, Literal

import websockets
from websockets.asyncio.client import ClientConnection

from gateway.errors import FrameError
from gateway.protocol.frames import (
    HelloFrame,
    RunAssign,
    RunCancel,
    RunnerErrorFrame,
    RunnerReady,
    SteeringBatch,
    SteeringPullFrame,
    encode,
    parse_gateway_frame,
    result_frame,
)
from gateway.runners.base import (
    Result,
    RunContext,
    Runner,
    SteeringMessage,
    TranscriptMessage,
    run_completed,
    run_failed,
)
from gateway.runners.remote import is_terminal

log = logging.getLogger("steerway.runner_client")


class _Session:
    """One connection: its runs, and its steering requests waiting for an answer."""

    def __init__(self, ws: ClientConnection, runner: Runner) -> None:
        self.ws = ws
        self.runner = runner
        self.runs: dict[str, tuple[asyncio.Task[None], RunContext]] = {}
        self.pulls: dict[str, asyncio.Future[list[SteeringMessage]]] = {}
        self._ids = itertools.count(1)

    async def handle(self, raw: str | bytes) -> None:
        try:
            frame = parse_gateway_frame(raw)
        except FrameError as exc:
            log.warning("ignored a frame from the gateway: %s", exc.message)
            return
        if isinstance(frame, RunAssign):
            ctx = self._context(frame)
            task = asyncio.create_task(self._run(ctx), name=f"remote-run-{frame.run_id}")
            self.runs[frame.run_id] = (task, ctx)
            task.add_done_callback(lambda _: self.runs.pop(frame.run_id, None))
        elif isinstance(frame, SteeringBatch):
            waiting = self.pulls.pop(frame.request_id, None)
            if waiting is not None and not waiting.done():
                waiting.set_result(
                    [SteeringMessage(m.message_id, m.text, m.author, m.ts) for m in frame.messages]
                )
        elif isinstance(frame, RunCancel):
            running = self.runs.get(frame.run_id)
            if running is not None:
                running[1].cancelled.set()
                running[0].cancel()
        elif isinstance(frame, RunnerErrorFrame):
            log.warning("the gateway says %s: %s", frame.code, frame.message)
            waiting = self.pulls.pop(frame.request_id or "", None)
            if waiting is not None and not waiting.done():
                waiting.set_result([])

    def _context(self, frame: RunAssign) -> RunContext:
        messages = [
            TranscriptMessage(m.message_id, m.role, m.content, m.run_id, m.ts)
            for m in frame.messages
        ]
        by_id = {m.message_id: m for m in messages}
        triggers = [  # `run.assign` does not say who wrote them
            SteeringMessage(m, by_id[m].content, "", by_id[m].ts)
            for m in frame.trigger_message_ids
            if m in by_id
        ]
        return RunContext(
            run_id=frame.run_id,
            conversation_id=frame.conversation_id,
            runner=self.runner.name,
            messages=messages,
            triggers=triggers,
            steering=_Steering(self, frame.run_id),
            deadline_ms=frame.deadline_ms,
            traceparent=frame.traceparent,
        )

    async def pull(
        self, run_id: str, mode: Literal["all", "one"], limit: int
    ) -> list[SteeringMessage]:
        request_id = f"p{next(self._ids)}"
        reply: asyncio.Future[list[SteeringMessage]] = asyncio.get_running_loop().create_future()
        self.pulls[request_id] = reply
        frame = SteeringPullFrame(
            type="steering.pull", run_id=run_id, request_id=request_id, mode=mode, limit=limit
        )
        await self.ws.send(encode(frame).decode())
        return await reply

    async def _send(self, run_id: str, result: Result) -> None:
        await self.ws.send(result_frame(run_id, result).decode())

    async def _run(self, ctx: RunContext) -> None:
        """One run: every result the runner yields goes to the gateway; a runner that
        returns without ending the run completes it, one that raises fails it."""
        gen = self.runner.run(ctx)
        ended = False
        try:
            async for result in gen:
                await self._send(ctx.run_id, result)
                ended = ended or is_terminal(result)
            if not ended:
                await self._send(ctx.run_id, run_completed("completed"))
        except asyncio.CancelledError:
            raise
        except websockets.ConnectionClosed:
            pass  # the gateway has failed the run `runner_lost`
        except Exception as exc:
            log.warning("run %s: runner %s raised %r", ctx.run_id, self.runner.name, exc)
            with contextlib.suppress(websockets.ConnectionClosed):
                error = f"{type(exc).__name__}: {exc}"[:500]
                await self._send(ctx.run_id, run_failed(error, "runner_error"))
        finally:
            with contextlib.suppress(Exception):
                await gen.aclose()  # type: ignore[attr-defined]

    async def close(self) -> None:
        for task, ctx in list(self.runs.values()):
            ctx.cancelled.set()
            task.cancel()
        for task, _ in list(self.runs.values()):
            with contextlib.suppress(BaseException):
                await task
        for waiting in self.pulls.values():
            waiting.cancel()


class _Steering:
    """`ctx.steering` of a remote run."""

    def __init__(self, session: _Session, run_id: str) -> None:
        self._session = session
        self._run_id = run_id

    async def pull(
        self, mode: Literal["all", "one"] = "all", limit: int = 100
    ) -> list[SteeringMessage]:
        return await self._session.pull(self._run_id, mode, max(1, min(limit, 100)))


class RunnerClient:
    def __init__(
        self,
        url: str,
        runner: Runner,
        *,
        max_concurrency: int = 1,
        token: str | None = None,
        backoff_min: float = 0.1,
        backoff_max: float = 10.0,
        on_ready: Callable[[RunnerReady], Any] | None = None,
    ) -> None:
        self.url = url
        self.runner = runner
        self.max_concurrency = max_concurrency
        self.token = token
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.on_ready = on_ready
        self.connections = 0  # sessions that reached `ready`

    async def serve_forever(self) -> None:
        """Serve runs until cancelled, reconnecting with backoff."""
        delay = self.backoff_min
        while True:
            try:
                if await self.serve_once():
                    delay = self.backoff_min
            except (OSError, websockets.WebSocketException, TimeoutError) as exc:
                log.warning("runner %s: %s; retrying in %.1f s", self.runner.name, exc, delay)
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(self.backoff_max, delay * 2)

    async def serve_once(self) -> bool:
        """One connection, until it closes; True when the gateway said `ready`."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        async with websockets.connect(
            self.url, additional_headers=headers, max_size=None, open_timeout=10
        ) as ws:
            hello = HelloFrame(
                type="hello",
                runner=self.runner.name,
                supports_steering=self.runner.supports_steering,
                max_concurrency=self.max_concurrency,
            )
            await ws.send(encode(hello).decode())
            ready = parse_gateway_frame(await ws.recv())
            if not isinstance(ready, RunnerReady):
                log.error("runner %s refused: %s", self.runner.name, ready)
                return False
            self.connections += 1
            if self.on_ready is not None:
                self.on_ready(ready)
            session = _Session(ws, self.runner)
            try:
                async for raw in ws:
                    await session.handle(raw)
            except websockets.ConnectionClosed:
                pass
            finally:
                await session.close()
            return True
