"""Liveness (issue 7, item 5): the server pings idle WebSockets and drops a peer that
stops answering; a client that stops reading is closed and, when even its close
cannot be delivered, aborted; a TCP connection that never sends a request is closed.
Each time the connection counts go back down: nothing piles up."""

from __future__ import annotations

import asyncio
import base64
import os

from tests.conftest import TIMEOUT, Gateway, run_gateway
from tests.helpers import ack_of, settled
from tests.test_bad_input import still_works
from tests.test_slow_client import Flood, small_buffer_socket, small_server_buffer

PING = 0x89  # the first byte of an unfragmented server ping


def open_count(gw: Gateway) -> int:
    return int(gw.hub.metrics.connections.labels("conversation")._value.get())


async def raw_websocket(
    gw: Gateway, cid: str, **open_kwargs: object
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A WebSocket opened by hand: the handshake, and nothing more unless the test says."""
    reader, writer = await asyncio.open_connection(**open_kwargs)  # type: ignore[arg-type]
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET /ws/conversations/{cid} HTTP/1.1\r\nHost: 127.0.0.1:{gw.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


async def read_to_the_end(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it drops the connection."""
    received = bytearray()
    async with asyncio.timeout(TIMEOUT):
        try:
            while chunk := await reader.read(65536):
                received += chunk
        except ConnectionResetError:
            pass
    return bytes(received)


def opcodes(data: bytes) -> list[int]:
    """First bytes of the unmasked server frames in `data`."""
    found, i = [], 0
    while i + 2 <= len(data):
        found.append(data[i])
        size, i = data[i + 1] & 0x7F, i + 2
        if size == 126:
            size, i = int.from_bytes(data[i : i + 2], "big"), i + 2
        elif size == 127:
            size, i = int.from_bytes(data[i : i + 8], "big"), i + 8
        i += size
    return found


async def test_a_peer_that_stops_answering_pings_is_dropped() -> None:
    async with run_gateway(ws_ping_interval_s=0.2, ws_ping_timeout_s=0.3) as gw:
        slots = gw.app.state.connections
        async with gw.connect("live", after=0) as healthy:  # its client answers pings
            reader, writer = await raw_websocket(gw, "live", host="127.0.0.1", port=gw.port)
            try:
                assert open_count(gw) == 2
                frames = opcodes(await read_to_the_end(reader))  # never answers a ping
            finally:
                writer.close()
            assert frames[0] == 0x81  # ready
            assert PING in frames
            await settled(gw, lambda: slots.total == 1 and open_count(gw) == 1)
            assert gw.hub.bus.count("live") == 1
            await still_works(healthy, "still here")  # pinged too, and answered
        await settled(gw, lambda: slots.total == 0 and open_count(gw) == 0)


async def test_a_client_that_never_reads_again_is_closed_then_aborted() -> None:
    flood = Flood(count=200, window=16)  # 1.6 MiB: far more than every buffer on the way
    settings = {"outbox_frames": 32, "outbox_bytes": 128 * 1024, "ws_ping_timeout_s": 0.5}
    async with run_gateway(runners=[flood], **settings) as gw:
        slots = gw.app.state.connections
        _, writer = await raw_websocket(gw, "stuck", sock=small_buffer_socket(gw.port))
        small_server_buffer(gw, writer.get_extra_info("sockname")[1])
        try:
            async with gw.connect("stuck", after=0) as healthy:
                await healthy.message("go", "m1", runner="flood")
                ack = await ack_of(healthy, "m1")
                while (frame := await healthy.recv(within=30))["type"] != "run.ended":
                    if frame["type"] == "message.delta":
                        flood.seen()
                assert frame["run_id"] == ack["run_id"]
                # the stuck client is closed 4008 and, as it reads nothing, aborted
                await settled(gw, lambda: slots.total == 1)
                assert gw.hub.metrics.slow_consumers._value.get() == 1
                await still_works(healthy, "unaffected")
            await settled(gw, lambda: slots.total == 0 and open_count(gw) == 0)
        finally:
            writer.close()


async def test_a_tcp_connection_that_sends_nothing_is_closed() -> None:
    async with run_gateway(http_idle_s=1) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        try:
            assert await read_to_the_end(reader) == b""  # closed by the server, unprompted
        finally:
            writer.close()
        async with gw.connect("after", after=0) as client:  # the server serves on
            await still_works(client, "ok")
