"""Client frame parsing (PROTOCOL.md section 3) and the encoding of server frames and events
(sections 2-4): pure functions, no connection."""

from __future__ import annotations

import json
import re
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import FrameError
from gateway.protocol.codes import ErrorCode
from gateway.protocol.frames import (
    MAX_METADATA_BYTES,
    MAX_TEXT_CHARS,
    Ack,
    AssistantMessage,
    CancelFrame,
    CoalescedDelta,
    ErrorFrame,
    FrameLimits,
    MessageCompleted,
    MessageDelta,
    MessageFrame,
    PingFrame,
    Pong,
    Ready,
    RunEnded,
    RunError,
    RunSummary,
    ToolCallCompleted,
    UserMessage,
    coalesce,
    encode,
    is_conversation_id,
    parse_client_frame,
    validate_client_frame,
)

CLIENT_MSG_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def refused(raw: str | bytes) -> FrameError:
    with pytest.raises(FrameError) as info:
        parse_client_frame(raw)
    return info.value


def dumps(obj: object) -> bytes:
    return orjson.dumps(obj)


def message(**fields: Any) -> dict[str, Any]:
    return {"type": "message", "client_msg_id": "m1", "text": "hello", **fields}


# --------------------------------------------------------------------------- valid frames


def test_a_minimal_message() -> None:
    frame = parse_client_frame(dumps(message()))
    assert frame == MessageFrame(type="message", client_msg_id="m1", text="hello")
    assert isinstance(frame, MessageFrame)
    assert (frame.mode, frame.metadata, frame.runner) == ("auto", None, None)


def test_a_full_message() -> None:
    raw = message(mode="interrupt", metadata={"a": [1, {"b": None}]}, runner="echo.v2:x-1")
    frame = parse_client_frame(dumps(raw).decode())  # str frames too
    assert isinstance(frame, MessageFrame)
    assert frame.model_dump() == {
        "type": "message",
        "client_msg_id": "m1",
        "text": "hello",
        "mode": "interrupt",
        "metadata": {"a": [1, {"b": None}]},
        "runner": "echo.v2:x-1",
    }


@pytest.mark.parametrize("mode", ["auto", "steer", "queue", "interrupt"])
def test_every_mode(mode: str) -> None:
    frame = parse_client_frame(dumps(message(mode=mode)))
    assert isinstance(frame, MessageFrame)
    assert frame.mode == mode


def test_cancel_and_ping() -> None:
    assert parse_client_frame(b'{"type":"cancel"}') == CancelFrame(type="cancel", run_id=None)
    assert parse_client_frame(dumps({"type": "cancel", "run_id": "r" * 64})) == CancelFrame(
        type="cancel", run_id="r" * 64
    )
    assert parse_client_frame(b'{"type":"cancel","run_id":null}') == CancelFrame(type="cancel")
    assert parse_client_frame(b'{"type":"ping"}') == PingFrame(type="ping", nonce=None)
    assert parse_client_frame(dumps({"type": "ping", "nonce": "n" * 128})) == PingFrame(
        type="ping", nonce="n" * 128
    )


def test_limits_are_inclusive() -> None:
    text = "x" * MAX_TEXT_CHARS
    frame = parse_client_frame(dumps(message(client_msg_id="a" * 64, text=text)))
    assert isinstance(frame, MessageFrame)
    assert (len(frame.client_msg_id), len(frame.text)) == (64, 32_768)


def test_text_counts_code_points_not_bytes() -> None:
    text = "😀" * MAX_TEXT_CHARS  # 4 bytes each, 128 KiB of UTF-8
    frame = parse_client_frame(dumps(message(text=text)))
    assert isinstance(frame, MessageFrame)
    assert frame.text == text
    error = refused(dumps(message(text=text + "😀")))
    assert error.code is ErrorCode.TEXT_TOO_LONG


def test_metadata_up_to_16_kib() -> None:
    overhead = len(dumps({"k": ""}))
    exact = {"k": "v" * (MAX_METADATA_BYTES - overhead)}
    assert len(dumps(exact)) == 16 * 1024
    frame = parse_client_frame(dumps(message(metadata=exact)))
    assert isinstance(frame, MessageFrame)
    assert frame.metadata == exact
    over = {"k": "v" * (MAX_METADATA_BYTES - overhead + 1)}
    error = refused(dumps(message(metadata=over)))
    assert error.code is ErrorCode.INVALID_FRAME
    assert error.client_msg_id == "m1"
    assert error.message == "metadata: Value error, metadata over 16384 bytes as compact JSON"


def test_metadata_is_measured_compact() -> None:
    """Whitespace in the frame does not count: the size is the compact encoding's."""
    body = "v" * (MAX_METADATA_BYTES - len(dumps({"k": ""})))
    raw = '{"type":"message","client_msg_id":"m1","text":"x","metadata":{  "k"  :  "BODY"  }}'
    raw = raw.replace("BODY", body)
    frame = parse_client_frame(raw)
    assert isinstance(frame, MessageFrame)
    assert frame.metadata == {"k": body}


# --------------------------------------------------------------------------- refused frames


@pytest.mark.parametrize(
    "raw",
    [b"", b"{", b"nope", b"{'a':1}", b'{"type":"ping",}', b"\xff\xfe", b"[1,2", b"NaN"],
)
def test_not_json(raw: bytes) -> None:
    error = refused(raw)
    assert error.code is ErrorCode.INVALID_JSON
    assert error.message == "the frame is not valid JSON"
    assert error.client_msg_id is None


@pytest.mark.parametrize("raw", [b"[]", b"1", b'"message"', b"null", b"true", b"[{}]"])
def test_json_that_is_not_an_object(raw: bytes) -> None:
    error = refused(raw)
    assert (error.code, error.message) == (ErrorCode.INVALID_FRAME, "a frame must be a JSON object")


@pytest.mark.parametrize(
    ("obj", "text"),
    [
        ({}, "unknown frame type 'None'"),
        ({"type": "hello"}, "unknown frame type 'hello'"),
        ({"type": "Message"}, "unknown frame type 'Message'"),
        ({"type": 1}, "unknown frame type '1'"),
        ({"type": ["message"]}, "unknown frame type \"['message']\""),
        ({"type": "x" * 100}, "unknown frame type '" + "x" * 64 + "'"),
    ],
)
def test_unknown_types(obj: dict[str, Any], text: str) -> None:
    error = refused(dumps(obj))
    assert (error.code, error.message) == (ErrorCode.INVALID_FRAME, text)


def test_unknown_type_keeps_a_valid_client_msg_id() -> None:
    error = refused(dumps({"type": "messages", "client_msg_id": "m9", "text": "x"}))
    assert (error.code, error.client_msg_id) == (ErrorCode.INVALID_FRAME, "m9")


@pytest.mark.parametrize(
    ("obj", "where", "msg_id"),
    [
        ({"type": "message", "text": "x"}, "client_msg_id: Field required", None),
        ({"type": "message", "client_msg_id": "m1"}, "text: Field required", "m1"),
        (message(text=""), "text: String should have at least 1 character", "m1"),
        (message(text=5), "text: Input should be a valid string", "m1"),
        (message(text=None), "text: Input should be a valid string", "m1"),
        (
            message(mode="AUTO"),
            "mode: Input should be 'auto', 'steer', 'queue' or 'interrupt'",
            "m1",
        ),
        (message(mode=None), "mode: Input should be 'auto', 'steer', 'queue' or 'interrupt'", "m1"),
        (message(extra=1), "extra: Extra inputs are not permitted", "m1"),
        (message(metadata=[]), "metadata: Input should be a valid dictionary", "m1"),
        (message(metadata="{}"), "metadata: Input should be a valid dictionary", "m1"),
        (message(runner="a b"), "runner: String should match pattern", "m1"),
        (message(runner=""), "runner: String should have at least 1 character", "m1"),
        (message(runner="r" * 129), "runner: String should have at most 128 characters", "m1"),
        (message(client_msg_id=""), "client_msg_id: String should have at least 1 character", None),
        (message(client_msg_id="a" * 65), "client_msg_id: String should have at most 64", None),
        (message(client_msg_id="a b"), "client_msg_id: String should match pattern", None),
        (message(client_msg_id="m1\n"), "client_msg_id: String should match pattern", None),
        (message(client_msg_id="é"), "client_msg_id: String should match pattern", None),
        (message(client_msg_id=7), "client_msg_id: Input should be a valid string", None),
        ({"type": "cancel", "run_id": 5}, "run_id: Input should be a valid string", None),
        ({"type": "cancel", "run_id": "r" * 65}, "run_id: String should have at most 64", None),
        ({"type": "cancel", "all": True}, "all: Extra inputs are not permitted", None),
        ({"type": "ping", "nonce": "n" * 129}, "nonce: String should have at most 128", None),
        ({"type": "ping", "nonce": 1}, "nonce: Input should be a valid string", None),
    ],
)
def test_ill_formed_fields(obj: dict[str, Any], where: str, msg_id: str | None) -> None:
    error = refused(dumps(obj))
    assert error.code is ErrorCode.INVALID_FRAME
    assert error.message.startswith(where), error.message
    assert error.client_msg_id == msg_id


def test_text_too_long() -> None:
    error = refused(dumps(message(text="x" * (MAX_TEXT_CHARS + 1))))
    assert (error.code, error.message, error.client_msg_id) == (
        ErrorCode.TEXT_TOO_LONG,
        "text over 32768 characters",
        "m1",
    )


def test_text_too_long_wins_over_other_faults() -> None:
    error = refused(dumps(message(text="x" * (MAX_TEXT_CHARS + 1), mode="bogus")))
    assert error.code is ErrorCode.TEXT_TOO_LONG


def test_strict_types_do_not_coerce() -> None:
    assert refused(dumps(message(text=1.5))).code is ErrorCode.INVALID_FRAME
    assert refused(dumps(message(client_msg_id=123))).code is ErrorCode.INVALID_FRAME


def test_validate_client_frame_takes_decoded_values() -> None:
    assert validate_client_frame({"type": "ping", "nonce": "x"}) == PingFrame(
        type="ping", nonce="x"
    )
    with pytest.raises(FrameError) as info:
        validate_client_frame(["ping"])
    assert info.value.code is ErrorCode.INVALID_FRAME


def test_metadata_that_is_not_json_is_refused() -> None:
    """A decoder other than orjson (REST) may hand over integers beyond 64 bits."""
    with pytest.raises(FrameError) as info:
        validate_client_frame(message(metadata={"n": 2**70}))
    assert info.value.code is ErrorCode.INVALID_FRAME
    assert info.value.message.startswith("metadata: Value error, not encodable as JSON")


# --------------------------------------------------------------------------- any input


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=8,
)
field_names = st.sampled_from(
    ["type", "client_msg_id", "text", "mode", "metadata", "runner", "run_id", "nonce", "x"]
)
field_values = st.one_of(
    json_values,
    st.sampled_from(["message", "cancel", "ping", "auto", "steer", "queue", "interrupt", "m1"]),
)
frame_like = st.dictionaries(field_names, field_values, max_size=6)


def parse_or_refuse(raw: str | bytes) -> None:
    """Parse `raw`: a FrameError with a code of section 3, or exactly the frame sent."""
    try:
        frame = parse_client_frame(raw)
    except FrameError as exc:
        error = exc
    else:
        error = None
    if error is not None:
        assert error.code in (
            ErrorCode.INVALID_JSON,
            ErrorCode.INVALID_FRAME,
            ErrorCode.TEXT_TOO_LONG,
        )
        assert error.message
        if error.client_msg_id is not None:  # echoed only when it is a valid id
            assert orjson.loads(raw)["client_msg_id"] == error.client_msg_id
            assert CLIENT_MSG_ID.fullmatch(error.client_msg_id)
        return
    assert isinstance(frame, MessageFrame | CancelFrame | PingFrame)
    # whatever parses is exactly what was sent
    assert frame.model_dump(exclude_unset=True) == orjson.loads(raw)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_only_raise_frame_errors(raw: bytes) -> None:
    parse_or_refuse(raw)


@settings(max_examples=100, deadline=None)
@given(json_values)
def test_any_json_value_only_raises_frame_errors(value: object) -> None:
    parse_or_refuse(dumps(value))


@settings(max_examples=200, deadline=None)
@given(frame_like)
def test_frame_like_objects_only_raise_frame_errors(obj: dict[str, Any]) -> None:
    parse_or_refuse(dumps(obj))


ids = st.text(alphabet="abcXYZ019._:-", min_size=1, max_size=64)
valid_messages = st.fixed_dictionaries(
    {"type": st.just("message"), "client_msg_id": ids, "text": st.text(min_size=1)},
    optional={
        "mode": st.sampled_from(["auto", "steer", "queue", "interrupt"]),
        "metadata": st.dictionaries(st.text(max_size=8), json_values, max_size=4),
        "runner": st.text(alphabet="abcXYZ019._:-", min_size=1, max_size=128),
    },
)
valid_cancels = st.fixed_dictionaries(
    {"type": st.just("cancel")}, optional={"run_id": st.text(max_size=64) | st.none()}
)
valid_pings = st.fixed_dictionaries(
    {"type": st.just("ping")}, optional={"nonce": st.text(max_size=128) | st.none()}
)


@settings(max_examples=150, deadline=None)
@given(valid_messages | valid_cancels | valid_pings)
def test_valid_frames_round_trip(obj: dict[str, Any]) -> None:
    raw = dumps(obj)
    frame = parse_client_frame(raw)
    assert frame.type == obj["type"]
    assert frame.model_dump(exclude_unset=True) == obj
    # and the full dump fills in the documented defaults
    dumped = frame.model_dump()
    if obj["type"] == "message":
        assert dumped["mode"] == obj.get("mode", "auto")
        assert dumped["metadata"] == obj.get("metadata")
        assert dumped["runner"] == obj.get("runner")


# --------------------------------------------------------------------------- conversation ids


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("c1", True),
        ("0", True),
        ("A.b:c-d_e", True),
        ("a" * 128, True),
        ("a" * 129, False),
        ("", False),
        ("-a", False),
        (".a", False),
        ("_a", False),
        (":a", False),
        ("a b", False),
        ("a/b", False),
        ("a\n", False),
        ("é", False),
    ],
)
def test_conversation_ids(value: str, ok: bool) -> None:
    assert is_conversation_id(value) is ok


# --------------------------------------------------------------------------- encoding


def test_user_message_omits_absent_metadata() -> None:
    base = {
        "conversation_id": "c1",
        "run_id": "run_1",
        "ts": 5,
        "offset": 3,
        "message_id": "msg_1",
        "client_msg_id": "m1",
        "text": "hi",
        "route": "steer",
        "author": "anonymous",
    }
    assert encode(UserMessage(**base)) == (  # type: ignore[arg-type]
        b'{"type":"user.message","offset":3,"ts":5,"conversation_id":"c1","run_id":"run_1",'
        b'"message_id":"msg_1","client_msg_id":"m1","text":"hi","route":"steer",'
        b'"author":"anonymous"}'
    )
    with_meta = UserMessage(**base, metadata={"k": 1})  # type: ignore[arg-type]
    assert orjson.loads(encode(with_meta))["metadata"] == {"k": 1}
    assert orjson.loads(encode(UserMessage(**base, metadata={})))["metadata"] == {}  # type: ignore[arg-type]


def test_metadata_too_deep_for_its_event_is_refused_not_accepted() -> None:
    # orjson encodes at most 254 levels: metadata that fits alone but not one level down,
    # inside its `user.message`, once took the conversation's actor down
    outcomes = set()
    for depth in range(245, 262):
        nested = orjson.loads("[" * depth + "]" * depth)
        try:
            frame = parse_client_frame(message_json(metadata={"d": nested}))
        except FrameError as exc:
            outcomes.add(exc.code)
            continue
        event = UserMessage(
            conversation_id="c1",
            run_id="r",
            message_id="m",
            client_msg_id="m",
            text="x",
            route="run",
            author="a",
            metadata=frame.metadata,
        )
        assert orjson.loads(encode(event))["metadata"] == frame.metadata
        outcomes.add("accepted")
    assert outcomes == {ErrorCode.INVALID_FRAME, "accepted"}


def test_text_and_metadata_limits_come_from_the_caller() -> None:
    small = FrameLimits(text_chars=3, metadata_bytes=9)
    assert parse_client_frame(message_json(text="abc"), small).text == "abc"
    too_long = refused_with(message_json(text="abcd"), small)
    assert (too_long.code, too_long.message) == (ErrorCode.TEXT_TOO_LONG, "text over 3 characters")
    assert parse_client_frame(message_json(metadata={"k": "v"}), small).metadata == {"k": "v"}
    assert refused_with(message_json(metadata={"k": "vv"}), small).code is ErrorCode.INVALID_FRAME
    assert parse_client_frame(message_json(text="x" * MAX_TEXT_CHARS)).text  # the protocol's


def message_json(**fields: Any) -> str:
    # the stdlib, which nests deeper than orjson
    return json.dumps({"type": "message", "client_msg_id": "m1", "text": "t", **fields})


def refused_with(raw: str, limits: FrameLimits) -> FrameError:
    with pytest.raises(FrameError) as caught:
        parse_client_frame(raw, limits)
    return caught.value


def test_run_ended_omits_error_unless_failed_and_always_has_usage() -> None:
    ok = RunEnded(conversation_id="c1", run_id="r", status="completed", reason="stop")
    assert ok.wire() == {
        "type": "run.ended",
        "offset": 0,
        "ts": 0,
        "conversation_id": "c1",
        "run_id": "r",
        "status": "completed",
        "reason": "stop",
        "usage": None,
    }
    failed = RunEnded(
        conversation_id="c1",
        run_id="r",
        status="failed",
        reason="boom",
        error=RunError(code="boom", message="m", retryable=False),
        usage={"t": 1},
    )
    assert failed.wire()["error"] == {"code": "boom", "message": "m", "retryable": False}
    assert failed.wire()["usage"] == {"t": 1}


def test_tool_call_completed_carries_result_or_error() -> None:
    base: dict[str, Any] = {
        "conversation_id": "c1",
        "run_id": "r",
        "tool_call_id": "t",
        "name": "f",
    }
    result = ToolCallCompleted(**base, result={"v": 1}).wire()
    assert (result["result"], "error" in result) == ({"v": 1}, False)
    error = ToolCallCompleted(**base, error="nope").wire()
    assert (error["error"], "result" in error) == ("nope", False)
    empty = ToolCallCompleted(**base).wire()
    assert (empty["result"], "error" in empty) == (None, False)


def test_server_frames() -> None:
    assert encode(ErrorFrame(code=ErrorCode.QUEUE_FULL, message="full")) == (
        b'{"type":"error","code":"queue_full","message":"full"}'
    )
    assert encode(ErrorFrame(code=ErrorCode.TEXT_TOO_LONG, message="x", client_msg_id="m1")) == (
        b'{"type":"error","code":"text_too_long","message":"x","client_msg_id":"m1"}'
    )
    assert encode(Pong(nonce=None)) == b'{"type":"pong","nonce":null}'
    assert encode(Pong(nonce="n")) == b'{"type":"pong","nonce":"n"}'
    assert encode(
        Ack(client_msg_id="m1", offset=43, message_id="msg_1", route="run", run_id="run_1")
    ) == (
        b'{"type":"ack","client_msg_id":"m1","offset":43,"message_id":"msg_1","route":"run",'
        b'"run_id":"run_1","duplicate":false}'
    )
    ready = Ready(conversation_id="c1", session_id="s", head=0, active_run=None, queued_runs=0)
    assert orjson.loads(encode(ready)) == {
        "type": "ready",
        "protocol": 1,
        "conversation_id": "c1",
        "session_id": "s",
        "head": 0,
        "active_run": None,
        "queued_runs": 0,
    }
    busy = ready.model_copy(
        update={"active_run": RunSummary(run_id="r", status="running", runner="echo")}
    )
    assert orjson.loads(encode(busy))["active_run"] == {
        "run_id": "r",
        "status": "running",
        "runner": "echo",
    }


def test_an_event_without_a_run_omits_run_id() -> None:
    completed = MessageCompleted(
        conversation_id="c1", message_id="m", message=AssistantMessage(content="x")
    )
    assert "run_id" not in completed.wire()


def test_coalesce() -> None:
    parts = [
        MessageDelta(
            conversation_id="c1", run_id="r", offset=o, ts=100 + o, message_id="m", delta=d
        )
        for o, d in [(4, "a"), (5, "bc"), (6, "")]
    ]
    merged = coalesce(parts[0], parts)
    assert merged.wire() == {
        "type": "message.delta",
        "offset": 6,
        "ts": 106,
        "conversation_id": "c1",
        "run_id": "r",
        "message_id": "m",
        "delta": "abc",
        "first_offset": 4,
    }
    later = MessageDelta(
        conversation_id="c1", run_id="r", offset=7, ts=107, message_id="m", delta="d"
    )
    again = coalesce(merged, [merged, later])
    assert isinstance(again, CoalescedDelta)
    assert (again.first_offset, again.offset, again.ts, again.delta) == (4, 7, 107, "abcd")
