"""examples/agui_agent.py (issue 14, item 5): its one command, run as a real process,
serves the AG-UI agent and Steerway in front of it; a message sent to Steerway's
`POST /api/agui` reaches the agent through the `agui` runner and its answer streams
back; SIGTERM to the command's pid stops both processes (the agent and the Steerway it
started), leaving no process and no port behind."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys

import httpx
import pytest

from tests.helpers import TIMEOUT
from tests.processes import ROOT, STARTUP, serving
from tests.test_agui_endpoint import run_input, stream

pytestmark = pytest.mark.slow


def group_alive(pgid: int) -> bool:
    """Whether any process of the process group `pgid` is still there."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


async def refused(url: str) -> bool:
    async with httpx.AsyncClient(timeout=TIMEOUT) as http:
        try:
            await http.get(url)
        except httpx.ConnectError:
            return True
    return False


async def test_the_example_serves_an_agui_agent_behind_steerway_with_one_command() -> None:
    env = {
        **os.environ,
        "STEERWAY_PORT": "0",
        "STEERWAY_STORE": "memory",
        "STEERWAY_LOG_LEVEL": "info",
    }
    # Its own process group: whatever happens, the test can stop all it started by pid.
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "examples" / "agui_agent.py"),
        "--port",
        "0",
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        gateway = await serving(proc)
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), STARTUP)
        assert line.decode().startswith("agent: http://127.0.0.1:"), line
        agent_url = line.decode().split(" ", 1)[1].strip()

        async with httpx.AsyncClient(base_url=gateway.http, timeout=TIMEOUT) as http:
            async with stream(http, run_input("example", "hello there steerway")) as s:
                events = await s.rest()
            stored = (await http.get("/api/conversations/example/events?after=0")).json()
        kinds = [e["type"] for e in events]
        assert kinds[-1] == "RUN_FINISHED", kinds
        assert events[-1]["outcome"] == {"type": "success"}
        # streamed a word at a time, through the `agui` runner to the agent and back
        assert kinds.count("TEXT_MESSAGE_CONTENT") == 5, kinds
        assert s.text() == "you said: hello there steerway"
        started = next(e for e in stored["events"] if e["type"] == "run.started")
        assert started["runner"] == "agent"
        state = [e for e in stored["events"] if e["type"] == "state.updated"]
        assert [e["value"] for e in state] == [{"turns": 1}]

        # bounded: an orphaned Steerway would keep stderr open, and terminate reads it to the end
        assert await asyncio.wait_for(gateway.terminate(), STARTUP * 2) == 0
        assert not group_alive(proc.pid), "Steerway outlived the example"
        assert await refused(gateway.http)
        assert await refused(agent_url)
    finally:
        if proc.returncode is None or group_alive(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
