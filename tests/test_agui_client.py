"""The official AG-UI client against Steerway (issue 14, item 2).

`@ag-ui/client`'s HttpAgent, installed from the npm registry (pinned in
tests/agui_client/package.json, installed once into its gitignored node_modules),
run by Node.js against a live gateway: a run's streamed text, steering through a
second agent on the same thread, and a resume with Last-Event-ID after its
connection is cut (tests/agui_client/script.mjs)."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path

import orjson
import pytest

from tests.conftest import run_gateway
from tests.helpers import stored_events

CLIENT = Path(__file__).resolve().parent / "agui_client"
NODE = shutil.which("node")
NPM = shutil.which("npm")

pytestmark = pytest.mark.skipif(
    NODE is None or NPM is None, reason="Node.js and npm run the official AG-UI client"
)


def install() -> None:
    """`npm install` once: node_modules is reused while package.json names the version."""
    wanted = json.loads((CLIENT / "package.json").read_text())["dependencies"]["@ag-ui/client"]
    installed = CLIENT / "node_modules" / "@ag-ui" / "client" / "package.json"
    if installed.exists() and json.loads(installed.read_text())["version"] == wanted:
        return
    assert NPM is not None
    subprocess.run(
        [NPM, "install", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=CLIENT,
        check=True,
        timeout=300,
    )


async def test_the_official_client_runs_steers_and_resumes() -> None:
    await asyncio.to_thread(install)
    async with run_gateway(echo_delay_ms=20) as gw:
        assert NODE is not None
        proc = await asyncio.create_subprocess_exec(
            NODE,
            "script.mjs",
            gw.http,
            "node",
            cwd=CLIENT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), 60)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode == 0, err.decode()
        seen = orjson.loads(out.splitlines()[-1])
        words = " ".join(f"w{i}" for i in range(30))

        # a run: the text streamed in pieces and assembled by the client
        assert seen["run"]["text"] == "echo: hello world"
        assert seen["run"]["deltas"] == 3

        # steering: the second request was routed into the running run, and absorbed
        assert seen["steer"]["route"] == "steer"
        text = seen["steer"]["text"]
        assert text.startswith("echo: w0")
        assert " [steer] turn left" in text
        assert text.replace(" [steer] turn left", "") == f"echo: {words}"

        # resume: the cut run's text and the resumed stream's make the whole reply
        resume = seen["resume"]
        assert resume["cutError"]
        assert resume["before"]
        assert resume["before"] + resume["after"] == f"echo: {words}"
        stored = await stored_events(gw, "node-resume")
        assert [e["type"] for e in stored].count("user.message") == 1
        assert int(resume["lastId"]) < stored[-1]["offset"]
