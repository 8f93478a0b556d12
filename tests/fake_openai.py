"""A small OpenAI-compatible Chat Completions server for the tests (no network here).

`POST /v1/chat/completions` with `"stream": true` answers `you said: <last message>`
as Server-Sent Events, a word a chunk, then a chunk with `finish_reason`, a chunk
with `usage` (when `stream_options.include_usage`), then `data: [DONE]`.  What the
last message says picks the behaviour:

- `slow`: after its first chunk the stream waits for `gate` (set by the test);
- `break`: the connection is dropped after two chunks;
- `garbage`: a chunk that is not JSON;
- a status (`429`, `500`, `401`, `400`): that HTTP error, with a JSON error body.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.conftest import serve_asgi


def sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


class FakeOpenAI:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []  # {"body", "authorization", "traceparent"}
        self.gate = asyncio.Event()
        self.disconnected = asyncio.Event()  # a stream's client went away before its end
        self.app = Starlette(
            routes=[Route("/v1/chat/completions", self.completions, methods=["POST"])]
        )
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def completions(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append(
            {
                "body": body,
                "authorization": request.headers.get("authorization"),
                "traceparent": request.headers.get("traceparent"),
            }
        )
        last = body["messages"][-1]["content"]
        status = re.fullmatch(r"(\d{3})", last)
        if status:
            code = int(status.group(1))
            headers = {"retry-after": "2"} if code == 429 else {}
            error = {"error": {"message": f"fake error {code}", "type": "fake"}}
            return JSONResponse(error, code, headers=headers)
        words = f"you said: {last}".split(" ")
        chunks = [words[0]] + [" " + w for w in words[1:]]
        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return StreamingResponse(
            self._stream(chunks, last, usage, len(body["messages"])),
            media_type="text/event-stream",
        )

    async def _stream(
        self, chunks: list[str], last: str, usage: bool, prompt: int
    ) -> AsyncIterator[bytes]:
        finished = False
        try:
            for i, chunk in enumerate(chunks):
                choice = {"index": 0, "delta": {"content": chunk}, "finish_reason": None}
                yield sse({"object": "chat.completion.chunk", "choices": [choice]})
                if last.startswith("slow") and i == 0:
                    await self.gate.wait()
                if last == "garbage":
                    yield b"data: {not json\n\n"
                if last == "break" and i == 1:
                    raise ConnectionAbortedError("the fake server drops the stream")
            done = {"index": 0, "delta": {}, "finish_reason": "stop"}
            yield sse({"object": "chat.completion.chunk", "choices": [done]})
            if usage:
                counts = {"prompt_tokens": prompt, "completion_tokens": len(chunks)}
                counts["total_tokens"] = prompt + len(chunks)
                yield sse({"object": "chat.completion.chunk", "choices": [], "usage": counts})
            yield b"data: [DONE]\n\n"
            finished = True
        finally:
            if not finished:
                self.disconnected.set()


@contextlib.asynccontextmanager
async def fake_openai() -> AsyncIterator[FakeOpenAI]:
    fake = FakeOpenAI()
    # `critical`: the `break` case makes uvicorn log the aborted response as an error
    async with serve_asgi(fake.app, log_level="critical") as server:
        port = server.port
        fake.port = port
        yield fake
