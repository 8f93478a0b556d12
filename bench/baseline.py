"""The physical-limit baseline: a bare `websockets` broadcast server.

It speaks just enough of the gateway's protocol for the benchmark client:
`ready` on connect; a `message` frame whose text is `rate=<r> count=<n>` is
acked and starts a ticker that broadcasts `message.delta` frames shaped like
the gateway's (same fields, same chunk text, so the same size on the wire),
encoded once per chunk and sent to every connection of the conversation with
`websockets.broadcast`.  No store, no validation, no per-client queue.

    python -m bench.baseline --port 9001 [--compression] [--loop asyncio|uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
import time
import uuid

import orjson
from websockets.asyncio.server import ServerConnection, broadcast, serve

from bench.chunks import paced_chunks, parse_trigger

rooms: dict[str, set[ServerConnection]] = {}
tasks: set[asyncio.Task[None]] = set()
offsets: dict[str, itertools.count[int]] = {}


def _dumps(obj: dict[str, object]) -> str:
    return orjson.dumps(obj).decode()


async def ticker(cid: str, rate: float, count: int) -> None:
    conns = rooms.setdefault(cid, set())
    offset = offsets.setdefault(cid, itertools.count(1))
    run_id, message_id = uuid.uuid4().hex, uuid.uuid4().hex
    async for chunk in paced_chunks(rate, count):
        frame = {
            "type": "message.delta",
            "offset": next(offset),
            "ts": time.time_ns() // 1_000_000,
            "conversation_id": cid,
            "run_id": run_id,
            "message_id": message_id,
            "delta": chunk,
        }
        broadcast(conns, _dumps(frame))
    end = {"type": "run.ended", "offset": next(offset), "conversation_id": cid, "run_id": run_id}
    broadcast(conns, _dumps(end))


async def handler(ws: ServerConnection) -> None:
    cid = ws.request.path.rsplit("/", 1)[-1] if ws.request else "default"
    conns = rooms.setdefault(cid, set())
    conns.add(ws)
    try:
        await ws.send(_dumps({"type": "ready", "protocol": 1, "conversation_id": cid}))
        async for raw in ws:
            obj = orjson.loads(raw)
            if obj.get("type") != "message":
                continue
            await ws.send(_dumps({"type": "ack", "client_msg_id": obj.get("client_msg_id")}))
            rate, count = parse_trigger(obj.get("text", ""))
            task = asyncio.create_task(ticker(cid, rate, count))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    finally:
        conns.discard(ws)


async def main(host: str, port: int, compression: bool) -> None:
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set_result, None)
    async with serve(
        handler,
        host,
        port,
        compression="deflate" if compression else None,
        max_size=64 * 1024,
        backlog=2048,
    ):
        await stop


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--compression", action="store_true", help="offer permessage-deflate")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = parser.parse_args()
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(main(args.host, args.port, args.compression))
    else:
        asyncio.run(main(args.host, args.port, args.compression))
