"""Runner result rules (PROTOCOL.md section 10) on `ResultNormalizer` alone: sequence rules,
schemas, unknown types, the 1 MiB limit."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.results import MAX_RESULT_BYTES, Outcome, Result, ResultNormalizer
from gateway.protocol.frames import (
    AssistantMessage,
    CompletedData,
    DeltaData,
    RunCompletedData,
    RunFailedData,
    StateData,
    ToolCompletedData,
    ToolStartedData,
)


def delta(chunk: str = "x", **envelope: Any) -> dict[str, Any]:
    return {"type": "message.delta", "data": {"chunk": chunk}, **envelope}


def size(raw: object) -> int:
    return len(orjson.dumps(raw))


def accepted(outcome: Outcome) -> Result:
    assert outcome.result is not None, outcome.warnings
    return outcome.result


# --------------------------------------------------------------------------- sequence rules


def test_missing_sequences_count_from_one() -> None:
    rules = ResultNormalizer()
    assert [accepted(rules.feed(delta())).sequence for _ in range(3)] == [1, 2, 3]
    assert rules.previous == 3


def test_explicit_sequences_are_kept() -> None:
    rules = ResultNormalizer()
    first = rules.feed(delta(sequence=1))
    second = rules.feed(delta(sequence=2))
    assert (accepted(first).sequence, first.warnings) == (1, [])
    assert (accepted(second).sequence, second.warnings) == (2, [])


@pytest.mark.parametrize("bad", [0, -1, -(2**62), 1.0, 2.5, "3", True, False, [1], {"n": 1}])
def test_a_sequence_that_is_not_a_positive_integer_becomes_previous_plus_one(bad: object) -> None:
    rules = ResultNormalizer()
    accepted(rules.feed(delta(sequence=4)))
    outcome = rules.feed(delta(sequence=bad))
    assert accepted(outcome).sequence == 5
    assert outcome.warnings == [f"sequence {bad!r} is not a positive integer: using previous+1"]
    assert rules.previous == 5


@pytest.mark.parametrize("again", [3, 2, 1])
def test_a_duplicate_is_dropped(again: int) -> None:
    rules = ResultNormalizer()
    for n in (1, 2, 3):
        accepted(rules.feed(delta(sequence=n)))
    outcome = rules.feed(delta("dup", sequence=again))
    assert outcome.result is None
    assert outcome.warnings == [f"dropped: duplicate sequence {again} (at or below 3)"]
    assert rules.previous == 3
    # the run goes on
    assert accepted(rules.feed(delta())).sequence == 4


def test_a_gap_is_a_warning_only() -> None:
    rules = ResultNormalizer()
    accepted(rules.feed(delta(sequence=2)))
    outcome = rules.feed(delta("later", sequence=10))
    result = accepted(outcome)
    assert (result.sequence, result.data) == (10, DeltaData(chunk="later"))
    assert outcome.warnings == ["sequence gap: 2 -> 10"]
    assert accepted(rules.feed(delta())).sequence == 11


def test_a_gap_from_the_start() -> None:
    outcome = ResultNormalizer().feed(delta(sequence=3))
    assert (accepted(outcome).sequence, outcome.warnings) == (3, ["sequence gap: 0 -> 3"])


# A model-based test: the generator picks, for each result, what it is (a good delta, an
# unknown type, a schema failure, not an object, no type) and what sequence it carries.

KINDS = ("delta", "unknown", "bad_schema", "not_object", "no_type")
sequence_values = st.one_of(
    st.none(),
    st.integers(-3, 12),  # small: duplicates and gaps are frequent
    st.integers(13, 2**62),
    st.booleans(),
    st.floats(allow_nan=False),
    st.text(max_size=3),
)


def raw_result(kind: str, seq: object, n: int) -> object:
    envelope: dict[str, Any] = {} if seq is None else {"sequence": seq}
    if kind == "delta":
        return delta(f"c{n}", **envelope)
    if kind == "unknown":
        return {"type": "thought.bubble", "data": {"anything": n}, **envelope}
    if kind == "bad_schema":
        return {"type": "message.delta", "data": {"chunk": n}, **envelope}
    if kind == "not_object":
        return [seq]
    return {"data": {"chunk": "x"}, **envelope}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(KINDS), sequence_values), max_size=30))
def test_sequence_rules_match_a_reference_model(items: list[tuple[str, object]]) -> None:
    rules = ResultNormalizer()
    previous = 0
    for n, (kind, seq) in enumerate(items):
        outcome = rules.feed(raw_result(kind, seq, n))
        # The reference: envelope first (not an object / no type: dropped, no number used).
        if kind == "not_object":
            assert outcome == Outcome(None, ["dropped: a result must be an object, not list"])
            continue
        if kind == "no_type":
            assert outcome == Outcome(None, ["dropped: a result needs a string `type`"])
            continue
        expected: list[str] = []
        if seq is None:
            number: int | None = previous + 1
        elif isinstance(seq, bool) or not isinstance(seq, int) or seq <= 0:
            number = previous + 1
            expected.append(f"sequence {seq!r} is not a positive integer: using previous+1")
        elif seq <= previous:
            number = None
            expected.append(f"dropped: duplicate sequence {seq} (at or below {previous})")
        else:
            number = seq
            if seq > previous + 1:
                expected.append(f"sequence gap: {previous} -> {seq}")
        if number is not None:
            previous = number  # a number is used even when the payload is then refused
        if number is not None and kind == "bad_schema":
            expected.append("dropped message.delta: chunk: Input should be a valid string")
        assert outcome.warnings == expected
        if number is not None and kind == "delta":
            assert outcome.result == Result("message.delta", DeltaData(chunk=f"c{n}"), number)
        else:
            assert outcome.result is None
        assert rules.previous == previous


@settings(max_examples=100, deadline=None)
@given(st.lists(sequence_values, max_size=30))
def test_accepted_sequences_strictly_increase(seqs: list[object]) -> None:
    rules = ResultNormalizer()
    numbers = [
        outcome.result.sequence
        for outcome in (rules.feed(delta(sequence=s) if s is not None else delta()) for s in seqs)
        if outcome.result is not None
    ]
    assert numbers == sorted(set(numbers))
    assert all(n > 0 for n in numbers)
    # every result without a usable number is accepted: only duplicates are dropped
    droppable = [s for s in seqs if type(s) is int and s > 0]
    assert len(numbers) >= len(seqs) - len(droppable)


# --------------------------------------------------------------------------- schemas


@pytest.mark.parametrize(
    ("kind", "data", "expected"),
    [
        ("message.delta", {"chunk": "hi"}, DeltaData(chunk="hi")),
        ("message.delta", {"chunk": ""}, DeltaData(chunk="")),
        (
            "message.completed",
            {"message": {"role": "assistant", "content": "done"}},
            CompletedData(message=AssistantMessage(content="done")),
        ),
        (
            "message.completed",
            {"message": {"content": "role defaults"}},
            CompletedData(message=AssistantMessage(content="role defaults")),
        ),
        (
            "tool.call.started",
            {"tool_call_id": "t1", "name": "search", "arguments": {"q": [1, 2]}},
            ToolStartedData(tool_call_id="t1", name="search", arguments={"q": [1, 2]}),
        ),
        (
            "tool.call.started",
            {"tool_call_id": "t1", "name": "noargs"},
            ToolStartedData(tool_call_id="t1", name="noargs", arguments=None),
        ),
        (
            "tool.call.completed",
            {"tool_call_id": "t1", "name": "search", "result": "found"},
            ToolCompletedData(tool_call_id="t1", name="search", result="found"),
        ),
        (
            "tool.call.completed",
            {"tool_call_id": "t1", "name": "search", "error": {"msg": "no"}},
            ToolCompletedData(tool_call_id="t1", name="search", error={"msg": "no"}),
        ),
        (
            "state.updated",
            {"scope": "conversation", "key": "k", "value": {"a": [1, None]}},
            StateData(scope="conversation", key="k", value={"a": [1, None]}),
        ),
        (
            "state.updated",
            {"scope": "runner", "key": "k", "value": "x" * (256 * 1024 - 2)},  # exactly 256 KiB
            StateData(scope="runner", key="k", value="x" * (256 * 1024 - 2)),
        ),
        (
            "run.completed",
            {"finish_reason": "stop"},
            RunCompletedData(finish_reason="stop"),
        ),
        (
            "run.completed",
            {"finish_reason": "length", "message": {"content": "all"}},
            RunCompletedData(finish_reason="length", message=AssistantMessage(content="all")),
        ),
        (
            "run.failed",
            {"error": "it broke", "code": "boom", "retryable": True},
            RunFailedData(error="it broke", code="boom", retryable=True),
        ),
    ],
)
def test_valid_payloads_pass(kind: str, data: dict[str, Any], expected: object) -> None:
    outcome = ResultNormalizer().feed({"type": kind, "data": data, "usage": {"tokens": 3}})
    assert outcome.warnings == []
    assert outcome.result == Result(kind, expected, 1, {"tokens": 3})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kind", "data", "warning"),
    [
        ("message.delta", {"chunk": 1}, "chunk: Input should be a valid string"),
        ("message.delta", {}, "chunk: Field required"),
        ("message.delta", None, "data: Input should be a valid dictionary or instance of"),
        ("message.delta", "text", "data: Input should be a valid dictionary or instance of"),
        ("message.delta", {"chunk": "a", "x": 1}, "x: Extra inputs are not permitted"),
        (
            "message.completed",
            {"message": {"role": "user", "content": "x"}},
            "message.role: Input should be 'assistant'",
        ),
        (
            "message.completed",
            {"message": {"content": "x", "name": "bot"}},
            "message.name: Extra inputs are not permitted",
        ),
        ("message.completed", {"content": "x"}, "message: Field required"),
        ("tool.call.started", {"name": "n"}, "tool_call_id: Field required"),
        (
            "tool.call.started",
            {"tool_call_id": 7, "name": "n"},
            "tool_call_id: Input should be a valid string",
        ),
        (
            "tool.call.completed",
            {"tool_call_id": "t", "name": "n", "output": 1},
            "output: Extra inputs are not permitted",
        ),
        (
            "state.updated",
            {"scope": "global", "key": "k", "value": 1},
            "scope: Input should be 'conversation', 'actor' or 'runner'",
        ),
        (
            "state.updated",
            {"scope": "actor", "key": "k", "value": "x" * (256 * 1024 - 1)},
            "value: Value error, state value over 262144 bytes",
        ),
        ("state.updated", {"scope": "actor", "key": "k"}, "value: Field required"),
        ("run.completed", {}, "finish_reason: Field required"),
        ("run.completed", {"finish_reason": None}, "finish_reason: Input should be a valid"),
        (
            "run.failed",
            {"error": "e", "code": "c", "retryable": 0},
            "retryable: Input should be a valid boolean",
        ),
        (
            "run.failed",
            {"error": "e", "code": "c", "retryable": "yes"},
            "retryable: Input should be a valid boolean",
        ),
        ("run.failed", {"error": "e", "retryable": False}, "code: Field required"),
    ],
)
def test_a_payload_failing_its_schema_is_dropped_and_the_run_goes_on(
    kind: str, data: object, warning: str
) -> None:
    rules = ResultNormalizer()
    outcome = rules.feed({"type": kind, "data": data})
    assert outcome.result is None
    assert len(outcome.warnings) == 1
    assert outcome.warnings[0].startswith(f"dropped {kind}: {warning}"), outcome.warnings
    after = rules.feed(delta("next"))
    assert after == Outcome(Result("message.delta", DeltaData(chunk="next"), 2), [])


def test_unknown_envelope_fields_are_refused() -> None:
    outcome = ResultNormalizer().feed(delta(extra=1, b=2))
    assert outcome == Outcome(None, ["dropped message.delta: unknown fields ['b', 'extra']"])


@pytest.mark.parametrize("usage", [[1], "tokens", 3])
def test_usage_must_be_an_object(usage: object) -> None:
    outcome = ResultNormalizer().feed(delta(usage=usage))
    assert outcome == Outcome(None, ["dropped message.delta: `usage` must be an object"])


def test_null_usage_is_no_usage() -> None:
    outcome = ResultNormalizer().feed(delta(usage=None))
    assert outcome == Outcome(Result("message.delta", DeltaData(chunk="x"), 1, None), [])


def test_unknown_types_are_ignored_silently_but_use_their_sequence() -> None:
    rules = ResultNormalizer()
    assert rules.feed({"type": "thinking", "data": 1, "whatever": True}) == Outcome(None, [])
    assert rules.feed({"type": "thinking", "sequence": 5}) == Outcome(
        None, ["sequence gap: 1 -> 5"]
    )
    assert accepted(rules.feed(delta())).sequence == 6


@pytest.mark.parametrize(
    ("raw", "warning"),
    [
        ([], "dropped: a result must be an object, not list"),
        ("message.delta", "dropped: a result must be an object, not str"),
        (None, "dropped: a result must be an object, not NoneType"),
        ({"data": {"chunk": "x"}}, "dropped: a result needs a string `type`"),
        ({"type": 1, "data": {"chunk": "x"}}, "dropped: a result needs a string `type`"),
    ],
)
def test_malformed_envelopes_are_dropped_without_using_a_sequence(
    raw: object, warning: str
) -> None:
    rules = ResultNormalizer()
    assert rules.feed(raw) == Outcome(None, [warning])
    assert rules.previous == 0


@pytest.mark.parametrize(
    "value",
    [object(), 2**70, {"a": {1, 2}}, "\ud800"],
    ids=["object", "int-over-64-bits", "set", "lone-surrogate"],
)
def test_a_value_that_is_not_json_is_dropped(value: object) -> None:
    """No event could carry it: encoding it later would fail in the conversation's writer."""
    rules = ResultNormalizer()
    raw = {"type": "tool.call.started", "data": {"tool_call_id": "t", "name": "n"}}
    raw["data"]["arguments"] = value  # type: ignore[index]
    outcome = rules.feed(raw)
    assert outcome == Outcome(None, ["dropped tool.call.started: not encodable as JSON"])
    assert accepted(rules.feed(delta())).sequence == 2


def test_a_lone_surrogate_in_a_chunk_is_dropped() -> None:
    outcome = ResultNormalizer().feed(delta("a\udc00b"))
    assert outcome == Outcome(None, ["dropped message.delta: not encodable as JSON"])


def test_validated_models_are_accepted_as_data() -> None:
    outcome = ResultNormalizer().feed({"type": "message.delta", "data": DeltaData(chunk="m")})
    assert outcome == Outcome(Result("message.delta", DeltaData(chunk="m"), 1), [])


# --------------------------------------------------------------------------- 1 MiB


def test_exactly_one_mib_is_not_truncated() -> None:
    base = size(delta(""))
    raw = delta("a" * (MAX_RESULT_BYTES - base))
    assert size(raw) == MAX_RESULT_BYTES
    outcome = ResultNormalizer().feed(raw)
    result = accepted(outcome)
    assert (result.truncated, outcome.warnings) == (False, [])
    assert result.data == DeltaData(chunk="a" * (MAX_RESULT_BYTES - base))


def test_one_byte_over_cuts_one_character() -> None:
    base = size(delta(""))
    raw = delta("a" * (MAX_RESULT_BYTES - base + 1))
    outcome = ResultNormalizer().feed(raw)
    result = accepted(outcome)
    assert result.truncated is True
    assert result.data == DeltaData(chunk="a" * (MAX_RESULT_BYTES - base))
    assert outcome.warnings == [
        f"truncated message.delta: {MAX_RESULT_BYTES + 1} bytes, over the 1 MiB limit"
    ]


@pytest.mark.parametrize(
    "unit",
    ["a", "é", "€", "😀", "\n", "\x01", '"', "a😀\n"],
    ids=["ascii", "2-byte", "3-byte", "4-byte", "escaped", "unicode-escape", "quote", "mixed"],
)
def test_a_large_delta_is_cut_to_fit(unit: str) -> None:
    text = unit * (2 * MAX_RESULT_BYTES // len(unit.encode()))
    raw = delta(text, sequence=1, usage={"tokens": 1})
    outcome = ResultNormalizer().feed(raw)
    result = accepted(outcome)
    assert isinstance(result.data, DeltaData)
    chunk = result.data.chunk
    assert result.truncated is True
    assert text.startswith(chunk)
    assert len(chunk) > 0
    cut_size = size(delta(chunk, sequence=1, usage={"tokens": 1}))
    assert cut_size <= MAX_RESULT_BYTES
    # cut to fit, not cut by one character per excess byte
    assert cut_size > MAX_RESULT_BYTES - len(orjson.dumps(unit))
    if unit == "a":
        assert cut_size == MAX_RESULT_BYTES  # ASCII is cut to the byte
    assert outcome.warnings == [f"truncated message.delta: {size(raw)} bytes, over the 1 MiB limit"]


@pytest.mark.parametrize("kind", ["message.completed", "run.completed"])
def test_a_large_message_is_cut_to_fit(kind: str) -> None:
    content = "w" * (MAX_RESULT_BYTES + 500)
    data: dict[str, Any] = {"message": {"role": "assistant", "content": content}}
    if kind == "run.completed":
        data["finish_reason"] = "stop"
    raw = {"type": kind, "data": data}
    outcome = ResultNormalizer().feed(raw)
    result = accepted(outcome)
    assert result.truncated is True
    assert isinstance(result.data, CompletedData | RunCompletedData)
    assert result.data.message is not None
    kept = result.data.message.content
    assert kept == "w" * (MAX_RESULT_BYTES - (size(raw) - len(content)))
    data["message"]["content"] = kept
    assert size(raw) == MAX_RESULT_BYTES
    if isinstance(result.data, RunCompletedData):
        assert result.data.finish_reason == "stop"


@pytest.mark.parametrize(
    "raw",
    [
        {"type": "run.completed", "data": {"finish_reason": "r" * MAX_RESULT_BYTES}},
        {
            "type": "tool.call.started",
            "data": {"tool_call_id": "t", "name": "n", "arguments": ["x" * MAX_RESULT_BYTES]},
        },
    ],
    ids=["run.completed", "tool.call.started"],
)
def test_a_large_result_without_text_to_cut_is_dropped(raw: dict[str, Any]) -> None:
    rules = ResultNormalizer()
    outcome = rules.feed(raw)
    assert outcome == Outcome(
        None, [f"dropped {raw['type']}: {size(raw)} bytes, over the 1 MiB limit"]
    )
    assert accepted(rules.feed(delta())).sequence == 2


def test_a_large_run_failed_keeps_failing_with_its_error_cut() -> None:
    raw = {
        "type": "run.failed",
        "data": {"error": "e" * MAX_RESULT_BYTES, "code": "c", "retryable": False},
    }
    outcome = ResultNormalizer().feed(raw)
    result = accepted(outcome)
    assert isinstance(result.data, RunFailedData)
    assert result.truncated
    assert result.data.code == "c"
    assert result.data.error == "e" * (MAX_RESULT_BYTES - (size(raw) - MAX_RESULT_BYTES))
    raw["data"]["error"] = result.data.error
    assert size(raw) == MAX_RESULT_BYTES


def test_a_large_result_whose_text_is_too_small_to_cut_is_dropped() -> None:
    """Cutting the chunk to nothing would still leave the result over 1 MiB."""
    raw = delta("short", usage={"blob": "u" * MAX_RESULT_BYTES})
    outcome = ResultNormalizer().feed(raw)
    assert outcome == Outcome(
        None, [f"dropped message.delta: {size(raw)} bytes, over the 1 MiB limit"]
    )


@settings(max_examples=60, deadline=None)
@given(
    unit=st.text(min_size=1, max_size=4),
    over=st.integers(1, 4096),
    usage=st.integers(0, 2048),
)
def test_truncation_always_fits(unit: str, over: int, usage: int) -> None:
    """Whatever the text, an accepted result is at most 1 MiB and its text a prefix."""
    envelope = {"usage": {"u": "u" * usage}}
    base = size(delta("", **envelope))
    unit_size = size(unit) - 2
    text = unit * ((MAX_RESULT_BYTES - base + over) // unit_size + 1)
    raw = delta(text, **envelope)
    assert size(raw) > MAX_RESULT_BYTES
    outcome = ResultNormalizer().feed(raw)
    result = accepted(outcome)
    assert isinstance(result.data, DeltaData)
    assert text.startswith(result.data.chunk)
    assert MAX_RESULT_BYTES - 256 < size(delta(result.data.chunk, **envelope)) <= MAX_RESULT_BYTES
    assert result.truncated is True
