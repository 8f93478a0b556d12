"""The `agui` runner (issue 14, item 3) against a local AG-UI agent server built with the
`ag-ui-protocol` encoder (tests.fake_agui), through a real gateway."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from gateway.agui.runner import AguiRunner
from gateway.runners.options import load_options
from gateway.runners.registry import build_registry
from tests.conftest import Client, run_gateway
from tests.fake_agui import FakeAgent, fake_agui, texts
from tests.helpers import expect
from tests.test_runs_ws import run_events, start


def agent(fake: FakeAgent, **options: Any) -> AguiRunner:
    return AguiRunner("ag", url=fake.url, headers={"Authorization": "Bearer t"}, **options)


def deltas(client: Client, run_id: str) -> list[str]:
    return [f["delta"] for f in run_events(client, run_id) if f["type"] == "message.delta"]


async def test_streams_text_with_the_transcript_as_messages() -> None:
    async with (
        fake_agui() as fake,
        run_gateway(runners=[agent(fake)]) as gw,
        gw.connect("ag1", after=0) as client,
    ):
        ack, _ = await start(client, "hello world", "m1", runner="ag")
        ended = await expect(client, "run.ended", run_id=ack["run_id"])
        assert (ended["status"], ended["reason"]) == ("completed", "stop")
        assert deltas(client, ack["run_id"]) == ["you", " said:", " hello", " world"]
        done = await expect(client, "message.completed", run_id=ack["run_id"])
        assert done["message"]["content"] == "you said: hello world"
        (request,) = fake.requests
        assert request.thread_id == "ag1"
        assert fake.headers[0]["authorization"] == "Bearer t"
        ack2, _ = await start(client, "again", "m2")
        await expect(client, "run.ended", run_id=ack2["run_id"], status="completed")
        assert texts(fake.requests)[1] == [
            ("user", "hello world"),
            ("assistant", "you said: hello world"),
            ("user", "again"),
        ]


async def test_a_tool_call_and_state_become_results() -> None:
    async with (
        fake_agui() as fake,
        run_gateway(runners=[agent(fake)]) as gw,
        gw.connect("ag2", after=0) as client,
    ):
        ack, _ = await start(client, "tool", "m1", runner="ag")
        await expect(client, "run.ended", run_id=ack["run_id"], status="completed")
        ack2, _ = await start(client, "state", "m2")
        await expect(client, "run.ended", run_id=ack2["run_id"], status="completed")
    call = await expect(client, "tool.call.started")
    assert (call["tool_call_id"], call["name"], call["arguments"]) == (
        "c1",
        "add",
        {"a": 1, "b": 2},
    )
    result = await expect(client, "tool.call.completed")
    assert (result["name"], result["result"]) == ("add", 3)
    states = [
        f["value"] for f in run_events(client, ack2["run_id"]) if f["type"] == "state.updated"
    ]
    assert states == [{"count": 1, "items": []}, {"count": 2, "items": ["x"]}]
    # the next request starts from the state the agent last reported
    assert fake.requests[1].state == {}


@pytest.mark.parametrize(
    ("text", "code", "retryable"),
    [
        ("error", "agent_down", False),
        ("break", "upstream_stream_broken", True),
        ("disorder", "agent_protocol", False),
        ("500", "upstream_error", True),
    ],
)
async def test_agent_failures_fail_the_run_and_keep_what_was_stored(
    text: str, code: str, retryable: bool
) -> None:
    async with (
        fake_agui() as fake,
        run_gateway(runners=[agent(fake)]) as gw,
        gw.connect("ag3", after=0) as client,
    ):
        ack, _ = await start(client, text, "m1", runner="ag")
        ended = await expect(client, "run.ended", run_id=ack["run_id"])
        assert ended["status"] == "failed"
        assert (ended["error"]["code"], ended["error"]["retryable"]) == (code, retryable)
        assert ended["error"]["message"]
        # the gateway goes on: the next message runs
        ack2, _ = await start(client, "fine", "m2")
        await expect(client, "run.ended", run_id=ack2["run_id"], status="completed")


async def test_an_unknown_event_type_is_skipped() -> None:
    async with (
        fake_agui() as fake,
        run_gateway(runners=[agent(fake)]) as gw,
        gw.connect("ag4", after=0) as client,
    ):
        ack, _ = await start(client, "unknown", "m1", runner="ag")
        await expect(client, "run.ended", run_id=ack["run_id"], status="completed")
        assert "".join(deltas(client, ack["run_id"])) == "you said: unknown"


async def test_steering_is_absorbed_after_run_finished_and_sent_in_the_next_request() -> None:
    async with (
        fake_agui() as fake,
        run_gateway(runners=[agent(fake)]) as gw,
        gw.connect("ag5", after=0) as client,
    ):
        ack, _ = await start(client, "slow", "m1", runner="ag")
        await expect(client, "message.delta", run_id=ack["run_id"], delta="you")
        await client.message("turn left", "s1")
        steer = await expect(client, "ack", client_msg_id="s1")
        assert steer["route"] == "steer"
        fake.gate.set()
        absorbed = await expect(client, "steering.absorbed", run_id=ack["run_id"])
        assert absorbed["message_ids"] == [steer["message_id"]]
        await expect(client, "run.ended", run_id=ack["run_id"], status="completed")
        assert texts(fake.requests)[1][-2:] == [
            ("assistant", "you said: slow"),
            ("user", "turn left"),
        ]
        assert "".join(deltas(client, ack["run_id"])) == "you said: slowyou said: turn left"


async def test_steering_at_step_finished_ends_the_request_early() -> None:
    async with (
        fake_agui() as fake,
        run_gateway(runners=[agent(fake)]) as gw,
        gw.connect("ag6", after=0) as client,
    ):
        ack, _ = await start(client, "step", "m1", runner="ag")
        await client.message("go right", "s1")
        await expect(client, "ack", client_msg_id="s1")
        fake.gate.set()  # STEP_FINISHED: the runner pulls, leaves the stream, asks again
        await expect(client, "steering.absorbed", run_id=ack["run_id"])
        await expect(client, "run.ended", run_id=ack["run_id"], status="completed")
        assert texts(fake.requests)[1][-1] == ("user", "go right")
        # nothing the agent said after the step was taken from the first request
        assert "".join(deltas(client, ack["run_id"])) == "you said: go right"


async def test_a_slow_agent_is_cancelled_within_a_second() -> None:
    async with (
        fake_agui() as fake,
        run_gateway(runners=[agent(fake)]) as gw,
        gw.connect("ag7", after=0) as client,
    ):
        ack, _ = await start(client, "slow", "m1", runner="ag")
        await expect(client, "message.delta", run_id=ack["run_id"], delta="you")
        began = time.monotonic()
        await client.send({"type": "cancel"})
        ended = await expect(client, "run.ended", run_id=ack["run_id"])
        assert ended["status"] == "cancelled"
        await asyncio.wait_for(fake.disconnected.wait(), 1.0)  # the agent saw the disconnect
        assert time.monotonic() - began < 1.0


def test_agui_is_a_built_in_runner_configured_by_options(tmp_path: Any) -> None:
    config = tmp_path / "runners.toml"
    config.write_text(
        '[runners.lg]\nuse = "agui"\nurl = "http://agent/run"\ntimeout_s = 5\n'
        '[runners.lg.headers]\nAuthorization = "Bearer x"\n'
    )
    registry, _ = build_registry(1, options=load_options(config, environ={}))
    runner = registry.local("lg")
    assert isinstance(runner, AguiRunner)
    assert runner.options.url == "http://agent/run"
    assert runner.options.headers == {"Authorization": "Bearer x"}
    config.write_text('[runners.lg]\nuse = "agui"\n')
    options = load_options(config, environ={})
    with pytest.raises(ValueError, match="url"):
        build_registry(1, options=options)
