"""Every frame on the wire, as pydantic models: the only place frames are parsed and built.

Client frames (PROTOCOL.md section 3) are parsed by `parse_client_frame`; server
frames and conversation events (sections 2-4) are built from these models and
encoded once with orjson by `encode`.  Runner results (section 10) are validated
here too, by `validate_result_data`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

from gateway.errors import FrameError
from gateway.protocol.codes import ErrorCode

PROTOCOL_VERSION = 1
MAX_TEXT_CHARS = 32_768
MAX_METADATA_BYTES = 16 * 1024
MAX_STATE_VALUE_BYTES = 256 * 1024


@dataclass(frozen=True, slots=True)
class FrameLimits:
    """The configurable limits of a client `message` (PROTOCOL.md sections 3 and 7)."""

    text_chars: int = MAX_TEXT_CHARS
    metadata_bytes: int = MAX_METADATA_BYTES


PROTOCOL_LIMITS = FrameLimits()

CONVERSATION_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_ID_CHARS = r"^[A-Za-z0-9._:-]+$"

ClientMsgId = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=_ID_CHARS)]
RunnerName = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=_ID_CHARS)]
Mode = Literal["auto", "steer", "queue", "interrupt"]
Route = Literal["run", "steer", "queue", "interrupt"]


def is_conversation_id(value: str) -> bool:
    """Section 1: 1-128 chars of [A-Za-z0-9._:-], starting with a letter or digit."""
    return CONVERSATION_ID_RE.fullmatch(value) is not None


class Strict(BaseModel):
    """Strict types, no unknown fields: a frame either matches exactly or is refused."""

    model_config = ConfigDict(extra="forbid", strict=True)

    # Optional fields that are left out of the encoding when None ("metadata (only when given)").
    omit_none: ClassVar[tuple[str, ...]] = ()

    def wire(self) -> dict[str, Any]:
        """The frame as the JSON object that goes on the wire."""
        obj = self.model_dump(mode="json")
        for name in self.omit_none:
            if obj[name] is None:
                del obj[name]
        return obj


# --------------------------------------------------------------------------- client frames


def _limits(info: ValidationInfo) -> FrameLimits:
    context = info.context
    return context if isinstance(context, FrameLimits) else PROTOCOL_LIMITS


class MessageFrame(Strict):
    type: Literal["message"]
    client_msg_id: ClientMsgId
    text: Annotated[str, StringConstraints(min_length=1)]
    mode: Mode = "auto"
    metadata: dict[str, Any] | None = None
    runner: RunnerName | None = None

    @field_validator("text")
    @classmethod
    def _text_length(cls, value: str, info: ValidationInfo) -> str:
        limit = _limits(info).text_chars
        if len(value) > limit:
            raise PydanticCustomError(
                "text_too_long", "text over {limit} characters", {"limit": limit}
            )
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata_size(
        cls, value: dict[str, Any] | None, info: ValidationInfo
    ) -> dict[str, Any] | None:
        if value is None:
            return None
        # Encoded one level down, as in the `user.message` that will carry it: JSON
        # nested too deep for the encoder is refused here, not when the event is built.
        size = len(_dumps_checked([value])) - 2
        limit = _limits(info).metadata_bytes
        if size > limit:
            raise ValueError(f"metadata over {limit} bytes as compact JSON")
        return value


class CancelFrame(Strict):
    type: Literal["cancel"]
    run_id: Annotated[str, StringConstraints(max_length=64)] | None = None


class PingFrame(Strict):
    type: Literal["ping"]
    nonce: Annotated[str, StringConstraints(max_length=128)] | None = None


PresenceState = Literal["watching", "typing"]


class PresenceInput(Strict):
    """What the client is doing: typing (sent again every few seconds while it lasts),
    or watching again. Never stored; told to the conversation's other clients."""

    type: Literal["presence"]
    state: PresenceState


AnyClientFrame = MessageFrame | CancelFrame | PingFrame | PresenceInput
ClientFrame = Annotated[AnyClientFrame, Discriminator("type")]
_client_frame: TypeAdapter[AnyClientFrame] = TypeAdapter(ClientFrame)


def _dumps_checked(value: object) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError as exc:  # e.g. an integer beyond 64 bits
        raise ValueError(f"not encodable as JSON: {exc}") from exc


def _frame_error(exc: ValidationError, client_msg_id: str | None) -> FrameError:
    errors = exc.errors(include_url=False, include_context=False, include_input=False)
    for err in errors:
        if err["type"] == "text_too_long":
            return FrameError(err["msg"], code=ErrorCode.TEXT_TOO_LONG, client_msg_id=client_msg_id)
    first = errors[0]
    where = ".".join(str(part) for part in first["loc"][1:]) or "frame"
    return FrameError(f"{where}: {first['msg']}", client_msg_id=client_msg_id)


def _valid_msg_id(obj: dict[str, Any]) -> str | None:
    value = obj.get("client_msg_id")
    # fullmatch: `$` in re.match would accept a trailing newline ("m1\n")
    if isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9._:-]{1,64}", value):
        return value
    return None


def parse_client_frame(raw: str | bytes, limits: FrameLimits = PROTOCOL_LIMITS) -> AnyClientFrame:
    """Parse one WebSocket text frame; raise FrameError with the code section 3 gives."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise FrameError("the frame is not valid JSON", code=ErrorCode.INVALID_JSON) from None
    return validate_client_frame(obj, limits)


def validate_client_frame(obj: object, limits: FrameLimits = PROTOCOL_LIMITS) -> AnyClientFrame:
    """Validate an already decoded JSON value as a client frame."""
    if not isinstance(obj, dict):
        raise FrameError("a frame must be a JSON object")
    msg_id = _valid_msg_id(obj)
    kind = obj.get("type")
    if kind not in ("message", "cancel", "ping", "presence"):
        raise FrameError(f"unknown frame type {str(kind)[:64]!r}", client_msg_id=msg_id)
    try:
        return _client_frame.validate_python(obj, context=limits)
    except ValidationError as exc:
        raise _frame_error(exc, msg_id) from None


# --------------------------------------------------------------------------- server frames


class RunSummary(Strict):
    run_id: str
    status: str
    runner: str


class Ready(Strict):
    type: Literal["ready"] = "ready"
    protocol: int = PROTOCOL_VERSION
    conversation_id: str
    session_id: str
    head: int
    active_run: RunSummary | None
    queued_runs: int


class Ack(Strict):
    type: Literal["ack"] = "ack"
    client_msg_id: str
    offset: int
    message_id: str
    route: Route
    run_id: str
    duplicate: bool = False


class ErrorFrame(Strict):
    omit_none = ("client_msg_id",)
    type: Literal["error"] = "error"
    code: ErrorCode
    message: str
    client_msg_id: str | None = None


class Pong(Strict):
    type: Literal["pong"] = "pong"
    nonce: str | None


# --------------------------------------------------------------------------- events (section 4)


class Event(Strict):
    """Fields every event carries; `offset` and `ts` are set by the event log."""

    omit_none: ClassVar[tuple[str, ...]] = ("run_id",)

    type: str
    offset: int = 0
    ts: int = 0
    conversation_id: str
    run_id: str | None = None


class UserMessage(Event):
    omit_none = ("run_id", "metadata")
    type: Literal["user.message"] = "user.message"
    message_id: str
    client_msg_id: str
    text: str
    route: Route
    author: str
    metadata: dict[str, Any] | None = None


class RunQueued(Event):
    type: Literal["run.queued"] = "run.queued"
    runner: str
    trigger_message_ids: list[str]
    position: int


class QueuePosition(Strict):
    run_id: str
    position: int  # 1 = next to start


class QueueUpdated(Event):
    """The queue moved other than by a run joining its end (issue 11): every run still
    queued, in order. It concerns several runs, so it has no `run_id` of its own."""

    type: Literal["queue.updated"] = "queue.updated"
    runs: list[QueuePosition]


class RunStarted(Event):
    type: Literal["run.started"] = "run.started"
    runner: str
    trigger_message_ids: list[str]


class MessageDelta(Event):
    type: Literal["message.delta"] = "message.delta"
    message_id: str
    delta: str


class AssistantMessage(Strict):
    role: Literal["assistant"] = "assistant"
    content: str


class MessageCompleted(Event):
    type: Literal["message.completed"] = "message.completed"
    message_id: str
    message: AssistantMessage


class ToolCallStarted(Event):
    type: Literal["tool.call.started"] = "tool.call.started"
    tool_call_id: str
    name: str
    arguments: Any


class ToolCallCompleted(Event):
    type: Literal["tool.call.completed"] = "tool.call.completed"
    tool_call_id: str
    name: str
    result: Any = None
    error: Any = None

    def wire(self) -> dict[str, Any]:
        # `result` | `error`: exactly one of the two is on the wire.
        obj = super().wire()
        del obj["result" if self.error is not None else "error"]
        return obj


Scope = Literal["conversation", "actor", "runner"]


class StateUpdated(Event):
    type: Literal["state.updated"] = "state.updated"
    scope: Scope
    key: str
    value: Any


class SteeringAbsorbed(Event):
    type: Literal["steering.absorbed"] = "steering.absorbed"
    message_ids: list[str]


class SteeringDropped(Event):
    type: Literal["steering.dropped"] = "steering.dropped"
    message_ids: list[str]
    reason: Literal["run_ended", "cancelled"]


class RunError(Strict):
    code: str
    message: str
    retryable: bool


EndStatus = Literal["completed", "failed", "cancelled", "timeout"]


class RunEnded(Event):
    omit_none = ("run_id", "error")
    type: Literal["run.ended"] = "run.ended"
    status: EndStatus
    reason: str
    error: RunError | None = None
    usage: dict[str, Any] | None = None


class CoalescedDelta(MessageDelta):
    """Consecutive deltas of one message merged for a lagging client (section 6)."""

    first_offset: int


_DELTA_PREFIX = '{"type":"message.delta",'


def delta_of(text: str) -> MessageDelta | None:
    """The delta of a stored or relayed event's text, for merging (section 6); None for
    any other event. `encode` puts `type` first, so other events are not parsed."""
    if not text.startswith(_DELTA_PREFIX):
        return None
    return MessageDelta.model_validate_json(text)


def coalesce(first: MessageDelta, parts: list[MessageDelta]) -> CoalescedDelta:
    """Merge `parts` (ascending, one message_id): the last one's offset and ts, the first's
    offset as `first_offset` (or `first.first_offset` when it is already merged)."""
    last = parts[-1]
    return CoalescedDelta(
        offset=last.offset,
        ts=last.ts,
        conversation_id=last.conversation_id,
        run_id=last.run_id,
        message_id=last.message_id,
        delta="".join(p.delta for p in parts),
        first_offset=first.first_offset if isinstance(first, CoalescedDelta) else first.offset,
    )


# --------------------------------------------------------------------------- dashboard (section 9)


class ConversationListing(Strict):
    """A conversation as listed by REST (section 8) and the dashboard."""

    conversation_id: str
    head: int
    last_activity: int
    active_run: RunSummary | None


class NodeInfo(Strict):
    name: str  # the node's name, as written on the runs it owns
    protocol: int = PROTOCOL_VERSION
    started_at: int
    conversations: int  # conversations this node has loaded now
    runs: int = 0  # of them, those running a run now
    clients: int = 0  # conversation sockets open on this node
    events_per_s: float = 0.0  # events this node appended, per second, lately


class Person(Strict):
    """A client in the dashboard's `presence` lists: a Presence frame's fields."""

    session_id: str
    user: str
    client: str
    state: Literal["watching", "typing"]
    steering: bool


class Snapshot(Strict):
    type: Literal["snapshot"] = "snapshot"
    runs: list[dict[str, Any]]
    conversations: list[ConversationListing]
    clients: dict[str, int]
    node: NodeInfo  # the node serving this dashboard
    nodes: list[NodeInfo]  # every live node (a cluster), by name; this node alone otherwise
    presence: dict[str, list[Person]] = Field(default_factory=dict)  # conversation -> people


class NodesUpdated(Strict):
    type: Literal["nodes.updated"] = "nodes.updated"
    nodes: list[NodeInfo]


class RunUpdated(Strict):
    type: Literal["run.updated"] = "run.updated"
    run: dict[str, Any]


class ConversationUpdated(Strict):
    type: Literal["conversation.updated"] = "conversation.updated"
    conversation: ConversationListing


class Presence(Strict):
    """One client of a conversation, as its other clients and the dashboards see it: an
    ephemeral frame (no offset, never stored)."""

    type: Literal["presence"] = "presence"
    conversation_id: str
    session_id: str
    user: str  # the token's `sub`, or "anonymous"
    client: str  # the `client` label the connection gave, possibly empty
    state: Literal["watching", "typing", "gone"]
    steering: bool = False


class PresenceUpdated(Strict):
    type: Literal["presence.updated"] = "presence.updated"
    conversation_id: str
    people: list[Person]


class ClientsUpdated(Strict):
    type: Literal["clients.updated"] = "clients.updated"
    conversation_id: str
    count: int


def encode(frame: Strict) -> bytes:
    """Encode a frame once: these bytes (as text) are what every client is sent."""
    return orjson.dumps(frame.wire())


# --------------------------------------------------------------------------- runner results


class DeltaData(Strict):
    chunk: str


class CompletedData(Strict):
    message: AssistantMessage


class ToolStartedData(Strict):
    tool_call_id: str
    name: str
    arguments: Any = None


class ToolCompletedData(Strict):
    tool_call_id: str
    name: str
    result: Any = None
    error: Any = None


class StateData(Strict):
    scope: Scope
    key: str
    value: Any

    @field_validator("value")
    @classmethod
    def _value_size(cls, value: Any) -> Any:
        if len(_dumps_checked(value)) > MAX_STATE_VALUE_BYTES:
            raise ValueError(f"state value over {MAX_STATE_VALUE_BYTES} bytes")
        return value


class RunCompletedData(Strict):
    finish_reason: str
    message: AssistantMessage | None = None


class RunFailedData(Strict):
    error: str
    code: str
    retryable: bool


ResultData = (
    DeltaData
    | CompletedData
    | ToolStartedData
    | ToolCompletedData
    | StateData
    | RunCompletedData
    | RunFailedData
)

RESULT_SCHEMAS: dict[str, type[Strict]] = {
    "message.delta": DeltaData,
    "message.completed": CompletedData,
    "tool.call.started": ToolStartedData,
    "tool.call.completed": ToolCompletedData,
    "state.updated": StateData,
    "run.completed": RunCompletedData,
    "run.failed": RunFailedData,
}


def validate_result_data(kind: str, data: object) -> ResultData:
    """Validate the `data` of a runner result of a known type (raises ValidationError)."""
    return RESULT_SCHEMAS[kind].model_validate(data)  # type: ignore[return-value]


# --------------------------------------------------------------------------- runner socket
# `/ws/runners` (section 10): what a remote runner sends, and what the gateway sends it.

RunId = Annotated[str, StringConstraints(min_length=1, max_length=64)]
RequestId = Annotated[str, StringConstraints(min_length=1, max_length=64)]
MAX_RUNNER_CONCURRENCY = 1000
MAX_RUNNER_FRAME_BYTES = 2 * 1024 * 1024  # a frame from a runner; closed 1009 beyond


class HelloFrame(Strict):
    type: Literal["hello"]
    runner: RunnerName
    supports_steering: bool = True
    max_concurrency: Annotated[int, Field(ge=1, le=MAX_RUNNER_CONCURRENCY)] = 1


class ResultFrame(Strict):
    type: Literal["result"]
    run_id: RunId
    result: Any  # checked by the result rules (gateway.core.results), as any runner's result


class SteeringPullFrame(Strict):
    type: Literal["steering.pull"]
    run_id: RunId
    request_id: RequestId
    mode: Literal["all", "one"] = "all"
    limit: Annotated[int, Field(ge=1, le=100)] = 100


RunnerFrame = HelloFrame | ResultFrame | SteeringPullFrame
_runner_frame: TypeAdapter[RunnerFrame] = TypeAdapter(Annotated[RunnerFrame, Discriminator("type")])


class RunnerReady(Strict):
    """The answer to a valid `hello`: from now on the runner may be assigned runs."""

    type: Literal["ready"] = "ready"
    protocol: int = PROTOCOL_VERSION
    runner: str
    session_id: str


class TranscriptItem(Strict):
    message_id: str
    role: Literal["user", "assistant"]
    content: str
    run_id: str
    ts: int


class SteeringItem(Strict):
    message_id: str
    text: str
    author: str
    ts: int


class RunAssign(Strict):
    omit_none = ("traceparent",)
    type: Literal["run.assign"] = "run.assign"
    run_id: str
    conversation_id: str
    trigger_message_ids: list[str]
    messages: list[TranscriptItem]
    deadline_ms: int
    traceparent: str | None = None  # the run's trace (W3C), when the gateway traces runs


class SteeringBatch(Strict):
    type: Literal["steering.batch"] = "steering.batch"
    request_id: str
    messages: list[SteeringItem]


class RunCancel(Strict):
    type: Literal["run.cancel"] = "run.cancel"
    run_id: str


class RunnerErrorFrame(Strict):
    omit_none = ("run_id", "request_id")
    type: Literal["error"] = "error"
    code: ErrorCode
    message: str
    run_id: str | None = None
    request_id: str | None = None


GatewayFrame = RunnerReady | RunAssign | SteeringBatch | RunCancel | RunnerErrorFrame
_gateway_frame: TypeAdapter[GatewayFrame] = TypeAdapter(
    Annotated[GatewayFrame, Discriminator("type")]
)


def result_frame(run_id: str, result: Mapping[str, Any]) -> bytes:
    """A runner's `result` frame, built without a model: the runner client's hot path."""
    return orjson.dumps({"type": "result", "run_id": run_id, "result": result})


def parse_runner_frame(raw: str | bytes) -> RunnerFrame:
    """Parse a frame a remote runner sent; raise FrameError (invalid_json, invalid_frame)."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise FrameError("the frame is not valid JSON", code=ErrorCode.INVALID_JSON) from None
    if not isinstance(obj, dict):
        raise FrameError("a frame must be a JSON object")
    kind = obj.get("type")
    if kind == "result" and len(obj) == 3 and "result" in obj:
        run_id = obj.get("run_id")
        if isinstance(run_id, str) and 0 < len(run_id) <= 64:
            # The hot path, a third of a remote result's cost otherwise: exactly what the
            # model checks (its three fields, `result` any JSON), without pydantic.
            return ResultFrame.model_construct(type="result", run_id=run_id, result=obj["result"])
    if kind not in ("hello", "result", "steering.pull"):
        raise FrameError(f"unknown frame type {str(kind)[:64]!r}")
    try:
        return _runner_frame.validate_python(obj)
    except ValidationError as exc:
        raise _frame_error(exc, None) from None


def parse_gateway_frame(raw: str | bytes) -> GatewayFrame:
    """Parse a frame the gateway sent to a runner (the runner client's side)."""
    try:
        return _gateway_frame.validate_json(raw, strict=False)
    except ValidationError as exc:
        raise _frame_error(exc, None) from None


def result_size(result: object) -> int:
    """Bytes of a runner result's JSON encoding (section 10: over 1 MiB is truncated);
    -1 when it is not JSON (an object in an `Any` field, an integer beyond 64 bits, a
    lone surrogate, a key that is not a string): no event could carry it to a client."""
    try:
        return len(orjson.dumps(result, default=_model_default))
    except TypeError:
        return -1


def _model_default(value: object) -> object:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    raise TypeError


# --------------------------------------------------------------------------- node to node (cluster)


class NodeRequest(Strict):
    """A message, cancel or question forwarded to the node that runs a conversation; or
    (`place`) a run of it asking for a remote runner connected to another node."""

    kind: Literal["submit", "cancel", "describe", "place"]
    id: int
    reply_to: str  # the asking node
    conversation_id: str
    frame: MessageFrame | None = None  # submit
    author: str = "anonymous"
    run_id: str | None = None  # cancel, place
    runner: RunnerName | None = None  # place


class NodeReply(Strict):
    kind: Literal["reply"] = "reply"
    id: int
    moved: bool = False  # the node no longer runs the conversation: ask again
    ack: Ack | None = None
    error: ErrorFrame | None = None
    published: int = 0  # describe
    active_run: RunSummary | None = None
    queued_runs: int = 0
    placed: bool = False  # place: a runner of the node took the run


# A run placed on a remote runner connected to another node (gateway.cluster.runners):
# what passes between the run's owner node and the runner's node. Each direction of a
# run is numbered from 1; a gap (a message the bus dropped) fails the run.


class RunToRunner(Strict):
    """Owner node -> runner node: a frame for the runner, and flow control."""

    kind: Literal["run.to"] = "run.to"
    run_id: RunId
    node: str  # the sender
    seq: int
    frame: Annotated[RunAssign | SteeringBatch | RunCancel, Discriminator("type")] | None = None
    taken: int = 0  # results and pulls the owner's run has taken so far


class RunFromRunner(Strict):
    """Runner node -> owner node: the runner's results in order, or a steering pull, or
    the news that it went away."""

    kind: Literal["run.from"] = "run.from"
    run_id: RunId
    node: str
    seq: int
    results: list[Any] = []
    pull: SteeringPullFrame | None = None
    lost: bool = False


NodeFrameType = NodeRequest | NodeReply | RunToRunner | RunFromRunner
NodeFrame = Annotated[NodeFrameType, Field(discriminator="kind")]
_node_frame: TypeAdapter[NodeFrameType] = TypeAdapter(NodeFrame)


def parse_node_frame(raw: bytes, limits: FrameLimits) -> NodeFrameType:
    """A frame from another node; its message is validated under this node's limits."""
    return _node_frame.validate_json(raw, context=limits)
