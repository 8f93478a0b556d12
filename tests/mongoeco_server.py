"""Serve mongoeco over the MongoDB wire protocol, for the store tests.

mongoeco (Python >= 3.13) has no command-line server of its own: its wire server is
the library class `mongoeco.wire.AsyncMongoEcoProxyServer`.  This script runs one in
the foreground with the interpreter of `.venv-mongoeco` (see the Makefile):

    .venv-mongoeco/bin/python tests/mongoeco_server.py [--port 0] [--sqlite PATH]

It binds 127.0.0.1 (port 0: a free one), prints `listening <port>` on stdout once it
accepts connections, and serves until SIGTERM or SIGINT, then closes cleanly.
The engine is mongoeco's in-memory engine, or SQLite with `--sqlite`.
"""

from __future__ import annotations

import argparse
import asyncio
import signal


async def serve(port: int, sqlite: str | None) -> None:
    from mongoeco.engines.memory import MemoryEngine
    from mongoeco.engines.sqlite import SQLiteEngine
    from mongoeco.wire import AsyncMongoEcoProxyServer

    engine = MemoryEngine() if sqlite is None else SQLiteEngine(sqlite, executor_workers=1)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with AsyncMongoEcoProxyServer(engine=engine, host="127.0.0.1", port=port) as server:
        print(f"listening {server.address.port}", flush=True)
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--sqlite", default=None, help="a SQLite file (default: in memory)")
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.sqlite))


if __name__ == "__main__":
    main()
