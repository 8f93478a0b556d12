"""The echo runner's logic, served from a process of its own as a remote runner.

    python examples/echo_remote.py ws://127.0.0.1:8000/ws/runners --name echo-remote

Conversations whose first message says `"runner": "echo-remote"` (or every new
conversation, with `steerway serve --runner echo-remote`) are then served by
this process.  It prints `ready <name>` each time the gateway accepts it, and
reconnects with backoff when the gateway goes away; SIGTERM or Ctrl-C stop it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

from gateway.runner_client import RunnerClient
from gateway.runners.echo import EchoRunner


async def main(url: str, name: str, delay_ms: float, max_concurrency: int) -> None:
    client = RunnerClient(
        url,
        EchoRunner(name=name, delay_ms=delay_ms),
        max_concurrency=max_concurrency,
        on_ready=lambda ready: print(f"ready {ready.runner}", flush=True),
    )
    serving = asyncio.create_task(client.serve_forever())
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, serving.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await serving


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="the gateway's /ws/runners URL")
    parser.add_argument("--name", default="echo-remote")
    parser.add_argument("--delay-ms", type=float, default=50.0)
    parser.add_argument("--max-concurrency", type=int, default=8)
    args = parser.parse_args()
    asyncio.run(main(args.url, args.name, args.delay_ms, args.max_concurrency))
