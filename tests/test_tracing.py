"""OpenTelemetry traces of runs (issue 15, item 2), with the SDK's in-memory exporter:
a span per run with its commits, turns, steering and tool calls as children, and the
run's traceparent handed to local, remote, openai and agui runners."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway import tracing
from gateway.agui.runner import AguiRunner
from gateway.config import Settings
from gateway.errors import ConfigError
from gateway.runners.openai import OpenAIRunner
from tests.conftest import run_gateway
from tests.fake_agui import fake_agui
from tests.fake_openai import fake_openai
from tests.helpers import PULL, TIMEOUT, Fed, completed, delta, expect, run_completed
from tests.remote import raw_runner, result


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tracing.enable("node-t", exporter=exporter)
    yield exporter
    tracing.disable()


def by_name(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def traceparent_of(span: ReadableSpan) -> str:
    ctx = span.get_span_context()
    assert ctx is not None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"


async def test_a_run_is_one_trace_with_its_commits_turns_steering_and_tools(
    spans: InMemorySpanExporter,
) -> None:
    fed = Fed()
    async with run_gateway(runners=[fed], runner="fed") as gw, gw.connect("tr", after=0) as ws:
        await ws.message("go", "m1")
        ack = await expect(ws, "ack", client_msg_id="m1")
        ctx = await asyncio.wait_for(fed.contexts.get(), TIMEOUT)
        fed.put(delta("a"), {"type": "tool.call.started", "data": {
            "tool_call_id": "t1", "name": "search", "arguments": {"q": "x"}}})  # fmt: skip
        await expect(ws, "tool.call.started")
        fed.put({"type": "tool.call.completed", "data": {
            "tool_call_id": "t1", "name": "search", "result": 1}})  # fmt: skip
        await ws.message("faster", "m2")
        await expect(ws, "ack", client_msg_id="m2", route="steer")
        fed.put(PULL, delta("b"), completed("ab"), run_completed())
        await expect(ws, "run.ended", run_id=ack["run_id"])
    (run,) = by_name(spans, "steerway.run")
    assert run.attributes is not None
    assert (
        dict(run.attributes).items()
        >= {
            "steerway.conversation_id": "tr",
            "steerway.run_id": ack["run_id"],
            "steerway.node": "node-t",
            "steerway.runner": "fed",
            "steerway.status": "completed",
        }.items()
    )
    assert ctx.traceparent == traceparent_of(run)  # the runner is told the run's trace
    run_ctx = run.get_span_context()
    assert run_ctx is not None
    children = [s for s in spans.get_finished_spans() if s is not run]
    names = sorted(s.name for s in children)
    assert names.count("steerway.runner.turn") == 2  # a new turn after the absorbed steering
    assert names.count("steerway.tool") == 1
    assert names.count("steerway.steering") == 1
    assert names.count("steerway.store.commit") >= 2
    for child in children:
        assert child.parent is not None
        assert child.parent.span_id == run_ctx.span_id
        assert child.context is not None
        assert child.context.trace_id == run_ctx.trace_id
        assert child.attributes is not None
        assert child.attributes["steerway.run_id"] == ack["run_id"]
    (steering,) = by_name(spans, "steerway.steering")
    assert steering.attributes is not None
    assert steering.attributes["steerway.steering.outcome"] == "absorbed"
    (tool,) = by_name(spans, "steerway.tool")
    assert tool.attributes is not None
    assert tool.attributes["steerway.tool.name"] == "search"


async def test_a_failed_run_s_span_is_an_error(spans: InMemorySpanExporter) -> None:
    fed = Fed()
    async with run_gateway(runners=[fed], runner="fed") as gw, gw.connect("tf", after=0) as ws:
        await ws.message("go", "m1")
        await asyncio.wait_for(fed.contexts.get(), TIMEOUT)
        fed.put(RuntimeError("boom"))
        await expect(ws, "run.ended", status="failed")
    (run,) = by_name(spans, "steerway.run")
    assert not run.status.is_ok


async def test_the_remote_runner_gets_the_traceparent_in_run_assign(
    spans: InMemorySpanExporter,
) -> None:
    async with run_gateway() as gw, raw_runner(gw) as far, gw.connect("trr", after=0) as ws:
        await ws.message("go", "m1", runner="far")
        assign = await far.expect("run.assign")
        await far.result(assign["run_id"], result("run.completed", finish_reason="stop"))
        await expect(ws, "run.ended")
    (run,) = by_name(spans, "steerway.run")
    assert assign["traceparent"] == traceparent_of(run)


async def test_openai_and_agui_runners_send_the_traceparent_header(
    spans: InMemorySpanExporter,
) -> None:
    async with fake_openai() as fake, fake_agui() as agent:
        gpt = OpenAIRunner("gpt", base_url=fake.base_url, model="m", api_key="k")
        ag = AguiRunner("ag", url=agent.url)
        async with (
            run_gateway(runners=[gpt, ag]) as gw,
            gw.connect("to", after=0) as one,
            gw.connect("ta", after=0) as two,
        ):
            await one.message("hello", "m1", runner="gpt")
            await expect(one, "run.ended", status="completed")
            await two.message("hello", "m1", runner="ag")
            await expect(two, "run.ended")
    runs = {s.attributes["steerway.conversation_id"]: s for s in by_name(spans, "steerway.run")}  # type: ignore[index]
    assert fake.requests[0]["traceparent"] == traceparent_of(runs["to"])
    assert agent.headers[0]["traceparent"] == traceparent_of(runs["ta"])


async def test_without_tracing_no_traceparent_and_no_opentelemetry_import() -> None:
    assert tracing.RUNS is None
    async with run_gateway() as gw, raw_runner(gw) as far, gw.connect("tn", after=0) as ws:
        await ws.message("go", "m1", runner="far")
        assign = await far.expect("run.assign")
        assert "traceparent" not in assign
        await far.result(assign["run_id"], result("run.completed", finish_reason="stop"))
        await expect(ws, "run.ended")
    # a gateway not asked to trace never loads the tracing SDK or an exporter (redis-py
    # loads opentelemetry's metrics by itself when they are installed: not ours)
    code = (
        "import sys, gateway.app, gateway.cli, gateway.eventlog;"
        "print([m for m in sys.modules if m.startswith("
        "('opentelemetry.sdk.trace', 'opentelemetry.exporter'))])"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(), TIMEOUT * 6)
    assert out.decode().strip() == "[]"


def test_the_otlp_endpoint_setting_is_checked() -> None:
    ok = Settings.load({"otlp_endpoint": "http://127.0.0.1:4318/v1/traces"}, environ={})
    assert ok.otlp_endpoint.endswith("/v1/traces")
    with pytest.raises(ConfigError) as bad:
        Settings.load(environ={"STEERWAY_OTLP_ENDPOINT": "grpc://collector:4317"})
    assert "STEERWAY_OTLP_ENDPOINT" in str(bad.value)
