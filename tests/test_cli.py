"""Set-up, item 1: `steerway serve` as a real process, settings from flags and STEERWAY_*,
and the files that `make run` / `make test` / CI / Docker rely on."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import httpx
import pytest

from gateway.cli import main
from gateway.config import Settings
from tests.processes import ROOT, spawn_gateway


def test_settings_defaults_env_and_flags() -> None:
    env = {
        "STEERWAY_PORT": "9001",
        "STEERWAY_ECHO_DELAY_MS": "5",
        "STEERWAY_WS_COMPRESSION": "true",
        "STEERWAY_RUNNERS": "a.b:C, d.e:F",
        "STEERWAY_STORE": "memory",
    }
    settings = Settings.load({"port": 9002, "runner": "echo"}, environ=env)
    assert settings.port == 9002  # a flag beats the environment
    assert settings.echo_delay_ms == 5.0
    assert settings.ws_compression is True
    assert settings.runners == ["a.b:C", "d.e:F"]
    assert settings.host == "127.0.0.1"
    assert Settings.load(environ={}).port == 8000


def test_bad_setting_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    os.environ["STEERWAY_PORT"] = "not-a-port"
    try:
        assert main(["serve"]) == 2
    finally:
        del os.environ["STEERWAY_PORT"]
    assert "port" in capsys.readouterr().err


async def test_serve_runs_a_real_process() -> None:
    gateway = await spawn_gateway(
        "--store", "memory", "--runner", "echo", env={"STEERWAY_ECHO_DELAY_MS": "1"}
    )
    try:
        warning = next(line for line in gateway.lines if "no secret is configured" in line)
        assert warning.startswith("WARNING")
        assert "authentication is OFF" in warning
        async with httpx.AsyncClient(base_url=gateway.http, timeout=10) as http:
            assert (await http.get("/healthz")).status_code == 200
            assert (await http.get("/readyz")).status_code == 200
            ack = await http.post(
                "/api/conversations/cli/messages", json={"client_msg_id": "m1", "text": "a b"}
            )
            assert ack.status_code == 200
            assert ack.json()["route"] == "run"
            page = await http.get("/")
            assert page.status_code == 200
            assert "Steerway" in page.text
    finally:
        assert await gateway.terminate() == 0  # a graceful stop exits 0


def test_readme_starts_with_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```")[1]
    assert "make run" in first_block
    assert "make test" in first_block
    assert "docs/protocol.md" in readme


def test_dockerfile_is_slim_non_root_with_healthcheck() -> None:
    docker = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim", docker, re.M)
    user = re.search(r"^USER (\S+)", docker, re.M)
    assert user is not None
    assert user.group(1) not in ("root", "0")
    assert "HEALTHCHECK" in docker
    assert "/healthz" in docker
    assert '"steerway", "serve"' in docker


def test_ci_fails_when_no_test_ran(tmp_path: Path) -> None:
    fake = tmp_path / "make"
    fake.write_text("#!/bin/sh\necho 'no tests ran in 0.01s'\nexit 0\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(ROOT / ".ci" / "run")], env=env, capture_output=True)
    assert done.returncode == 1
    assert b"no test was executed" in done.stderr
    fake.write_text("#!/bin/sh\necho '3 passed in 0.01s'\nexit 0\n")
    assert subprocess.run(["bash", str(ROOT / ".ci" / "run")], env=env).returncode == 0
