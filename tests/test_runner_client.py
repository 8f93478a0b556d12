"""The runner client library (gateway.runner_client) and examples/echo_remote.py, which
serves the echo runner's logic from a real separate process (issue 6 item 3)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import websockets

from gateway.runner_client import RunnerClient
from gateway.runners.echo import EchoRunner
from gateway.runnersocket import RunnerConnection
from tests.conftest import Client, Gateway
from tests.helpers import TIMEOUT, ack_of, expect
from tests.processes import ROOT, STARTUP, GatewayProcess, alive, spawn_gateway
from tests.remote import runners_url
from tests.test_runs_ws import start


@contextlib.asynccontextmanager
async def example(
    gw: Gateway | GatewayProcess, name: str
) -> AsyncIterator[asyncio.subprocess.Process]:
    """examples/echo_remote.py as a process of its own, once the gateway said `ready`."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "examples" / "echo_remote.py"),
        runners_url(gw),
        "--name",
        name,
        "--delay-ms",
        "100",
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    seen: list[str] = []
    try:
        async with asyncio.timeout(STARTUP):
            while (line := (await proc.stdout.readline()).decode()) != f"ready {name}\n":
                assert line, f"the example exited: {''.join(seen)}"
                seen.append(line)
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        assert not alive(proc.pid)


async def test_the_example_serves_echo_from_a_separate_process(gw: Gateway) -> None:
    async with example(gw, "echo-remote") as proc, gw.connect("ex", after=0) as client:
        words = "one two three four five six seven eight nine ten"
        ack, started = await start(client, words, "m1", runner="echo-remote")
        assert started["runner"] == "echo-remote"
        await client.message("steer me", "m2")
        assert (await ack_of(client, "m2"))["route"] == "steer"
        done = await expect(client, "message.completed", run_id=ack["run_id"])
        content = done["message"]["content"]
        assert " [steer] steer me" in content
        assert content.replace(" [steer] steer me", "") == "echo: " + words
        await expect(client, "steering.absorbed", run_id=ack["run_id"])
        ended = await expect(client, "run.ended", run_id=ack["run_id"])
        assert (ended["status"], ended["reason"]) == ("completed", "stop")
        # `/fail` fails the run across the socket as it does in-process.
        ack2, _ = await start(client, "/fail", "m3")
        failed = await expect(client, "run.ended", run_id=ack2["run_id"])
        assert failed["error"]["code"] == "demo_failure"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), TIMEOUT) == 0


async def test_killing_the_runner_process_fails_its_run_runner_lost(gw: Gateway) -> None:
    async with example(gw, "echo-remote") as proc, gw.connect("kill", after=0) as client:
        ack, _ = await start(client, "/sleep 30", "m1", runner="echo-remote")
        proc.kill()
        ended = await expect(client, "run.ended", run_id=ack["run_id"])
        assert (ended["status"], ended["reason"]) == ("failed", "runner_lost")
        assert ended["error"]["retryable"] is True


async def test_the_client_reconnects_after_the_gateway_drops_it(gw: Gateway) -> None:
    readies: asyncio.Queue[str] = asyncio.Queue()
    client = RunnerClient(
        runners_url(gw),
        EchoRunner(name="again", delay_ms=1),
        backoff_min=0.05,
        on_ready=lambda ready: readies.put_nowait(ready.session_id),
    )
    serving = asyncio.create_task(client.serve_forever())
    try:
        first = await asyncio.wait_for(readies.get(), TIMEOUT)
        pool = gw.hub.runners.remote
        assert pool is not None
        (link,) = pool.links.values()
        connection = link.send.__self__  # type: ignore[attr-defined]
        assert isinstance(connection, RunnerConnection)
        await connection._close(1011, "dropped by the test")
        second = await asyncio.wait_for(readies.get(), TIMEOUT)
        assert second != first
        assert client.connections == 2
        async with gw.connect("re", after=0) as conv:
            ack, _ = await start(conv, "a  b", "m1", runner="again")
            done = await expect(conv, "message.completed", run_id=ack["run_id"])
            assert done["message"]["content"] == "echo: a b"
    finally:
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serving


async def test_serve_with_a_remote_default_runner_and_a_runners_config(tmp_path: Path) -> None:
    """`steerway serve --runner NAME` with no in-process NAME: remote runners serve it,
    with the options of its section in `--runners-config`."""
    config = tmp_path / "runners.toml"
    config.write_text("[runners.far-agent]\nsupports_steering = false\n")
    gw = await spawn_gateway(
        "--store", "memory", "--runner", "far-agent", "--runners-config", str(config)
    )
    try:
        async with (
            example(gw, "far-agent"),
            websockets.connect(f"{gw.ws}/ws/conversations/cli?after=0") as ws,
        ):
            client = Client(ws)
            await client.recv()  # ready
            ack, started = await start(client, "one two three four five six", "m1")
            assert started["runner"] == "far-agent"
            await client.message("now", "m2", mode="steer")
            refused = await expect(client, "error", client_msg_id="m2")
            assert refused["code"] == "runner_unavailable"  # the config says it cannot steer
            await client.message("then", "m3")
            assert (await ack_of(client, "m3"))["route"] == "queue"
            ended = await expect(client, "run.ended", run_id=ack["run_id"])
            assert ended["status"] == "completed"
    finally:
        assert await gw.terminate() == 0
