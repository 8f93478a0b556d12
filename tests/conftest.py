"""Shared fixtures: a real gateway (uvicorn on a free port, in the test's event loop)
and WebSocket clients that wait for the frames they expect, with timeouts."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
import websockets
from starlette.applications import Starlette

from gateway.app import create_app
from gateway.config import Settings
from gateway.conversation import ConversationHub
from gateway.runners.echo import EchoRunner
from gateway.runners.registry import RunnerRegistry
from gateway.wsserver import SteerwayH11Protocol, connection_options
from store.memory import MemoryStore

TIMEOUT = 10.0


def free_socket() -> socket.socket:
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted sockets only when the
    # listening socket says TCP, and without it back-to-back small writes stall ~40 ms.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.setblocking(False)
    return sock


class Client:
    """A WebSocket client of one conversation that keeps every frame it receives."""

    def __init__(self, ws: websockets.ClientConnection) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []
        self.raw: list[str] = []

    async def send(self, frame: dict[str, Any] | str | bytes) -> None:
        if isinstance(frame, dict):
            await self.ws.send(orjson.dumps(frame).decode())
        else:
            await self.ws.send(frame)

    async def message(self, text: str, client_msg_id: str, **fields: Any) -> None:
        await self.send({"type": "message", "client_msg_id": client_msg_id, "text": text, **fields})

    async def recv(self, within: float = TIMEOUT) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.ws.recv(), within)
        assert isinstance(raw, str), "the server sent a binary frame"
        self.raw.append(raw)
        frame: dict[str, Any] = orjson.loads(raw)
        self.frames.append(frame)
        return frame

    async def until(
        self, predicate: Callable[[dict[str, Any]], bool], within: float = TIMEOUT
    ) -> dict[str, Any]:
        """Receive until a frame matches; every frame seen stays in `frames`."""
        async with asyncio.timeout(within):
            while True:
                frame = await self.recv(within)
                if predicate(frame):
                    return frame

    async def until_type(self, kind: str, within: float = TIMEOUT, **match: Any) -> dict[str, Any]:
        return await self.until(
            lambda f: f.get("type") == kind and all(f.get(k) == v for k, v in match.items()),
            within,
        )

    def events(self) -> list[dict[str, Any]]:
        return [f for f in self.frames if "offset" in f and f.get("type") != "ack"]

    async def close(self) -> None:
        await self.ws.close()


@dataclass
class Gateway:
    app: Starlette
    port: int
    store: MemoryStore
    server: uvicorn.Server

    def write_buffers(self) -> list[int]:
        """Bytes waiting in each open connection's transport, not yet taken by the kernel."""
        return [
            conn.transport.get_write_buffer_size()
            for conn in self.server.server_state.connections
            if getattr(conn, "transport", None) is not None
        ]

    @property
    def hub(self) -> ConversationHub:
        hub: ConversationHub = self.app.state.hub
        return hub

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ws_url(self, conversation_id: str, **query: Any) -> str:
        qs = "&".join(f"{k}={v}" for k, v in query.items())
        return f"ws://127.0.0.1:{self.port}/ws/conversations/{conversation_id}" + (
            f"?{qs}" if qs else ""
        )

    @contextlib.asynccontextmanager
    async def connect(
        self, conversation_id: str, *, ready: bool = True, **query: Any
    ) -> AsyncIterator[Client]:
        async with websockets.connect(
            self.ws_url(conversation_id, **query), max_size=None, open_timeout=TIMEOUT
        ) as ws:
            client = Client(ws)
            if ready:
                frame = await client.recv()
                assert frame["type"] == "ready", frame
            yield client

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.http, timeout=TIMEOUT)


class _Server(uvicorn.Server):
    """uvicorn's server, with an event for "started" instead of a flag to poll."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = asyncio.Event()
        self.port = 0

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.ready.set()


@contextlib.asynccontextmanager
async def serve_asgi(app: Any, **options: Any) -> AsyncIterator[_Server]:
    """Serve an ASGI app with uvicorn on a free port in this event loop; the server
    (`port` is its port)."""
    sock = free_socket()
    options = {"loop": "asyncio", "http": "h11", "log_level": "warning", **options}
    server = _Server(uvicorn.Config(app, **options))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        ready = asyncio.create_task(server.ready.wait())
        await asyncio.wait({task, ready}, timeout=TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if task.done():
            task.result()  # startup failed: raise its error
        assert server.started, "the server did not start in time"
        server.port = sock.getsockname()[1]
        yield server
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, TIMEOUT)
        sock.close()


@contextlib.asynccontextmanager
async def run_gateway(
    runners: list[Any] | None = None,
    store: MemoryStore | None = None,
    **settings: Any,
) -> AsyncIterator[Gateway]:
    """Serve a gateway on a free port in this event loop; stop it on exit."""
    settings.setdefault("echo_delay_ms", 1)
    settings.setdefault("shutdown_grace_s", 0)  # runs still active at the end end at once
    config = Settings.load(settings, environ={})
    store = store or MemoryStore()
    registry = RunnerRegistry([EchoRunner(delay_ms=config.echo_delay_ms), *(runners or [])])
    app = create_app(config, store=store, runners=registry)
    async with serve_asgi(
        app,
        http=SteerwayH11Protocol,
        **connection_options(config),
        lifespan="on",
    ) as server:
        yield Gateway(app, server.port, store, server)


@pytest.fixture
async def gw() -> AsyncIterator[Gateway]:
    async with run_gateway() as gateway:
        yield gateway
