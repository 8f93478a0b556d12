"""A minimal AG-UI agent, served behind Steerway with one command.

    python examples/agui_agent.py            # the agent on :8001, Steerway on :8000 in front

The agent (a few lines over `ag-ui-protocol`) answers `you said: <text>` a word at a
time, with a step `think` before it and a state delta counting its turns.  Steerway
drives it with the built-in `agui` runner (`STEERWAY_RUNNERS__AGENT__USE=agui`,
`..._URL=http://127.0.0.1:8001/`), so the chat at http://127.0.0.1:8000 can steer
it mid-run, and AG-UI front ends can talk to Steerway at POST /api/agui.
`--agent-only` serves just the agent (for `steerway serve` started by hand).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8001, help="the agent's port")
    parser.add_argument("--agent-only", action="store_true", help="do not start Steerway")
    args = parser.parse_args()
    gateway = None
    if not args.agent_only:
        env = {
            **os.environ,
            "STEERWAY_RUNNERS__AGENT__USE": "agui",
            "STEERWAY_RUNNERS__AGENT__URL": f"http://127.0.0.1:{args.port}/",
        }
        cmd = [sys.executable, "-m", "gateway.cli", "serve", "--runner", "agent"]
        gateway = subprocess.Popen(cmd, env=env)
    try:
        uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait(10)


if __name__ == "__main__":
    main()
