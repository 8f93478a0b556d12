"""Set-up, item 1: `steerway serve` as a real process, settings from flags and STEERWAY_*,
and the files that `make run` / `make test` / CI / Docker rely on."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from gateway.config import Settings
from gateway.errors import ConfigError
from tests.conftest import free_socket
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


STEERWAY = Path(sys.executable).with_name("steerway")  # the console script pip installed
NOT_A_RUNNER = "not built in, not a steerway.runners entry point, not module:attr"


@pytest.mark.parametrize(
    ("flags", "env", "lines"),
    [
        (
            [],
            {"STEERWAY_RUNNERS": "nosuchmodule:Thing"},
            [
                "STEERWAY_RUNNERS: runner 'nosuchmodule:Thing': "
                "ModuleNotFoundError: No module named 'nosuchmodule'"
            ],
        ),
        (
            ["--runners", "echo", "nosuch"],
            {},
            [f"--runners: runner 'nosuch': {NOT_A_RUNNER}"],
        ),
        (
            ["--runners", "gateway.runners.echo:Nope"],
            {},
            [
                "--runners: runner 'gateway.runners.echo:Nope': "
                "AttributeError: module 'gateway.runners.echo' has no attribute 'Nope'"
            ],
        ),
        (
            [],
            {"STEERWAY_RUNNERS__GPT__USE": "nosuch"},
            [f"[runners.gpt]: runner 'nosuch': {NOT_A_RUNNER}"],
        ),
        (
            [],
            {"STEERWAY_RUNNERS__GPT__USE": "openai", "STEERWAY_RUNNERS__GPT__MODLE": "x"},
            [
                "[runners.gpt]: runner 'openai': model: Field required",
                "[runners.gpt]: runner 'openai': modle: Extra inputs are not permitted",
            ],
        ),
        (
            [],
            {"STEERWAY_RUNNERS__GPT": "openai"},
            ["STEERWAY_RUNNERS__GPT: expected STEERWAY_RUNNERS__<NAME>__<OPTION>"],
        ),
        (
            ["--runners-config", "missing.toml"],
            {},
            ["--runners-config: cannot read 'missing.toml': No such file or directory"],
        ),
        (
            [],
            {"STEERWAY_RUNNERS_CONFIG": "bad.toml"},
            [
                "STEERWAY_RUNNERS_CONFIG: 'bad.toml' is not TOML: "
                "Expected '=' after a key in a key/value pair (at line 1, column 5)"
            ],
        ),
        (
            [],
            {"STEERWAY_RUNNERS_CONFIG": "."},
            ["STEERWAY_RUNNERS_CONFIG: cannot read '.': Is a directory"],
        ),
        (
            ["--store", "postgres://db/x"],
            {},
            ["--store: expected `memory`, `auto` or a mongodb:// URI"],
        ),
        (
            [],
            {"STEERWAY_STORE": "mongodb://db:99999"},
            [
                "STEERWAY_STORE: not a valid MongoDB URI: "
                "Port must be an integer between 0 and 65535"
            ],
        ),
        (
            [],
            {"STEERWAY_MONGODB_URI": "db.example:27017"},
            ["STEERWAY_MONGODB_URI: expected a mongodb:// or mongodb+srv:// URI"],
        ),
        (
            [],
            {"STEERWAY_SECRET": "s3cr3t-" + "x" * 24},
            ["STEERWAY_SECRET: the secret must be at least 32 bytes"],
        ),
        (
            [],
            {"STEERWAY_MAX_CONNECTIONS": "lots"},
            [
                "STEERWAY_MAX_CONNECTIONS: "
                "Input should be a valid integer, unable to parse string as an integer"
            ],
        ),
        (
            ["--log-level", "loud"],
            {},
            ["--log-level: expected one of critical, error, warning, info, debug, trace"],
        ),
        (
            [],
            {"STEERWAY_REDIS_URL": "localhost:6379"},
            ["STEERWAY_REDIS_URL: expected a redis://, rediss:// or unix:// URL"],
        ),
        (
            ["--store", "memory"],
            {"STEERWAY_REDIS_URL": "redis://127.0.0.1:1/0"},
            [
                "STEERWAY_REDIS_URL: cluster mode needs one MongoDB shared by every node: "
                "set STEERWAY_MONGODB_URI (or --store mongodb://…)"
            ],
        ),
        ([], {"STEERWAY_WEB_DIR": "nowhere"}, ["STEERWAY_WEB_DIR: 'nowhere' is not a directory"]),
        (
            [],
            {
                "STEERWAY_WEBHOOKS__HOOK__URL": "ftp://x",
                "STEERWAY_WEBHOOKS__HOOK__SECRET": "whsec_s3cr3t!!",
                "STEERWAY_WEBHOOKS__HOOK__EVENTS": "run.ended,run.exploded",
            },
            [
                "[webhooks.hook] url: expected an http:// or https:// URL",
                "[webhooks.hook] secret: the part after whsec_ is not base64",
                "[webhooks.hook] events: unknown event type 'run.exploded': expected some of "
                "run.started, run.ended, message.completed, steering.dropped, "
                "conversation.created",
            ],
        ),
        (
            [],
            {"STEERWAY_WEBHOOKS__HOOK__URL": "http://x/"},
            ["[webhooks.hook] secret: Field required", "[webhooks.hook] events: Field required"],
        ),
        (
            ["--webhooks-config", "bad.toml"],
            {},
            [
                "--webhooks-config: 'bad.toml' is not TOML: "
                "Expected '=' after a key in a key/value pair (at line 1, column 5)"
            ],
        ),
        (
            [],
            {"STEERWAY_WEBHOOK_GIVE_UP_S": "0"},
            ["STEERWAY_WEBHOOK_GIVE_UP_S: Input should be greater than 0"],
        ),
        # every problem of the settings, one line each
        (
            ["--echo-delay-ms", "-1"],
            {"STEERWAY_SECRET": "short"},
            [
                "--echo-delay-ms: Input should be greater than or equal to 0",
                "STEERWAY_SECRET: the secret must be at least 32 bytes",
            ],
        ),
    ],
)
def test_a_bad_setting_is_one_line_and_status_2_before_anything_listens(
    tmp_path: Path, flags: list[str], env: dict[str, str], lines: list[str]
) -> None:
    (tmp_path / "bad.toml").write_text("not toml [\n")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STEERWAY_")}
    # the port is taken: a process that went as far as binding it would fail another way
    with free_socket() as taken:
        done = subprocess.run(
            [STEERWAY, "serve", "--port", str(taken.getsockname()[1]), *flags],
            env={**clean, "STEERWAY_DATA_DIR": "data", **env},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"steerway: {line}" for line in lines]
    assert done.stdout == ""
    assert not (tmp_path / "data").exists()  # the embedded store never started
    assert "s3cr3t" not in done.stderr


def test_store_uris_are_checked_without_connecting() -> None:
    with pytest.raises(ConfigError) as raised:
        Settings.load(environ={"STEERWAY_MONGODB_URI": "mongodb://me:hunter2@db:99999/x"})
    assert raised.value.problems == [  # and no password in it
        "STEERWAY_MONGODB_URI: not a valid MongoDB URI: Port must be an integer between 0 and 65535"
    ]
    good = "mongodb://me:pw@db-1:27017,db-2/steerway?replicaSet=rs0"
    assert Settings.load(environ={"STEERWAY_STORE": good}).store == good
    # checking a mongodb+srv:// URI would resolve DNS: the store checks it when it connects
    srv = "mongodb+srv://cluster.invalid/"
    assert Settings.load(environ={"STEERWAY_MONGODB_URI": srv}).mongodb_uri == srv


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
    # the image installs the wheel, which carries the pages: no setting points at them
    assert re.search(r"^RUN pip wheel .*--wheel-dir /dist \.$", docker, re.M)
    assert re.search(r"^RUN pip install /dist/steerway-\*\.whl", docker, re.M)
    assert "STEERWAY_WEB_DIR" not in docker


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
