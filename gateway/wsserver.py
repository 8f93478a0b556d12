"""uvicorn's sans-I/O WebSocket protocol, with a fast path for frames built once,
and with no peer outstaying its welcome.

A conversation event is the same text for every client, and without
permessage-deflate its WebSocket frame (RFC 6455 section 5.2: a server frame is
not masked) is the same bytes too.  This protocol offers the ASGI app an
extension, `steerway.prebuilt`, whose `write(data)` puts such a frame straight
on the transport when the connection is open and writable, and returns False
otherwise: the app then uses the ordinary `send`, which waits.

Closing (PROTOCOL.md section 7):
- a server shutdown closes with 1001, "going away" (uvicorn says 1012), at once,
  unless the app asked to close the connection itself (the extension
  `steerway.shutdown`, whose `defer()` returns an event set as the server shuts
  down): a remote runner's socket stays open while its runs have their grace;
- the app's close is written at once, even to a peer whose transport is paused
  (a slow consumer, closed 4008, would otherwise never be closed);
- a peer that does not finish a closing handshake, or answer a keepalive ping,
  within `ws_ping_timeout` is aborted: a plain `transport.close()` waits for it
  to read what is buffered, forever if it never reads again.

The HTTP protocols close a connection that sends no request within uvicorn's
keep-alive timeout from the start (uvicorn arms that timer only after a first
response), so idle TCP connections do not pile up either.
Everything else is uvicorn's.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol

from gateway.config import Settings
from gateway.protocol.codes import CloseCode
from gateway.protocol.frames import MAX_RUNNER_FRAME_BYTES

PREBUILT = "steerway.prebuilt"
SHUTDOWN = "steerway.shutdown"
RUNNERS_PATH = "/ws/runners"


def text_frame(payload: bytes) -> bytes:
    """An unmasked, unfragmented, uncompressed text frame (RFC 6455 section 5.2)."""
    n = len(payload)
    if n < 126:
        header = bytes((0x81, n))
    elif n < 1 << 16:
        header = bytes((0x81, 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x81, 127)) + n.to_bytes(8, "big")
    return header + payload


class Inbox:
    """uvicorn's receive queue (an asyncio.Queue there: three deques, ~2.4 KiB per
    connection), as small as it can be: one reader, and few items (uvicorn stops reading
    the socket while the app has not taken what came)."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._waiter: asyncio.Future[None] | None = None

    def empty(self) -> bool:
        return not self._items

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self) -> Any:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.pop(0)


class Flag:
    """uvicorn's `writable` (an asyncio.Event there, with a deque of waiters)."""

    __slots__ = ("_set", "_waiters")

    def __init__(self) -> None:
        self._set = True
        self._waiters: list[asyncio.Future[None]] = []

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> None:
        if self._set:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await waiter


class SteerwayWebSocketProtocol(WebSocketsSansIOProtocol):
    # permessage-deflate's window bits and zlib memLevel (uvicorn's own: 12 and 5);
    # `connection_options` makes a subclass with the settings' values
    deflate_window_bits = 12
    deflate_mem_level = 5

    def __init__(self, config: Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        if config.ws_per_message_deflate:
            bits = self.deflate_window_bits
            deflate = ServerPerMessageDeflateFactory(
                server_max_window_bits=bits,
                client_max_window_bits=bits,
                compress_settings={"memLevel": self.deflate_mem_level},
            )
            self.conn = ServerProtocol(
                extensions=[deflate], max_size=config.ws_max_size, logger=self.conn.logger
            )
        # the time a peer has to answer, a ping or a close alike
        self.close_timeout = config.ws_ping_timeout or self.close_timeout
        self.shutdown_deferred: asyncio.Event | None = None
        # lighter per-connection state than uvicorn's (an idle connection's memory)
        self.queue = Inbox()  # type: ignore[assignment]
        self.writable = Flag()  # type: ignore[assignment]

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        # The request's headers (~3 KiB) outlive the handshake in uvicorn's `request` and in
        # websockets' parser; the scope has its own copy and nothing reads them again.
        event.headers.clear()
        scope: dict[str, Any] | None = getattr(self, "scope", None)
        if scope is not None and scope["path"] == RUNNERS_PATH:
            # A runner's result may be up to 1 MiB and is truncated beyond (section 10),
            # so its frames may exceed the clients' limit; past this one it is closed 1009.
            self.conn.max_message_size = MAX_RUNNER_FRAME_BYTES
        if scope is not None and not self.conn.extensions:  # no compression negotiated
            scope["extensions"][PREBUILT] = {"write": self.write_prebuilt}
        if scope is not None:
            scope["extensions"][SHUTDOWN] = {"defer": self.defer_shutdown}

    def defer_shutdown(self) -> asyncio.Event:
        """When the server shuts down, set the event and leave the connection open: the
        app closes it.  uvicorn waits for it (with no `timeout_graceful_shutdown`, as
        long as it takes) before the lifespan's shutdown."""
        if self.shutdown_deferred is None:
            self.shutdown_deferred = asyncio.Event()
        return self.shutdown_deferred

    def write_prebuilt(self, data: bytes) -> bool:
        """Write a frame made by `text_frame`; False when the connection cannot take it
        now (not open, closing, or its transport buffer is over the high-water mark)."""
        if (
            self.close_sent
            or self.disconnected
            or not self.handshake_complete
            or not self.writable.is_set()
            or self.conn.state is not State.OPEN
        ):
            return False
        self.transport.write(data)
        return True

    async def send(self, message: Any) -> None:
        closing = message["type"] == "websocket.close" and self.handshake_complete
        if closing and not (self.initial_response or self.close_sent or self.disconnected):
            # uvicorn would first wait for the transport to drain
            self._close(message.get("code", CloseCode.NORMAL), message.get("reason") or "")
            return
        await super().send(message)
        if message["type"] == "websocket.accept":
            self.response.headers.clear()  # sent; uvicorn keeps the response: ~1 KiB

    def shutdown(self) -> None:
        if not self.handshake_complete or self.close_sent or self.disconnected:
            super().shutdown()
        elif self.shutdown_deferred is not None:
            self.shutdown_deferred.set()  # keepalive goes on: a runner gone is still seen
            return  # no abort timer either: the app closes it
        else:
            self.stop_keepalive()
            self._close(CloseCode.GOING_AWAY, "server shutting down")
        self._abort_later()

    def keepalive_timeout(self) -> None:
        super().keepalive_timeout()
        self.transport.abort()  # it answers nothing: do not wait for it to read

    def _close(self, code: int, reason: str) -> None:
        """Send a close frame now and wait for the peer's at most `close_timeout`."""
        if self.transport.is_closing():
            return
        self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
        self.conn.send_close(code, reason)
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        if self.read_paused:  # read on, to see the peer's close
            self.read_paused = False
            self.transport.resume_reading()
        self._abort_later()

    def _abort_later(self) -> None:
        if self.close_timer is not None:
            self.close_timer.cancel()
        self.close_timer = self.loop.call_later(self.close_timeout, self.transport.abort)


def _arm_idle_timer(protocol: H11Protocol | HttpToolsProtocol) -> None:
    protocol.timeout_keep_alive_task = protocol.loop.call_later(
        protocol.timeout_keep_alive, protocol.timeout_keep_alive_handler
    )


class SteerwayH11Protocol(H11Protocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        _arm_idle_timer(self)  # disarmed by the first bytes received


class SteerwayHttpToolsProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        _arm_idle_timer(self)


def connection_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's options for WebSocket and HTTP connections as the settings want them:
    the same in `steerway serve` and in the tests (which choose their HTTP protocol)."""
    protocol = type(
        "SteerwayWebSocketProtocol",
        (SteerwayWebSocketProtocol,),
        {
            "deflate_window_bits": settings.ws_deflate_window_bits,
            "deflate_mem_level": settings.ws_deflate_mem_level,
        },
    )
    return {
        "ws": protocol,
        "ws_max_size": settings.max_frame_bytes,
        "ws_per_message_deflate": settings.ws_compression,
        "ws_ping_interval": settings.ws_ping_interval_s,
        "ws_ping_timeout": settings.ws_ping_timeout_s,
        "timeout_keep_alive": settings.http_idle_s,
    }
