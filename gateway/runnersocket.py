"""`GET /ws/runners` (PROTOCOL.md section 10): the socket edge of remote runners.

A runner connects, says `hello` (its name, whether it steers, how many runs it
takes at once) and gets `ready`; from then on the pool (gateway.runners.remote)
may assign it runs.  This module only reads and writes frames: each frame is
parsed by gateway.protocol.frames, a result or a pull is handed to the run it
names, in order, and everything bad is answered here:

- a frame that is not JSON, not a runner frame, or names a run this runner does
  not hold: an `error` frame; `rate_abuse` of them in a row: closed 4029;
- anything before `hello`, or a `hello` naming an in-process runner: an `error`,
  then closed 1008; a name its token does not allow: closed 4003;
- more than `runner_rate_per_s` frames a second: the socket is read no faster
  (nothing is dropped); a runner that does not read what the gateway sends it,
  RUNNER_OUTBOX frames behind: closed 4008; a frame over 2 MiB: closed 1009 by
  the WebSocket layer.

When the connection ends, for whatever reason, each run the runner held fails
`runner_lost` (retryable); nothing else is disturbed.  Except at shutdown: the
server leaves this socket open (gateway.wsserver, `steerway.shutdown`) while
the hub gives the runs their grace and ends what is left (`failed`/`shutdown`,
the runner told `run.cancel`); then it closes 1001, after every frame before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any

from gateway import auth
from gateway.auth import Principal
from gateway.conversation import ConversationHub
from gateway.core.limits import ConnectionSlots, TokenBucket
from gateway.errors import FrameError, SteerwayError
from gateway.protocol.codes import CloseCode, ErrorCode
from gateway.protocol.frames import (
    HelloFrame,
    ResultFrame,
    RunnerErrorFrame,
    RunnerFrame,
    RunnerReady,
    SteeringBatch,
    SteeringPullFrame,
    Strict,
    encode,
    parse_runner_frame,
)
from gateway.runners.remote import RemotePool, RunnerLink, is_terminal
from gateway.ws import Scope
from gateway.wsserver import SHUTDOWN

log = logging.getLogger("steerway.runners.socket")

RUNNER_OUTBOX = 1024  # frames queued to one runner


class RunnerSocket:
    """The ASGI app of `/ws/runners`."""

    def __init__(self, hub: ConversationHub, pool: RemotePool, slots: ConnectionSlots) -> None:
        self.hub = hub
        self.pool = pool
        self.slots = slots  # the per-process connection limit, shared by every endpoint

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        try:  # a runner token, or no secret (PROTOCOL.md section 7)
            who = auth.admit(scope, self.hub.settings, auth.for_runner)
            auth.take_slot(self.slots)
        except auth.Refused as exc:
            await auth.refuse(send, exc)
            return
        defer = scope.get("extensions", {}).get(SHUTDOWN, {}).get("defer")
        shutdown: asyncio.Event | None = defer() if defer is not None else None
        try:
            connection = RunnerConnection(self.hub, self.pool, who, send, receive)
            await connection.serve(shutdown)
        finally:
            self.slots.release(None)


class RunnerConnection:
    """One remote runner's connection."""

    def __init__(
        self, hub: ConversationHub, pool: RemotePool, who: Principal, send: Any, receive: Any
    ) -> None:
        settings = hub.settings
        self.hub = hub
        self.pool = pool
        self.who = who
        self.send = send
        self.receive = receive
        self.session_id = uuid.uuid4().hex
        # frames to send; None: close 1001 (the server shuts down), once they are sent
        self.outbox: asyncio.Queue[str | None] = asyncio.Queue(RUNNER_OUTBOX)
        rate = settings.runner_rate_per_s
        self.bucket = TokenBucket(rate, max(1, int(rate)), time.monotonic())
        self.abuse = settings.rate_abuse
        self.errors = 0  # error answers in a row
        self.link: RunnerLink | None = None
        self.close_code: int | None = None
        self._closing: set[asyncio.Task[None]] = set()

    async def serve(self, shutdown: asyncio.Event | None) -> None:
        """Serve the connection; `shutdown` is set when the server shuts down and leaves
        the closing to this connection (without it, the server closes it at once)."""
        await self.send({"type": "websocket.accept"})
        gauge = self.hub.metrics.connections.labels("runners")
        gauge.inc()
        tasks = [asyncio.create_task(self._write())]
        if shutdown is not None:
            tasks.append(asyncio.create_task(self._leave_at(shutdown)))
        try:
            await self._read()
        finally:
            if self.link is not None:
                self.pool.leave(self.link)
                log.info("runner %s (%s) disconnected", self.link.name, self.session_id)
            gauge.dec()
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            for task in list(self._closing):
                with contextlib.suppress(Exception):
                    await task

    # ------------------------------------------------------------------ writing

    def queue(self, frame: Strict) -> None:
        """Queue a frame to the runner (the pool's `send`); a runner that lets
        RUNNER_OUTBOX frames pile up is closed 4008."""
        if self.close_code is not None:
            return
        try:
            self.outbox.put_nowait(encode(frame).decode())
        except asyncio.QueueFull:
            task = asyncio.create_task(self._close(CloseCode.SLOW_CONSUMER, "slow_consumer"))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _write(self) -> None:
        try:
            while True:
                text = await self.outbox.get()
                if text is None:
                    await self._close(CloseCode.GOING_AWAY, "server shutting down")
                    return
                await self.send({"type": "websocket.send", "text": text})
        except OSError:  # the runner went away
            pass

    async def _leave_at(self, shutdown: asyncio.Event) -> None:
        """The server shuts down: the runs this runner holds have their grace like any
        run (no new one comes: the pool places none), then the hub ends what is left,
        the runner told `run.cancel`; the close follows those frames."""
        await shutdown.wait()
        try:
            await self.hub.end_runs(self.hub.settings.shutdown_grace_s)
        finally:  # whatever happened, the server waits for this socket to close
            try:
                self.outbox.put_nowait(None)
            except asyncio.QueueFull:  # it reads nothing: closed at once
                await self._close(CloseCode.GOING_AWAY, "server shutting down")

    async def _close(self, code: int, reason: str, last: Strict | None = None) -> None:
        if self.close_code is not None:
            return
        self.close_code = code
        with contextlib.suppress(OSError):
            if last is not None:
                await self.send({"type": "websocket.send", "text": encode(last).decode()})
            await self.send({"type": "websocket.close", "code": code, "reason": reason})

    async def _refuse(
        self, error: SteerwayError, run_id: str | None = None, request_id: str | None = None
    ) -> None:
        frame = RunnerErrorFrame(
            code=error.code, message=error.message, run_id=run_id, request_id=request_id
        )
        self.errors += 1
        if self.errors >= self.abuse:
            await self._close(CloseCode.RATE_LIMIT_ABUSE, "rate_limit_abuse", frame)
        else:
            self.queue(frame)

    # ------------------------------------------------------------------ reading

    async def _read(self) -> None:
        while True:
            message = await self.receive()
            if message["type"] != "websocket.receive":
                return  # websocket.disconnect
            if self.close_code is not None:
                continue
            await self._throttle()
            text = message.get("text")
            if text is None:
                await self._refuse(FrameError("binary frames are not accepted; send JSON text"))
                continue
            try:
                frame = parse_runner_frame(text)
            except FrameError as exc:
                await self._refuse(exc)
                continue
            if self.link is None:
                await self._hello(frame)
            elif isinstance(frame, ResultFrame):
                await self._result(frame)
            elif isinstance(frame, SteeringPullFrame):
                await self._pull(frame)
            else:
                await self._refuse(FrameError("`hello` was already sent"))

    async def _throttle(self) -> None:
        """At most `runner_rate_per_s` frames a second: past it, wait for the bucket."""
        bucket = self.bucket
        if bucket.take(time.monotonic()):
            return
        await asyncio.sleep((1.0 - bucket.tokens) / bucket.rate)
        bucket.take(time.monotonic())  # the token that has come meanwhile

    async def _hello(self, frame: RunnerFrame) -> None:
        def refusal(message: str) -> RunnerErrorFrame:
            return RunnerErrorFrame(code=ErrorCode.INVALID_FRAME, message=message)

        if not isinstance(frame, HelloFrame):
            await self._close(
                CloseCode.POLICY_VIOLATION, "hello first", refusal("the first frame must be hello")
            )
            return
        name = frame.runner
        try:
            auth.for_announce(self.who, name)
        except auth.Refused:
            error = refusal(f"this token may not announce {name!r}")
            await self._close(CloseCode.FORBIDDEN, "forbidden", error)
            return
        if self.hub.runners.local(name) is not None:
            error = refusal(f"{name!r} is an in-process runner; a remote runner cannot serve it")
            await self._close(CloseCode.POLICY_VIOLATION, "name taken", error)
            return
        self.errors = 0
        link = RunnerLink(name, frame.supports_steering, frame.max_concurrency, self.queue)
        self.queue(RunnerReady(runner=name, session_id=self.session_id))
        self.link = link
        self.pool.join(link)
        log.info(
            "runner %s connected (%s, max_concurrency %d)",
            name,
            self.session_id,
            frame.max_concurrency,
        )

    def _unknown(self, run_id: str) -> SteerwayError:
        message = f"run {run_id!r} is not assigned to this runner"
        return SteerwayError(message, code=ErrorCode.UNKNOWN_RUN)

    async def _result(self, frame: ResultFrame) -> None:
        assert self.link is not None
        held = self.link.held(frame.run_id)
        if held is None:
            await self._refuse(self._unknown(frame.run_id), run_id=frame.run_id)
            return
        self.errors = 0
        if held == "ended" or held.finished:
            return  # the run ended first (a cancel, a deadline): its late results are moot
        if is_terminal(frame.result):
            held.finished = True
        await held.put(frame.result)

    async def _pull(self, frame: SteeringPullFrame) -> None:
        assert self.link is not None
        held = self.link.held(frame.run_id)
        if held is None:
            error = self._unknown(frame.run_id)
            await self._refuse(error, run_id=frame.run_id, request_id=frame.request_id)
            return
        self.errors = 0
        if held == "ended" or held.finished:
            self.queue(SteeringBatch(request_id=frame.request_id, messages=[]))
            return
        await held.put(frame)
