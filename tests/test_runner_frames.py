"""Runner frames (PROTOCOL.md section 10) in gateway.protocol.frames: parsed strictly,
and a result frame's fast path accepts exactly what the model accepts."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from gateway.errors import FrameError
from gateway.protocol.frames import (
    HelloFrame,
    ResultFrame,
    SteeringPullFrame,
    parse_gateway_frame,
    parse_runner_frame,
    result_frame,
)


def test_defaults_and_bounds() -> None:
    hello = parse_runner_frame('{"type":"hello","runner":"r.1"}')
    assert hello == HelloFrame(
        type="hello", runner="r.1", supports_steering=True, max_concurrency=1
    )
    pull = parse_runner_frame('{"type":"steering.pull","run_id":"r","request_id":"q"}')
    assert pull == SteeringPullFrame(type="steering.pull", run_id="r", request_id="q")
    for bad in (
        '{"type":"hello","runner":"no spaces"}',
        '{"type":"hello","runner":"r","max_concurrency":0}',
        '{"type":"hello","runner":"r","max_concurrency":1001}',
        '{"type":"hello","runner":"r","supports_steering":"yes"}',
        '{"type":"steering.pull","run_id":"r","request_id":"q","mode":"some"}',
        '{"type":"steering.pull","run_id":"r","request_id":""}',
        '{"type":"run.assign"}',
    ):
        with pytest.raises(FrameError) as caught:
            parse_runner_frame(bad)
        assert caught.value.code == "invalid_frame", bad
    with pytest.raises(FrameError, match="not valid JSON"):
        parse_runner_frame("{")
    with pytest.raises(FrameError):
        parse_gateway_frame('{"type":"hello"}')


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=8,
)


@given(
    st.dictionaries(
        st.sampled_from(["type", "run_id", "result", "extra"]),
        st.one_of(
            st.just("result"), st.text(max_size=70), st.integers(-(2**63), 2**63 - 1), json_values
        ),
        max_size=4,
    )
)
def test_the_result_fast_path_is_the_model(obj: dict[str, Any]) -> None:
    try:
        expected: Any = ResultFrame.model_validate(obj)
    except ValidationError:
        expected = FrameError
    try:
        got: Any = parse_runner_frame(orjson.dumps(obj))
    except FrameError:
        got = FrameError
    if expected is FrameError or got is FrameError:
        assert got is expected or obj.get("type") != "result"
    else:
        assert got == expected
        assert orjson.loads(result_frame(got.run_id, got.result)) == obj
