"""Real `steerway serve` processes for the tests: started on a free port (uvicorn
binds port 0 and logs the port it got), stopped by their pid."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import websockets

ROOT = Path(__file__).resolve().parent.parent
STARTUP = 30.0
WITHIN = 20.0


class Loopback:
    """A server on a loopback port: its HTTP and WebSocket base URLs."""

    port: int

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"


@dataclass
class GatewayProcess(Loopback):
    proc: asyncio.subprocess.Process
    port: int
    lines: list[str] = field(default_factory=list)  # stderr so far
    drain: asyncio.Task[None] | None = None  # keeps reading stderr into `lines`

    async def terminate(self) -> int:
        """SIGTERM, and the exit status once it has shut down."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        status = await asyncio.wait_for(self.proc.wait(), STARTUP)
        if self.drain is not None:
            await self.drain
        return status

    async def kill(self) -> None:
        """SIGKILL: nothing of the process runs after this."""
        if self.proc.returncode is None:
            self.proc.kill()
        await asyncio.wait_for(self.proc.wait(), STARTUP)
        if self.drain is not None:
            await self.drain


async def spawn_gateway(
    *args: str,
    env: dict[str, str] | None = None,
    command: Sequence[str | Path] = (sys.executable, "-m", "gateway.cli"),
    cwd: Path = ROOT,
) -> GatewayProcess:
    """`steerway serve --port 0 ARGS` (`command` is the `steerway`), once it serves."""
    proc = await asyncio.create_subprocess_exec(
        *command,
        "serve",
        "--port",
        "0",
        *args,
        env={**os.environ, "STEERWAY_LOG_LEVEL": "info", **(env or {})},
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        cwd=cwd,
    )
    return await serving(proc)


async def serving(proc: asyncio.subprocess.Process) -> GatewayProcess:
    """`proc` (its stderr piped) once the gateway in it logged the port it serves on;
    killed if that does not come within STARTUP."""
    assert proc.stderr is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(STARTUP):
            while True:
                line = (await proc.stderr.readline()).decode()
                assert line, f"the gateway exited early: {''.join(lines)}"
                lines.append(line)
                found = re.search(r"running on http://127\.0\.0\.1:(\d+)", line)
                if found:
                    break
    except BaseException:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        raise
    return GatewayProcess(
        proc, int(found.group(1)), lines, asyncio.create_task(_drain(proc, lines))
    )


async def _drain(proc: asyncio.subprocess.Process, lines: list[str]) -> None:
    assert proc.stderr is not None
    while line := await proc.stderr.readline():
        lines.append(line.decode(errors="replace"))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class Reader:
    """A conversation socket that keeps every frame and waits for the ones it needs."""

    def __init__(self, ws: websockets.ClientConnection) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []

    async def until(self, kind: str, **match: Any) -> dict[str, Any]:
        for frame in self.frames:
            if frame["type"] == kind and all(frame.get(k) == v for k, v in match.items()):
                return frame
        async with asyncio.timeout(WITHIN):
            while True:
                frame = orjson.loads(await self.ws.recv())
                self.frames.append(frame)
                if frame["type"] == kind and all(frame.get(k) == v for k, v in match.items()):
                    return frame

    async def send(self, text: str, key: str, **fields: Any) -> dict[str, Any]:
        frame = {"type": "message", "client_msg_id": key, "text": text, **fields}
        await self.ws.send(orjson.dumps(frame).decode())
        return await self.until("ack", client_msg_id=key)

    def offsets(self) -> list[int]:
        return [f["offset"] for f in self.frames if f["type"] not in ("ready", "ack")]


@contextlib.asynccontextmanager
async def reader(proc: Loopback, cid: str, after: int) -> AsyncIterator[Reader]:
    """A Reader on a gateway (or a balancer in front of some), once it has its `ready`."""
    async with websockets.connect(f"{proc.ws}/ws/conversations/{cid}?after={after}") as ws:
        r = Reader(ws)
        await r.until("ready")
        yield r
