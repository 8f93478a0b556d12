"""A hand-driven remote runner for the tests: a raw WebSocket on `/ws/runners` that sends
exactly what the test says and keeps every frame the gateway sends it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import orjson
import websockets

from tests.conftest import Gateway
from tests.helpers import TIMEOUT
from tests.processes import GatewayProcess


def runners_url(gw: Gateway | GatewayProcess) -> str:
    return f"ws://127.0.0.1:{gw.port}/ws/runners"


class RawRunner:
    def __init__(self, ws: websockets.ClientConnection) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []

    async def send(self, frame: dict[str, Any] | str | bytes) -> None:
        await self.ws.send(orjson.dumps(frame).decode() if isinstance(frame, dict) else frame)

    async def result(self, run_id: str, result: Any) -> None:
        await self.send({"type": "result", "run_id": run_id, "result": result})

    async def pull(self, run_id: str, request_id: str, **fields: Any) -> None:
        await self.send(
            {"type": "steering.pull", "run_id": run_id, "request_id": request_id, **fields}
        )

    async def recv(self, within: float = TIMEOUT) -> dict[str, Any]:
        frame: dict[str, Any] = orjson.loads(await asyncio.wait_for(self.ws.recv(), within))
        self.frames.append(frame)
        return frame

    async def expect(self, kind: str, within: float = TIMEOUT, **match: Any) -> dict[str, Any]:
        """The first frame of `kind` matching `match`, received already or still to come."""
        for frame in self.frames:
            if frame.get("type") == kind and all(frame.get(k) == v for k, v in match.items()):
                return frame
        async with asyncio.timeout(within):
            while True:
                frame = await self.recv(within)
                if frame.get("type") == kind and all(frame.get(k) == v for k, v in match.items()):
                    return frame

    async def closed(self, within: float = TIMEOUT) -> int | None:
        """Wait until the gateway closes the connection; its close code."""
        with contextlib.suppress(websockets.ConnectionClosed):
            async with asyncio.timeout(within):
                while True:
                    self.frames.append(orjson.loads(await self.ws.recv()))
        return self.ws.close_code


@contextlib.asynccontextmanager
async def raw_runner(
    gw: Gateway | GatewayProcess,
    name: str = "far",
    *,
    max_concurrency: int = 1,
    supports_steering: bool = True,
    hello: bool = True,
) -> AsyncIterator[RawRunner]:
    """A connected runner; with `hello`, announced and `ready`."""
    async with websockets.connect(runners_url(gw), max_size=None, open_timeout=TIMEOUT) as ws:
        runner = RawRunner(ws)
        if hello:
            await runner.send(
                {
                    "type": "hello",
                    "runner": name,
                    "supports_steering": supports_steering,
                    "max_concurrency": max_concurrency,
                }
            )
            ready = await runner.recv()
            assert ready["type"] == "ready", ready
            assert ready["runner"] == name
        yield runner


def result(kind: str, **data: Any) -> dict[str, Any]:
    return {"type": kind, "data": data}
