"""Fuzzing a live gateway (issue 7, item 7): hypothesis sends random and adversarial
client frames in any order (random bytes, text that is not JSON, deep nesting, huge
numbers, unicode edge cases, a wrong type in every field, missing and extra fields,
oversized texts) and every frame is answered exactly as PROTOCOL.md section 3 says:
the synchronous refusals (`invalid_json`, `invalid_frame`, `text_too_long`) in order,
every message with one ack or a documented error, no stack trace in any answer, no
connection closed, no error logged by the gateway.  Meanwhile an honest client on
another conversation chats on and sees every run complete, exactly, with no gap.

The gateway runs in a thread of its own (tests.conftest's `run_gateway` in its own
event loop), so that hypothesis drives it from plain synchronous tests; the number
of examples is bounded to keep these tests to a few seconds."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.sync.client import ClientConnection, connect

from tests.conftest import TIMEOUT, Gateway, run_gateway

SYNC = {"invalid_json", "invalid_frame", "text_too_long"}  # answered before the next frame
DOCUMENTED = SYNC | {"no_active_run", "unknown_run", "queue_full", "runner_unavailable"}
MODES = ["auto", "steer", "queue", "interrupt"]
TRACE_MARKS = ("Traceback", 'File "', "Error:", "0x7f")


# --------------------------------------------------------------------------- the gateway


class ErrorLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class Live:
    gw: Gateway
    errors: ErrorLog
    examples: Counter[str] = field(default_factory=Counter)


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    started = threading.Event()
    box: dict[str, Any] = {}

    async def serve() -> None:
        box["stop"] = asyncio.Event()
        box["loop"] = asyncio.get_running_loop()
        # No keepalive ping while hypothesis draws: uvicorn makes each ping's payload with
        # the global `random`, from this other thread, which hypothesis takes for a
        # strategy using `random` (a deprecation warning, an error under -W error).
        async with run_gateway(
            rate_burst=1_000_000, rate_per_s=1_000_000.0, ws_ping_interval_s=3600.0
        ) as gw:
            box["gw"] = gw
            started.set()
            await box["stop"].wait()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), name="fuzzed-gateway")
    thread.start()
    assert started.wait(TIMEOUT), "the gateway did not start"
    errors = ErrorLog()
    loggers = [logging.getLogger(n) for n in ("steerway", "uvicorn.error")]
    for logger in loggers:
        logger.addHandler(errors)
    try:
        yield Live(box["gw"], errors)
    finally:
        for logger in loggers:
            logger.removeHandler(errors)
        box["loop"].call_soon_threadsafe(box["stop"].set)
        thread.join(TIMEOUT)
        assert not thread.is_alive()


class Honest(threading.Thread):
    """A client of its own conversation that sends a message, waits for its run to end,
    checks the reply and the offsets, and starts again, until told to stop."""

    def __init__(self, gw: Gateway, cid: str) -> None:
        super().__init__(name=f"honest-{cid}")
        self.gw, self.cid = gw, cid
        self.stop = threading.Event()
        self.rounds = 0
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            with connect(self.gw.ws_url(self.cid, after=0), open_timeout=TIMEOUT) as ws:
                assert recv(ws)["type"] == "ready"
                offsets: list[int] = []
                while not self.stop.is_set():
                    self.round(ws, offsets)
                assert offsets == list(range(1, len(offsets) + 1))
        except BaseException as exc:  # reported by the test
            self.failure = exc

    def round(self, ws: ClientConnection, offsets: list[int]) -> None:
        words = f"honest words of round {self.rounds}"
        key = f"h{self.rounds}"
        ws.send(json.dumps({"type": "message", "client_msg_id": key, "text": words}))
        reply = ""
        while True:
            frame = recv(ws)
            if "offset" in frame and frame["type"] != "ack":
                offsets.append(frame.get("first_offset", frame["offset"]))
                offsets.extend(range(offsets[-1] + 1, frame["offset"] + 1))
            if frame["type"] == "ack":
                assert (frame["client_msg_id"], frame["route"]) == (key, "run")
            elif frame["type"] == "message.completed":
                reply = frame["message"]["content"]
            elif frame["type"] == "run.ended":
                assert frame["status"] == "completed", frame
                break
        assert reply == "echo: " + words
        self.rounds += 1

    def finish(self) -> None:
        self.stop.set()
        self.join(TIMEOUT)
        assert not self.is_alive()
        if self.failure is not None:
            raise self.failure
        assert self.rounds >= 1


def recv(ws: ClientConnection) -> dict[str, Any]:
    raw = ws.recv(timeout=TIMEOUT)
    assert isinstance(raw, str)
    frame: dict[str, Any] = orjson.loads(raw)
    return frame


# --------------------------------------------------------------------------- frames

# What a frame should get: ("error", code), or ("message", client_msg_id), ("ok", None).
Expect = tuple[str, str | None]
ID = st.from_regex(r"[A-Za-z0-9._:-]{1,64}", fullmatch=True)
BAD_CHARS = st.from_regex(r".*[^A-Za-z0-9._:-].*", fullmatch=True).filter(bool)
BAD_ID = st.from_regex(r"[A-Za-z0-9._:-]{65,80}", fullmatch=True) | BAD_CHARS  # 1-64 chars
BAD_RUNNER = st.from_regex(r"[A-Za-z0-9._:-]{129,140}", fullmatch=True) | BAD_CHARS  # 1-128
TEXT = st.text(st.characters(codec="utf-8"), min_size=1, max_size=120)  # no lone surrogate
EDGY = st.sampled_from(
    ["\u0000", "\u202e", "\ufeff", "e\u0301", "\U0001f600", "\u2028", "\ud7ff", "\uffff", " "]
)
SCALAR = (
    st.none()
    | st.booleans()
    | st.integers(-(10**30), 10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | EDGY
)
JSON = st.recursive(
    SCALAR,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)
NOT_STR = (
    st.booleans()
    | st.integers(-(10**30), 10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.lists(SCALAR, max_size=3)
    | st.dictionaries(st.text(max_size=4), SCALAR, max_size=3)
)
WRONG: dict[str, st.SearchStrategy[Any]] = {
    "type": st.none()
    | NOT_STR
    | st.text(max_size=10).filter(lambda t: t not in ("message", "cancel", "ping")),
    "client_msg_id": st.none() | NOT_STR | BAD_ID,
    "text": st.none() | NOT_STR | st.just(""),
    "mode": st.none() | NOT_STR | st.text(max_size=10).filter(lambda t: t not in MODES),
    "metadata": NOT_STR.filter(lambda v: not isinstance(v, dict)) | st.text(max_size=5),
    "runner": NOT_STR | BAD_RUNNER,
    "run_id": NOT_STR | st.text(min_size=65, max_size=70),
    "nonce": NOT_STR | st.text(min_size=129, max_size=130),
}
REQUIRED = {"message": ("type", "client_msg_id", "text"), "cancel": ("type",), "ping": ("type",)}


@st.composite
def valid(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["message", "message", "cancel", "ping"]))
    if kind == "message":
        frame: dict[str, Any] = {"type": kind, "client_msg_id": draw(ID), "text": draw(TEXT | EDGY)}
        if draw(st.booleans()):
            frame["mode"] = draw(st.sampled_from(MODES))
        if draw(st.booleans()):
            frame["metadata"] = draw(st.dictionaries(st.text(max_size=6), JSON, max_size=3))
        if draw(st.booleans()):
            frame["runner"] = draw(st.sampled_from(["echo", "no-such-runner"]))
        return frame
    if kind == "cancel":
        return {
            "type": kind,
            **({"run_id": draw(st.text(max_size=64))} if draw(st.booleans()) else {}),
        }
    return {
        "type": kind,
        **({"nonce": draw(st.text(max_size=128) | EDGY)} if draw(st.booleans()) else {}),
    }


@st.composite
def mutated(draw: st.DrawFn) -> tuple[dict[str, Any], str]:
    """A frame with exactly one thing wrong, and the code that answers it."""
    frame = draw(valid())
    how = draw(st.sampled_from(["wrong type", "missing", "extra", "too long", "deep metadata"]))
    kind = frame["type"]
    if how == "too long" and kind == "message":
        frame["text"] = "x" * draw(st.integers(32_769, 33_000))
        return frame, "text_too_long"
    if how == "deep metadata" and kind == "message":
        depth = draw(st.integers(250, 256))  # around the encoder's limit of 254 levels
        frame["metadata"] = {"deep": orjson.loads("[" * depth + "]" * depth)}
        try:
            orjson.dumps([frame["metadata"]])
        except TypeError:
            return frame, "invalid_frame"  # too deep for its event to carry
        return frame, ""
    if how == "missing":
        del frame[draw(st.sampled_from(REQUIRED[kind]))]
    elif how == "extra":
        frame[draw(st.sampled_from(["extra", "offset", "Type", "ts", ""]))] = draw(SCALAR)
    else:
        fields = {
            "message": ["type", "client_msg_id", "text", "mode", "metadata", "runner"],
            "cancel": ["type", "run_id"],
            "ping": ["type", "nonce"],
        }[kind]
        name = draw(st.sampled_from(fields))
        frame[name] = draw(WRONG[name])
    return frame, "invalid_frame"


def encoded(frame: Any, ascii_only: bool) -> str:
    """JSON text by the stdlib (big integers as digits); a lone surrogate, which no UTF-8
    text frame can carry, is sent escaped, as `\\udXXX`."""
    text = json.dumps(frame, ensure_ascii=ascii_only)
    try:
        text.encode()
    except UnicodeEncodeError:
        return json.dumps(frame)
    return text


def of_json(text: str) -> Expect | None:
    """What the server's JSON layer alone answers, or None when it is an object."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return ("error", "invalid_json")
    return None if isinstance(value, dict) else ("error", "invalid_frame")


@st.composite
def frames(draw: st.DrawFn) -> tuple[str | bytes, Expect]:
    kind = draw(
        st.sampled_from(["valid", "mutated", "mutated", "bytes", "text", "nesting", "json"])
    )
    if kind == "bytes":
        return draw(st.binary(max_size=64)), ("error", "invalid_frame")
    if kind == "text":
        text = draw(st.text(st.characters(codec="utf-8"), max_size=40))
        return text, of_json(text) or ("error", "invalid_frame")  # an object: no `type`
    if kind == "nesting":
        depth = draw(st.integers(1, 3000))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        text = opener * depth + "1" + closer * depth
        return text, of_json(text) or ("error", "invalid_frame")
    if kind == "json":
        text = encoded(draw(JSON), draw(st.booleans()))
        return text, of_json(text) or ("error", "invalid_frame")
    if kind == "valid":
        frame, code = draw(valid()), ""
    else:
        frame, code = draw(mutated())
    text = encoded(frame, draw(st.booleans()))
    # a lone surrogate from st.text, escaped by the stdlib, is not JSON to the server
    wrong = of_json(text)
    if wrong is not None:
        return text, wrong
    if code:
        return text, ("error", code)
    if frame["type"] == "message":
        return text, ("message", frame["client_msg_id"])
    return text, ("ok", frame["type"])


# --------------------------------------------------------------------------- the run


def exchange(gw: Gateway, cid: str, cases: list[tuple[str | bytes, Expect]]) -> None:
    """Send the frames, a ping after each; check every answer."""
    with connect(gw.ws_url(cid), open_timeout=TIMEOUT, max_size=None) as ws:
        assert recv(ws)["type"] == "ready"
        sync_expected: list[str] = []
        messages: Counter[str] = Counter()
        for i, (data, (what, detail)) in enumerate(cases):
            ws.send(data)
            ws.send(json.dumps({"type": "ping", "nonce": f"sentinel-{i}"}))
            if what == "error":
                assert detail is not None
                sync_expected.append(detail)
            elif what == "message":
                assert detail is not None
                messages[detail] += 1
        sync_seen: list[str] = []
        answered: Counter[str] = Counter()
        pongs = 0
        while pongs < len(cases) or sum(answered.values()) < sum(messages.values()):
            frame = recv(ws)
            kind = frame["type"]
            if kind == "error":
                assert frame["code"] in DOCUMENTED, frame
                assert isinstance(frame["message"], str)
                assert not any(mark in frame["message"] for mark in TRACE_MARKS), frame
                if frame["code"] in SYNC:
                    sync_seen.append(frame["code"])
                elif frame["code"] not in ("no_active_run", "unknown_run"):  # not a cancel's
                    answered[frame["client_msg_id"]] += 1
            elif kind == "ack":
                answered[frame["client_msg_id"]] += 1
            elif kind == "pong" and str(frame["nonce"]).startswith("sentinel-"):
                # every refusal of the frames before it has come, in order
                assert frame["nonce"] == f"sentinel-{pongs}"
                pongs += 1
                assert sync_seen == sync_expected[: len(sync_seen)]
        assert sync_seen == sync_expected
        assert answered == messages


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases=st.lists(frames(), min_size=1, max_size=6))
def fuzz_once(live: Live, cases: list[tuple[str | bytes, Expect]]) -> None:
    live.examples["n"] += 1
    exchange(live.gw, f"fz-{live.examples['n']}", cases)


def test_random_and_adversarial_frames_are_answered_as_documented(live: Live) -> None:
    honest = Honest(live.gw, "honest-1")
    honest.start()
    try:
        fuzz_once(live)
    finally:
        honest.finish()
    assert live.errors.records == []
    assert live.examples["n"] >= 100
