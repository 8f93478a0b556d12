"""The `openai` runner (issue 6 item 4) against a local OpenAI-compatible streaming server
(tests.fake_openai), through a real gateway."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.runners.openai import OpenAIRunner
from gateway.runners.options import load_options
from gateway.runners.registry import make_runner
from tests.conftest import Client, free_socket, run_gateway
from tests.fake_openai import FakeOpenAI, fake_openai
from tests.helpers import TIMEOUT, ack_of, expect
from tests.test_runs_ws import run_events, start


def gpt(fake: FakeOpenAI, **options: Any) -> OpenAIRunner:
    return OpenAIRunner(
        "gpt", base_url=fake.base_url, model="fake-model", api_key="sk-test", **options
    )


def deltas(client: Client, run_id: str) -> list[str]:
    return [f["delta"] for f in run_events(client, run_id) if f["type"] == "message.delta"]


async def test_streams_with_the_transcript_as_context_and_records_usage() -> None:
    async with (
        fake_openai() as fake,
        run_gateway(runners=[gpt(fake, temperature=0.5)]) as gw,
        gw.connect("oa", after=0) as client,
    ):
        ack, started = await start(client, "hello world", "m1", runner="gpt")
        assert started["runner"] == "gpt"
        ended = await expect(client, "run.ended", run_id=ack["run_id"])
        assert (ended["status"], ended["reason"]) == ("completed", "stop")
        assert ended["usage"] == {"prompt_tokens": 1, "completion_tokens": 4, "total_tokens": 5}
        assert deltas(client, ack["run_id"]) == ["you", " said:", " hello", " world"]
        done = await expect(client, "message.completed", run_id=ack["run_id"])
        assert done["message"]["content"] == "you said: hello world"
        (request,) = fake.requests
        assert request["authorization"] == "Bearer sk-test"
        assert request["body"] == {
            "model": "fake-model",
            "messages": [{"role": "user", "content": "hello world"}],
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": 0.5,
        }
        ack2, _ = await start(client, "again", "m2")
        await expect(client, "run.ended", run_id=ack2["run_id"], status="completed")
        assert fake.requests[1]["body"]["messages"] == [
            {"role": "user", "content": "hello world"},
            {"role": "assistant", "content": "you said: hello world"},
            {"role": "user", "content": "again"},
        ]


async def test_steering_during_a_completion_is_absorbed_when_it_ends() -> None:
    async with (
        fake_openai() as fake,
        run_gateway(runners=[gpt(fake)]) as gw,
        gw.connect("steer", after=0) as client,
    ):
        ack, _ = await start(client, "slow start", "m1", runner="gpt")
        await expect(client, "message.delta", run_id=ack["run_id"])  # the stream is open
        await client.message("and more", "m2")
        steer = await ack_of(client, "m2")
        assert steer["route"] == "steer"
        fake.gate.set()
        first = await expect(client, "message.completed", run_id=ack["run_id"])
        absorbed = await expect(client, "steering.absorbed", run_id=ack["run_id"])
        assert absorbed["message_ids"] == [steer["message_id"]]
        assert absorbed["offset"] > first["offset"]  # pulled when the completion ended
        ended = await expect(client, "run.ended", run_id=ack["run_id"])
        assert ended["status"] == "completed"
        assert ended["usage"]["completion_tokens"] == 4 + 4  # both completions
        contents = [
            f["message"]["content"]
            for f in run_events(client, ack["run_id"])
            if f["type"] == "message.completed"
        ]
        assert contents == ["you said: slow start", "you said: and more"]
        assert fake.requests[1]["body"]["messages"] == [
            {"role": "user", "content": "slow start"},
            {"role": "assistant", "content": "you said: slow start"},
            {"role": "user", "content": "and more"},
        ]


async def test_cancel_closes_the_http_stream() -> None:
    async with (
        fake_openai() as fake,
        run_gateway(runners=[gpt(fake)]) as gw,
        gw.connect("cancel", after=0) as client,
    ):
        ack, _ = await start(client, "slow one", "m1", runner="gpt")
        await expect(client, "message.delta", run_id=ack["run_id"])
        await client.send({"type": "cancel"})
        ended = await expect(client, "run.ended", run_id=ack["run_id"])
        assert ended["status"] == "cancelled"
        await asyncio.wait_for(fake.disconnected.wait(), TIMEOUT)  # the server saw it go


@pytest.mark.parametrize(
    ("text", "code", "retryable", "message"),
    [
        ("429", "upstream_rate_limited", True, "HTTP 429: fake error 429 (retry after 2 s)"),
        ("500", "upstream_error", True, "HTTP 500: fake error 500"),
        ("401", "upstream_unauthorized", False, "HTTP 401: fake error 401"),
        ("400", "upstream_error", False, "HTTP 400: fake error 400"),
        ("break", "upstream_stream_broken", True, "RemoteProtocolError"),
        ("garbage", "upstream_protocol", False, "a chunk is not JSON"),
    ],
)
async def test_errors_fail_the_run_with_honest_retryable_flags(
    text: str, code: str, retryable: bool, message: str
) -> None:
    async with (
        fake_openai() as fake,
        run_gateway(runners=[gpt(fake)]) as gw,
        gw.connect("err", after=0) as client,
    ):
        ack, _ = await start(client, text, "m1", runner="gpt")
        ended = await expect(client, "run.ended", run_id=ack["run_id"])
        assert (ended["status"], ended["reason"]) == ("failed", code)
        assert ended["error"]["retryable"] is retryable
        assert message in ended["error"]["message"]
        if text == "break":  # what streamed before the break was delivered
            assert deltas(client, ack["run_id"]) == ["you", " said:"]


async def test_an_unreachable_server_is_a_retryable_failure() -> None:
    sock = free_socket()  # bound and listening, never accepting: then closed, so refused
    port = sock.getsockname()[1]
    sock.close()
    runner = OpenAIRunner("gpt", base_url=f"http://127.0.0.1:{port}/v1", model="m")
    async with run_gateway(runners=[runner]) as gw, gw.connect("down", after=0) as client:
        ack, _ = await start(client, "hi", "m1", runner="gpt")
        ended = await expect(client, "run.ended", run_id=ack["run_id"])
        assert ended["error"]["code"] == "upstream_unreachable"
        assert ended["error"]["retryable"] is True


def test_configuration_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "STEERWAY_RUNNERS__LOCAL__USE": "openai",
        "STEERWAY_RUNNERS__LOCAL__BASE_URL": "http://127.0.0.1:11434/v1",
        "STEERWAY_RUNNERS__LOCAL__MODEL": "llama3",
        "STEERWAY_RUNNERS__LOCAL__TIMEOUT_S": "5",
        "STEERWAY_RUNNERS__LOCAL__API_KEY_ENV": "MY_KEY",
    }
    monkeypatch.setenv("MY_KEY", "sk-from-env")
    runner = make_runner("openai", "local", load_options(None, env)["local"])
    assert isinstance(runner, OpenAIRunner)
    assert (runner.name, runner.options.model, runner.options.timeout_s) == ("local", "llama3", 5.0)
    assert runner._headers() == {"Authorization": "Bearer sk-from-env"}
    with pytest.raises(ValueError, match="model"):
        make_runner("openai", "x", load_options(None, {"STEERWAY_RUNNERS__X__USE": "openai"})["x"])
    with pytest.raises(ValueError, match="modle"):
        OpenAIRunner(model="m", modle="typo")
