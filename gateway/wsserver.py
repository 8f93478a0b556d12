"""uvicorn's sans-I/O WebSocket protocol, with a fast path for frames built once.

A conversation event is the same text for every client, and without
permessage-deflate its WebSocket frame (RFC 6455 section 5.2: a server frame is
not masked) is the same bytes too.  This protocol offers the ASGI app an
extension, `steerway.prebuilt`, whose `write(data)` puts such a frame straight
on the transport when the connection is open and writable, and returns False
otherwise: the app then uses the ordinary `send`, which waits.  Everything else
is uvicorn's.
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.http11 import Request
from websockets.protocol import State

from gateway.protocol.frames import MAX_RUNNER_FRAME_BYTES

PREBUILT = "steerway.prebuilt"
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


class SteerwayWebSocketProtocol(WebSocketsSansIOProtocol):
    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        scope: dict[str, Any] | None = getattr(self, "scope", None)
        if scope is not None and scope["path"] == RUNNERS_PATH:
            # A runner's result may be up to 1 MiB and is truncated beyond (section 10),
            # so its frames may exceed the clients' limit; past this one it is closed 1009.
            self.conn.max_message_size = MAX_RUNNER_FRAME_BYTES
        if scope is not None and not self.conn.extensions:  # no compression negotiated
            scope["extensions"][PREBUILT] = {"write": self.write_prebuilt}

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
