"""Runner result rules (PROTOCOL.md section 10), the same for every runner.

A result is `{"type", "data", "sequence"?, "usage"?}`.  `ResultNormalizer`
applies, in this order: the shape of the envelope; the sequence rules
(missing -> previous+1; not a positive integer -> previous+1 with a warning;
at or below the highest accepted so far -> a duplicate, dropped; a gap -> a
warning only); unknown types are ignored; the type's schema (unknown fields
rejected); and the 1 MiB size limit, which cuts the text of a result that
carries text and drops one that does not.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from pydantic import ValidationError

from gateway.protocol.frames import (
    RESULT_SCHEMAS,
    AssistantMessage,
    CompletedData,
    DeltaData,
    ResultData,
    RunCompletedData,
    RunFailedData,
    result_size,
    validate_result_data,
)

MAX_RESULT_BYTES = 1024 * 1024
_ENVELOPE_KEYS = frozenset({"type", "data", "sequence", "usage"})


@dataclass(slots=True)
class Result:
    """A runner result that passed every rule."""

    type: str
    data: ResultData
    sequence: int
    usage: dict[str, Any] | None = None
    truncated: bool = False


@dataclass(slots=True)
class Outcome:
    """What became of one raw result: `result` is None when it was dropped or ignored."""

    result: Result | None
    warnings: list[str] = field(default_factory=list)


class ResultNormalizer:
    """Per-run state of the result rules: the highest sequence accepted so far."""

    __slots__ = ("previous",)

    def __init__(self) -> None:
        self.previous = 0

    def feed(self, raw: object) -> Outcome:
        if not isinstance(raw, Mapping):
            return Outcome(None, [f"dropped: a result must be an object, not {type(raw).__name__}"])
        kind = raw.get("type")
        if not isinstance(kind, str):
            return Outcome(None, ["dropped: a result needs a string `type`"])
        warnings: list[str] = []
        seq = self._sequence(raw.get("sequence"), warnings)
        if seq is None:
            return Outcome(None, warnings)
        if kind not in RESULT_SCHEMAS:
            return Outcome(None, warnings)  # unknown types are ignored, silently
        extra = set(raw) - _ENVELOPE_KEYS
        if extra:
            warnings.append(f"dropped {kind}: unknown fields {sorted(extra)}")
            return Outcome(None, warnings)
        usage = raw.get("usage")
        if usage is not None and not isinstance(usage, dict):
            warnings.append(f"dropped {kind}: `usage` must be an object")
            return Outcome(None, warnings)
        try:
            data = validate_result_data(kind, raw.get("data"))
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in first["loc"]) or "data"
            warnings.append(f"dropped {kind}: {where}: {first['msg']}")
            return Outcome(None, warnings)
        result = Result(kind, data, seq, usage)
        size = result_size(raw)
        if size < 0:
            warnings.append(f"dropped {kind}: not encodable as JSON")
            return Outcome(None, warnings)
        if size > MAX_RESULT_BYTES and not _truncate(result, size - MAX_RESULT_BYTES):
            warnings.append(f"dropped {kind}: {size} bytes, over the 1 MiB limit")
            return Outcome(None, warnings)
        if result.truncated:
            warnings.append(f"truncated {kind}: {size} bytes, over the 1 MiB limit")
        return Outcome(result, warnings)

    def _sequence(self, value: object, warnings: list[str]) -> int | None:
        if value is None:
            seq = self.previous + 1
        elif isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            warnings.append(f"sequence {value!r} is not a positive integer: using previous+1")
            seq = self.previous + 1
        elif value <= self.previous:
            warnings.append(f"dropped: duplicate sequence {value} (at or below {self.previous})")
            return None
        else:
            seq = value
            if seq > self.previous + 1:
                warnings.append(f"sequence gap: {self.previous} -> {seq}")
        self.previous = seq
        return seq


def _cut(text: str, excess: int) -> str:
    """Cut `text` so that its JSON encoding shrinks by at least `excess` bytes, keeping
    about as much as fits (not `excess` characters: a character may take up to 6 bytes)."""
    size = len(orjson.dumps(text))
    target = size - excess  # the largest encoding to keep
    # A first guess in proportion to the average size of a character, then cut what is
    # still over: each character cut takes at least one byte with it.
    keep = min(len(text), max(0, (target - 2) * len(text) // max(1, size - 2)))
    while keep > 0:
        over = len(orjson.dumps(text[:keep])) - target
        if over <= 0:
            break
        keep = max(0, keep - over)
    return text[:keep]


def _truncate(result: Result, excess: int) -> bool:
    """Cut the text a result carries by `excess` bytes; False when it carries none, or too
    little to bring the result under the limit."""
    data = result.data
    if isinstance(data, DeltaData):
        if len(orjson.dumps(data.chunk)) - 2 < excess:
            return False  # even an empty text leaves the result over the limit
        data.chunk = _cut(data.chunk, excess)
    elif isinstance(data, CompletedData | RunCompletedData) and data.message is not None:
        if len(orjson.dumps(data.message.content)) - 2 < excess:
            return False
        content = _cut(data.message.content, excess)
        data.message = AssistantMessage(content=content)
    elif isinstance(data, RunFailedData):
        if len(orjson.dumps(data.error)) - 2 < excess:
            return False
        data.error = _cut(data.error, excess)
    else:
        return False
    result.truncated = True
    return True
