"""A minimal AG-UI agent, served behind Steerway with one command.

    python examples/agui_agent.py            # the agent on :8001, Steerway on :8000 in front

The agent (a few lines over `ag-ui-protocol`) answers `you said: <text>` a word at a
time, with a step `think` before it and a state delta counting its turns.  Steerway
drives it with the built-in `agui` runner (`STEERWAY_RUNNERS__AGENT__USE=agui`,
`..._URL=http://127.0.0.1:<port>/`), so the chat at http://127.0.0.1:8000 can steer
it mid-run, and AG-UI front ends can talk to Steerway at POST /api/agui.
Steerway takes its other settings from STEERWAY_* variables as always
(`STEERWAY_PORT=0 STEERWAY_STORE=memory` for a free port and no data on disk).
`--port 0` takes a free port for the agent; `--agent-only` serves just the agent (for
`steerway serve` started by hand).  SIGTERM or Ctrl+C stops both; when Steerway
exits on its own (a port in use, a bad setting), the agent stops too, with its status.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import sys
import uuid
from collections.abc import AsyncIterator

import uvicorn
from ag_ui.core import (
    RunAgentInput,
    RunFinishedEvent,
    RunStartedEvent,
    StateDeltaEvent,
    StepFinishedEvent,
    StepStartedEvent,
    TextMessageContentEvent,
    TextMessageEndEvent,
    TextMessageStartEvent,
)
from ag_ui.encoder import EventEncoder
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from gateway.cli import Server

STOP_WITHIN = 30.0  # seconds Steerway has to shut down after SIGTERM before SIGKILL


async def agent(request: Request) -> StreamingResponse:
    run = RunAgentInput.model_validate(await request.json())
    enc = EventEncoder()
    last = next((m.content for m in reversed(run.messages) if m.role == "user"), "")
    turns = sum(1 for m in run.messages if m.role == "assistant") + 1

    async def events() -> AsyncIterator[str]:
        yield enc.encode(RunStartedEvent(thread_id=run.thread_id, run_id=run.run_id))
        yield enc.encode(StepStartedEvent(step_name="think"))
        await asyncio.sleep(0.5)  # thinking: steering sent now is taken at the step's end
        yield enc.encode(StepFinishedEvent(step_name="think"))
        patch = [{"op": "add", "path": "/turns", "value": turns}]
        yield enc.encode(StateDeltaEvent.model_validate({"delta": patch}))
        mid = uuid.uuid4().hex
        yield enc.encode(TextMessageStartEvent(message_id=mid, role="assistant"))
        for i, word in enumerate(f"you said: {last}".split(" ")):
            await asyncio.sleep(0.2)
            yield enc.encode(
                TextMessageContentEvent(message_id=mid, delta=(" " if i else "") + word)
            )
        yield enc.encode(TextMessageEndEvent(message_id=mid))
        yield enc.encode(RunFinishedEvent(thread_id=run.thread_id, run_id=run.run_id))

    return StreamingResponse(events(), media_type=enc.get_content_type())


app = Starlette(routes=[Route("/", agent, methods=["POST"])])


async def serve(port: int, agent_only: bool) -> int:
    """Serve the agent (and Steerway in front of it, a child process) until told to stop."""
    # Bound here, before Steerway starts, so that `--port 0` is known in its runner URL.
    sock = socket.create_server(("127.0.0.1", port))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/"
    print(f"agent: {url}", flush=True)
    server = Server(uvicorn.Config(app, log_level="warning"))
    if agent_only:
        await server.serve(sockets=[sock])
        return 0
    env = {
        **os.environ,
        "STEERWAY_RUNNERS__AGENT__USE": "agui",
        "STEERWAY_RUNNERS__AGENT__URL": url,
    }
    gateway = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "serve", "--runner", "agent", env=env
    )
    exited = asyncio.create_task(gateway.wait())
    exited.add_done_callback(lambda _: setattr(server, "should_exit", True))
    try:
        await server.serve(sockets=[sock])
    finally:
        if gateway.returncode is None:
            with contextlib.suppress(ProcessLookupError):  # it may have just exited
                gateway.terminate()
            done, _ = await asyncio.wait({exited}, timeout=STOP_WITHIN)
            if not done:
                gateway.kill()
        status = await exited
    if status != 0:  # stopped by us or by Ctrl+C, it exits 0
        print(f"agui_agent: Steerway exited with status {status}", file=sys.stderr)
    return status if status >= 0 else 128 - status  # as a shell reports a signal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8001, help="the agent's port (0: any free)")
    parser.add_argument("--agent-only", action="store_true", help="do not start Steerway")
    args = parser.parse_args()
    sys.exit(asyncio.run(serve(args.port, args.agent_only)))


if __name__ == "__main__":
    main()
