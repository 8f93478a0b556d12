"""OpenTelemetry traces of runs, when `opentelemetry-sdk` is installed and asked for.

Every run is a trace: a span `steerway.run` from the message that triggered it to its
`run.ended`, with child spans `steerway.store.commit` (each stored batch of the run
that holds more than text deltas), `steerway.runner.turn` (from `run.started`, a new
one after each absorbed steering), `steerway.steering` (each steering message, from
its `user.message` to its `steering.absorbed` or `steering.dropped`) and
`steerway.tool` (each tool call). Every span carries `steerway.conversation_id`,
`steerway.run_id` and `steerway.node`. The run span's context goes to the runner as
a W3C `traceparent` (RunContext.traceparent): in `run.assign` to remote runners, as
an HTTP header to the `openai` and `agui` runners.

Spans are made from the events the event log appends (`RunTraces.observe`), not from
calls spread over the code: one `if RUNS is not None` on the append path is all that
tracing costs while it is off, and nothing imports opentelemetry then.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway.protocol.frames import (
    Event,
    MessageDelta,
    RunEnded,
    RunStarted,
    SteeringAbsorbed,
    SteeringDropped,
    ToolCallCompleted,
    ToolCallStarted,
    UserMessage,
)

if TYPE_CHECKING:  # only for the checker: the package is optional
    from opentelemetry.sdk.trace import SpanProcessor
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span

log = logging.getLogger("steerway.tracing")

NEW_RUN_ROUTES = ("run", "queue", "interrupt")  # a user.message that makes a new run
MAX_RUNS = 10_000  # open run traces kept; beyond, the oldest are ended (a leak bound)


def available() -> bool:
    """Whether opentelemetry-sdk can be imported (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("opentelemetry.sdk") is not None


@dataclass(slots=True)
class _Run:
    span: Span
    turn: Span | None = None
    tools: dict[str, Span] = field(default_factory=dict)
    steering: dict[str, Span] = field(default_factory=dict)


class RunTraces:
    """The open spans of the runs of this node."""

    def __init__(self, processor: SpanProcessor, node: str) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = TracerProvider(resource=Resource.create({"service.name": "steerway"}))
        self.provider.add_span_processor(processor)
        self.tracer = self.provider.get_tracer("steerway")
        self.node = node
        self._propagator = TraceContextTextMapPropagator()
        self._runs: dict[str, _Run] = {}

    def shutdown(self) -> None:
        for run_id in list(self._runs):
            self._end(run_id, None, None)
        self.provider.shutdown()

    def _attributes(self, cid: str, run_id: str) -> dict[str, Any]:
        return {
            "steerway.conversation_id": cid,
            "steerway.run_id": run_id,
            "steerway.node": self.node,
        }

    def _child(self, run: _Run, name: str, cid: str, run_id: str, start_ns: int) -> Span:
        from opentelemetry import trace

        context = trace.set_span_in_context(run.span)
        return self.tracer.start_span(
            name, context=context, attributes=self._attributes(cid, run_id), start_time=start_ns
        )

    def traceparent(self, run_id: str) -> str | None:
        """The W3C traceparent of a run's span, for the runner; None when not traced."""
        run = self._runs.get(run_id)
        if run is None:
            return None
        from opentelemetry import trace

        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=trace.set_span_in_context(run.span))
        return carrier.get("traceparent")

    def observe(self, cid: str, events: list[Event]) -> list[Span]:
        """Open and close spans for a batch the event log appends; returns the commit
        spans of the batch (ended by `stored` once it is written)."""
        from opentelemetry import trace

        commits: dict[str, Span] = {}
        for event in events:
            run_id = event.run_id
            if run_id is None:
                continue
            ns = event.ts * 1_000_000
            if isinstance(event, UserMessage):
                self._user_message(cid, event, ns)
            run = self._runs.get(run_id)
            if run is None:
                continue
            if not isinstance(event, MessageDelta) and run_id not in commits:
                commits[run_id] = self._child(run, "steerway.store.commit", cid, run_id, ns)
            if isinstance(event, RunStarted):
                run.span.set_attribute("steerway.runner", event.runner)
                run.turn = self._child(run, "steerway.runner.turn", cid, run_id, ns)
            elif isinstance(event, ToolCallStarted):
                span = self._child(run, "steerway.tool", cid, run_id, ns)
                span.set_attribute("steerway.tool.name", event.name)
                span.set_attribute("steerway.tool.call_id", event.tool_call_id)
                run.tools[event.tool_call_id] = span
            elif isinstance(event, ToolCallCompleted):
                tool = run.tools.get(event.tool_call_id)
                if tool is not None:
                    del run.tools[event.tool_call_id]
                    if event.error is not None:
                        tool.set_status(trace.StatusCode.ERROR, str(event.error)[:200])
                    tool.end(ns)
            elif isinstance(event, SteeringAbsorbed | SteeringDropped):
                outcome = "absorbed" if isinstance(event, SteeringAbsorbed) else "dropped"
                for message_id in event.message_ids:
                    waiting = run.steering.get(message_id)
                    if waiting is not None:
                        del run.steering[message_id]
                        waiting.set_attribute("steerway.steering.outcome", outcome)
                        waiting.end(ns)
                if isinstance(event, SteeringAbsorbed) and run.turn is not None:
                    run.turn.end(ns)  # the runner goes on with a new turn
                    run.turn = self._child(run, "steerway.runner.turn", cid, run_id, ns)
            elif isinstance(event, RunEnded):
                self._end(run_id, event, ns)
        return list(commits.values())

    def _user_message(self, cid: str, event: UserMessage, ns: int) -> None:
        run_id = event.run_id
        assert run_id is not None
        if event.route in NEW_RUN_ROUTES and run_id not in self._runs:
            if len(self._runs) >= MAX_RUNS:
                self._end(next(iter(self._runs)), None, None)
            span = self.tracer.start_span(
                "steerway.run", attributes=self._attributes(cid, run_id), start_time=ns
            )
            span.set_attribute("steerway.trigger_message_id", event.message_id)
            self._runs[run_id] = _Run(span)
        elif event.route == "steer":
            run = self._runs.get(run_id)
            if run is not None:
                span = self._child(run, "steerway.steering", cid, run_id, ns)
                span.set_attribute("steerway.message_id", event.message_id)
                run.steering[event.message_id] = span

    def _end(self, run_id: str, event: RunEnded | None, ns: int | None) -> None:
        from opentelemetry import trace

        run = self._runs.pop(run_id, None)
        if run is None:
            return
        for span in [*run.tools.values(), *run.steering.values()]:
            span.end(ns)
        if run.turn is not None:
            run.turn.end(ns)
        if event is not None:
            run.span.set_attribute("steerway.status", event.status)
            run.span.set_attribute("steerway.reason", event.reason)
            if event.status != "completed":
                run.span.set_status(trace.StatusCode.ERROR, f"{event.status}: {event.reason}")
        run.span.end(ns)


def stored(spans: list[Span], error: BaseException | None) -> None:
    """A batch's store commit spans end: it was written, or refused with `error`."""
    from opentelemetry import trace

    for span in spans:
        if error is not None:
            span.set_status(trace.StatusCode.ERROR, str(error)[:200])
        span.end()


# The runs' traces of this process: None (the default) while tracing is off.
RUNS: RunTraces | None = None


def enable(node: str, endpoint: str = "", exporter: SpanExporter | None = None) -> RunTraces:
    """Trace runs from now on: to `exporter` as each span ends (tests), else in batches
    to the OTLP/HTTP collector at `endpoint`."""
    global RUNS
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    if exporter is not None:
        processor: SpanProcessor = SimpleSpanProcessor(exporter)
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint))
    RUNS = RunTraces(processor, node)
    log.info("tracing runs to %s", endpoint or type(exporter).__name__)
    return RUNS


def disable() -> None:
    """Flush and stop tracing."""
    global RUNS
    runs, RUNS = RUNS, None
    if runs is not None:
        runs.shutdown()
