"""The REST API (PROTOCOL.md section 8): same routing as the WebSocket, JSON bodies."""

from __future__ import annotations

import base64
import binascii
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway import auth
from gateway.auth import Principal
from gateway.config import Settings
from gateway.conversation import ConversationHub
from gateway.core.ids import now_ms
from gateway.core.runs import RunStatus
from gateway.errors import FrameError, SteerwayError
from gateway.protocol.codes import ErrorCode
from gateway.protocol.frames import (
    FrameLimits,
    MessageFrame,
    encode,
    is_conversation_id,
    validate_client_frame,
)
from store.base import StoreError

LISTING_DEFAULT, LISTING_MAX = 50, 500
DELIVERIES_DEFAULT, DELIVERIES_MAX = 20, 200
EVENTS_DEFAULT, EVENTS_MAX = 500, 5000
# The longest JSON spelling of one text character (a code point) is a surrogate pair
# of escapes, `\ud83d\ude00`: 12 bytes; of one byte of compact JSON (as metadata is
# measured), an escaped ASCII character, `\u0061`: 6 bytes.
BODY_BYTES_PER_CHAR = 12
BODY_BYTES_PER_METADATA_BYTE = 6
BODY_ROOM = 4096  # `type`, `client_msg_id`, `mode`, `runner`, the keys, some whitespace


def body_limit(settings: Settings) -> int:
    """The largest `POST .../messages` body read: the largest legal message, however its
    strings are escaped (PROTOCOL.md sections 3 and 8 count characters, not bytes)."""
    return (
        settings.max_text_chars * BODY_BYTES_PER_CHAR
        + settings.max_metadata_bytes * BODY_BYTES_PER_METADATA_BYTE
        + BODY_ROOM
    )


def json(body: Any, status: int = 200) -> Response:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    return Response(data, status_code=status, media_type="application/json")


def error(code: ErrorCode, message: str) -> Response:
    return json({"error": {"code": code.value, "message": message}}, code.http_status)


def _bad(message: str) -> SteerwayError:
    return FrameError(message, code=ErrorCode.INVALID_FRAME)


def _int(request: Request, name: str, default: int, maximum: int | None = None) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not raw.isascii() or not raw.isdigit() or len(raw) > 18:
        raise _bad(f"`{name}` must be an integer >= 0")
    value = int(raw)
    if maximum is not None:
        if value < 1:
            raise _bad(f"`{name}` must be at least 1")
        value = min(value, maximum)  # above the maximum is clamped
    return value


def _cid(request: Request, who: Principal) -> str:
    """The path's conversation id, legal and covered by the token."""
    cid: str = request.path_params["conversation_id"]
    if not is_conversation_id(cid):
        raise _bad("illegal conversation id")
    auth.for_conversation(who, cid)
    return cid


def _cursor(value: object) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(value)).decode()


def _uncursor(raw: str) -> Any:
    try:
        return orjson.loads(base64.urlsafe_b64decode(raw.encode()))
    except (binascii.Error, ValueError, orjson.JSONDecodeError):
        raise _bad("`before` is not a cursor this server gave") from None


class Api:
    def __init__(self, hub: ConversationHub) -> None:
        self.hub = hub
        self.store = hub.store
        self.settings = hub.settings
        self.limits = FrameLimits(self.settings.max_text_chars, self.settings.max_metadata_bytes)
        self.max_body = body_limit(self.settings)

    def routes(self) -> list[Route]:
        return [
            Route("/api/conversations", self.wrap(self.conversations)),
            Route(
                "/api/conversations/{conversation_id}/messages",
                self.wrap(self.post_message),
                methods=["POST"],
            ),
            Route("/api/conversations/{conversation_id}/events", self.wrap(self.events)),
            Route("/api/conversations/{conversation_id}/transcript", self.wrap(self.transcript)),
            Route("/api/runs", self.wrap(self.runs)),
            Route("/api/runs/{run_id}", self.wrap(self.run)),
            Route("/api/runs/{run_id}/cancel", self.wrap(self.cancel), methods=["POST"]),
            Route("/api/webhooks", self.wrap(self.webhooks)),
            Route(
                "/api/webhooks/deliveries/{delivery_id:path}/replay",
                self.wrap(self.replay),
                methods=["POST"],
            ),
        ]

    def wrap(self, handler: Any) -> Any:
        """Authenticate (a user or admin token: PROTOCOL.md section 7), then `handler`
        with the principal, which it checks against what the request touches."""

        async def endpoint(request: Request) -> Response:
            try:
                who = auth.authenticate(request.scope, self.settings)
                auth.for_user(who)
                response: Response = await handler(request, who)
                return response
            except SteerwayError as exc:
                return error(exc.code, exc.message)
            except StoreError:
                return error(ErrorCode.INTERNAL, "the store is unavailable")

        endpoint.__name__ = handler.__name__
        return endpoint

    async def post_message(self, request: Request, who: Principal) -> Response:
        cid = _cid(request, who)
        body = await self._body(request)
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise FrameError("the body is not valid JSON", code=ErrorCode.INVALID_JSON) from None
        if isinstance(obj, dict):
            obj.setdefault("type", "message")
        frame = validate_client_frame(obj, self.limits)
        if not isinstance(frame, MessageFrame):
            raise _bad("the body's `type` must be `message`")
        ack = await self.hub.submit(cid, frame, who.author)
        return json(encode(ack))

    async def _body(self, request: Request) -> bytes:
        """The request body, refused (413) as soon as it is longer than any legal message
        can be: never buffered beyond the limit."""
        limit = self.max_body
        too_long = SteerwayError(
            f"request body over {limit} bytes: longer than any legal message (text at most "
            f"{self.settings.max_text_chars} characters, metadata at most "
            f"{self.settings.max_metadata_bytes} bytes as compact JSON)",
            code=ErrorCode.TEXT_TOO_LONG,
        )
        declared = request.headers.get("content-length", "")
        if declared.isascii() and declared.isdigit() and int(declared) > limit:
            raise too_long
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_long
            chunks.append(chunk)
        return b"".join(chunks)

    async def events(self, request: Request, who: Principal) -> Response:
        cid = _cid(request, who)
        after = _int(request, "after", 0)
        limit = _int(request, "limit", EVENTS_DEFAULT, EVENTS_MAX)
        head = await self.store.last_offset(cid)
        payloads = await self.store.read_events(cid, after, limit)
        # Stored texts are spliced in as they are: the same bytes as the live frames.
        body = b'{"events":[' + ",".join(payloads).encode() + b'],"head":%d}' % head
        return json(body)

    async def transcript(self, request: Request, who: Principal) -> Response:
        """The newest `limit` turns (in order) before the `before` cursor; `next_before`
        pages back to older ones, null on the oldest page."""
        cid = _cid(request, who)
        limit = _int(request, "limit", EVENTS_DEFAULT, EVENTS_MAX)
        raw = request.query_params.get("before")
        before = None
        if raw is not None:
            value = _uncursor(raw)
            if not isinstance(value, int) or isinstance(value, bool):
                raise _bad("`before` is not a cursor this server gave")
            before = value
        turns = await self.store.transcript(cid, limit + 1, before)
        more = len(turns) > limit
        turns = turns[-limit:]
        nxt = _cursor(turns[0].offset) if more else None
        return json({"turns": [t.document() for t in turns], "next_before": nxt})

    async def conversations(self, request: Request, who: Principal) -> Response:
        only = auth.listed_conversations(who)
        limit = _int(request, "limit", LISTING_DEFAULT, LISTING_MAX)
        raw = request.query_params.get("before")
        before = None
        if raw is not None:
            value = _uncursor(raw)
            if not (
                isinstance(value, list)
                and len(value) == 2
                and isinstance(value[0], int)
                and isinstance(value[1], str)
            ):
                raise _bad("`before` is not a cursor this server gave")
            before = (value[0], value[1])
        items = await self.store.list_conversations(limit + 1, before, only)
        more = len(items) > limit
        items = items[:limit]
        nxt = _cursor([items[-1].last_activity, items[-1].conversation_id]) if more else None
        return json({"conversations": [c.listing() for c in items], "next_before": nxt})

    async def runs(self, request: Request, who: Principal) -> Response:
        limit = _int(request, "limit", LISTING_DEFAULT, LISTING_MAX)
        status = request.query_params.get("status")
        if status is not None and status not in RunStatus._value2member_map_:
            raise _bad("unknown `status`")
        cid = request.query_params.get("conversation_id")
        if cid is None:
            auth.for_admin(who)  # runs of every conversation
        elif not is_conversation_id(cid):
            raise _bad("illegal conversation id")
        else:
            auth.for_conversation(who, cid)
        raw = request.query_params.get("before")
        before = None
        if raw is not None:
            value = _uncursor(raw)
            if not isinstance(value, str):
                raise _bad("`before` is not a cursor this server gave")
            before = value
        runs = await self.store.list_runs(status, cid, limit + 1, before)
        more = len(runs) > limit
        runs = runs[:limit]
        return json({"runs": runs, "next_before": _cursor(runs[-1]["run_id"]) if more else None})

    async def _run_doc(self, request: Request, who: Principal) -> dict[str, Any]:
        doc = await self.store.get_run(request.path_params["run_id"])
        if doc is None:
            raise SteerwayError("no run of that id", code=ErrorCode.UNKNOWN_RUN)
        auth.for_conversation(who, doc["conversation_id"])
        return doc

    async def run(self, request: Request, who: Principal) -> Response:
        return json(await self._run_doc(request, who))

    async def cancel(self, request: Request, who: Principal) -> Response:
        doc = await self._run_doc(request, who)
        run_id = doc["run_id"]
        await self.hub.cancel(doc["conversation_id"], run_id)
        return json({"run_id": run_id, "status": "cancelled"}, 202)

    async def webhooks(self, request: Request, who: Principal) -> Response:
        """Every endpoint with its newest deliveries and its newest given up (admin)."""
        auth.for_admin(who)
        limit = _int(request, "limit", DELIVERIES_DEFAULT, DELIVERIES_MAX)
        endpoints = [] if self.hub.webhooks is None else self.hub.webhooks.endpoints.values()
        out = []
        for endpoint in endpoints:
            out.append(
                {
                    "name": endpoint.name,
                    "url": endpoint.url,
                    "events": list(endpoint.events),
                    "deliveries": [
                        delivery_listing(d)
                        for d in await self.store.list_deliveries(endpoint.name, limit)
                    ],
                    "failures": [
                        delivery_listing(d)
                        for d in await self.store.list_deliveries(endpoint.name, limit, "failed")
                    ],
                }
            )
        return json({"endpoints": out})

    async def replay(self, request: Request, who: Principal) -> Response:
        """Send a delivery again, soon, with its id (admin): 202."""
        auth.for_admin(who)
        delivery_id: str = request.path_params["delivery_id"]
        hooks = self.hub.webhooks
        endpoint = delivery_id.partition(":")[0]
        if hooks is None or endpoint not in hooks.endpoints or len(delivery_id) > 1024:
            raise SteerwayError("no delivery of that id", code=ErrorCode.NOT_FOUND)
        doc = await self.store.replay_delivery(delivery_id, now_ms())
        if doc is None:
            raise SteerwayError("no delivery of that id", code=ErrorCode.NOT_FOUND)
        hooks.wake()
        return json({"delivery": delivery_listing(doc)}, 202)


def delivery_listing(doc: dict[str, Any]) -> dict[str, Any]:
    """A delivery as REST and the dashboard show it: without its body or lease."""
    return {
        "delivery_id": doc["_id"],
        **{
            k: doc.get(k)
            for k in (
                "endpoint",
                "conversation_id",
                "offset",
                "type",
                "status",
                "attempts",
                "created",
                "next_at",
                "last_at",
                "last_status",
                "last_error",
                "delivered_at",
            )
        },
    }
