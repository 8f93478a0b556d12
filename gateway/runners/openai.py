"""`openai`: a runner that streams from any OpenAI-compatible Chat Completions endpoint.

vLLM, llama.cpp's server, Ollama (`/v1`) and hosted APIs all serve
`POST {base_url}/chat/completions` with `"stream": true`: Server-Sent Events
whose `data:` lines are chunks (`choices[0].delta.content`), ending with
`data: [DONE]`.  The runner sends the conversation's transcript as the context,
forwards each piece of text as a `message.delta`, and ends each completion with
a `message.completed`.  That is its turn boundary: steering that arrived while
the completion streamed is pulled then, and a follow-up completion that includes
it is streamed (at most `max_turns` completions a run).  The run's `usage` is the
sum of the completions' usage.

Failures end the run `failed` with an honest `retryable`: a 429, a 408 or a 5xx,
a network error, a timeout or a stream that breaks are worth retrying; another
4xx, or a stream that is not the protocol, are not.  A cancel closes the
generator, which closes the HTTP stream (the server sees the disconnect).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, Literal

import httpx
import orjson
from pydantic import BaseModel, ConfigDict, Field

from gateway.runners.base import Result, RunContext, completed, delta, run_failed
from gateway.runners.upstream import ERROR_TEXT, UpstreamFailure, UpstreamRunner, http_failure


class OpenAIOptions(BaseModel):
    """The runner's own options (`[runners.<name>]` in the runners config)."""

    model_config = ConfigDict(extra="forbid")

    base_url: str = "https://api.openai.com/v1"
    model: str = Field(min_length=1)
    api_key: str | None = None  # else the variable `api_key_env` names
    api_key_env: str = "OPENAI_API_KEY"
    system: str | None = None  # a system prompt put before the transcript
    temperature: float | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_turns: int = Field(8, ge=1)  # completions in one run (1 + follow-ups for steering)
    timeout_s: float = Field(60.0, gt=0)  # to connect, and between two chunks
    stream_usage: bool = True  # ask for usage in the last chunk (stream_options)


class OpenAIRunner(UpstreamRunner[OpenAIOptions]):
    options_model = OpenAIOptions

    def __init__(
        self,
        name: str = "openai",
        leftover_steering: Literal["follow_up", "drop"] = "follow_up",
        **options: Any,
    ) -> None:
        super().__init__(name, leftover_steering, **options)

    def _headers(self) -> dict[str, str]:
        key = self.options.api_key or os.environ.get(self.options.api_key_env)
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _body(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        o = self.options
        body: dict[str, Any] = {"model": o.model, "messages": messages, "stream": True}
        if o.stream_usage:
            body["stream_options"] = {"include_usage": True}
        if o.temperature is not None:
            body["temperature"] = o.temperature
        if o.max_tokens is not None:
            body["max_tokens"] = o.max_tokens
        return body

    async def run(self, ctx: RunContext) -> AsyncIterator[Result]:
        o = self.options
        messages = [{"role": "system", "content": o.system}] if o.system else []
        messages += [{"role": m.role, "content": m.content} for m in ctx.messages]
        usage: dict[str, Any] | None = None
        timeout = httpx.Timeout(o.timeout_s, write=o.timeout_s, pool=o.timeout_s)
        headers = self._headers()
        if ctx.traceparent is not None:  # the model's spans join the run's trace
            headers["traceparent"] = ctx.traceparent
        async with httpx.AsyncClient(timeout=timeout, headers=headers) as http:
            for turn in range(o.max_turns):
                stream = _Completion()
                try:
                    # aclosing: a cancel at the `yield` closes the HTTP stream now, not at GC
                    async with contextlib.aclosing(
                        stream.run(http, o.base_url, self._body(messages))
                    ) as chunks:
                        async for chunk in chunks:
                            yield delta(chunk)
                except UpstreamFailure as exc:
                    yield run_failed(exc.message, exc.code, exc.retryable)
                    return
                usage = _add_usage(usage, stream.usage)
                yield completed(stream.text)
                # The turn boundary: steering that arrived meanwhile, into the next completion.
                steering = await ctx.steering.pull("all") if turn + 1 < o.max_turns else []
                if not steering:
                    break
                messages.append({"role": "assistant", "content": stream.text})
                messages += [{"role": "user", "content": s.text} for s in steering]
        finish = {"finish_reason": stream.finish_reason or "stop"}
        yield {"type": "run.completed", "data": finish, "usage": usage}


class _Completion:
    """One streamed completion: its text, finish reason and usage as they arrive."""

    def __init__(self) -> None:
        self.text = ""
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None

    async def run(
        self, http: httpx.AsyncClient, base_url: str, body: dict[str, Any]
    ) -> AsyncGenerator[str, None]:
        url = base_url.rstrip("/") + "/chat/completions"
        done = False
        try:
            async with http.stream("POST", url, json=body) as response:
                if response.status_code != 200:
                    raise http_failure(response.status_code, await response.aread(), response)
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue  # blank lines, comments, `event:` lines
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    for piece in self._chunk(data):
                        self.text += piece
                        yield piece
        except httpx.TimeoutException as exc:
            raise UpstreamFailure(
                "upstream_timeout", f"{url}: {type(exc).__name__}", True
            ) from None
        except httpx.TransportError as exc:  # refused, reset, a stream cut short
            code = "upstream_stream_broken" if self.text or done else "upstream_unreachable"
            raise UpstreamFailure(code, f"{url}: {type(exc).__name__}: {exc}"[:500], True) from None
        if not done:
            raise UpstreamFailure(
                "upstream_stream_broken", f"{url}: the stream ended before [DONE]", True
            )

    def _chunk(self, data: str) -> list[str]:
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise UpstreamFailure(
                "upstream_protocol", f"a chunk is not JSON: {data[:80]!r}", False
            ) from None
        if not isinstance(chunk, dict):
            raise UpstreamFailure(
                "upstream_protocol", f"a chunk is not an object: {data[:80]!r}", False
            )
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        if isinstance(chunk.get("error"), dict):  # some servers report errors in the stream
            message = str(chunk["error"].get("message", chunk["error"]))[:ERROR_TEXT]
            raise UpstreamFailure("upstream_error", message, True)
        pieces: list[str] = []
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            content = (choice.get("delta") or {}).get("content")
            if isinstance(content, str) and content:
                pieces.append(content)
            if choice.get("finish_reason"):
                self.finish_reason = str(choice["finish_reason"])
        return pieces


def _add_usage(total: dict[str, Any] | None, more: dict[str, Any] | None) -> dict[str, Any] | None:
    """The usage of several completions: numbers added, the rest as last reported."""
    if more is None:
        return total
    if total is None:
        return dict(more)
    out = {**total, **more}
    for key, value in more.items():
        old = total.get(key)
        if isinstance(value, int | float) and isinstance(old, int | float):
            out[key] = old + value
    return out
