"""Error codes and WebSocket close codes, by name (PROTOCOL.md sections 3, 7, 8)."""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    """The `code` of an `error` frame and of a REST error body (section 3)."""

    INVALID_JSON = "invalid_json"
    INVALID_FRAME = "invalid_frame"
    TEXT_TOO_LONG = "text_too_long"
    NO_ACTIVE_RUN = "no_active_run"
    UNKNOWN_RUN = "unknown_run"
    RATE_LIMITED = "rate_limited"
    QUEUE_FULL = "queue_full"
    RUNNER_UNAVAILABLE = "runner_unavailable"
    INTERNAL = "internal"
    NOT_FOUND = "not_found"
    # Only in REST bodies and before a WebSocket is served (section 7), never in error frames.
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    TOO_MANY_CONNECTIONS = "too_many_connections"

    @property
    def http_status(self) -> int:
        """The HTTP status REST answers this code with (section 8)."""
        return _HTTP_STATUS[self]


_HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID_JSON: 400,
    ErrorCode.INVALID_FRAME: 400,
    ErrorCode.TEXT_TOO_LONG: 413,
    ErrorCode.NO_ACTIVE_RUN: 409,
    ErrorCode.UNKNOWN_RUN: 404,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.QUEUE_FULL: 409,
    ErrorCode.RUNNER_UNAVAILABLE: 503,
    ErrorCode.INTERNAL: 503,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.TOO_MANY_CONNECTIONS: 503,
}


class CloseCode(enum.IntEnum):
    """WebSocket close codes (section 7; 1000-1009 from RFC 6455 section 7.4.1)."""

    NORMAL = 1000
    GOING_AWAY = 1001  # server shutting down: reconnect with `after`
    POLICY_VIOLATION = 1008  # origin refused
    MESSAGE_TOO_BIG = 1009  # a message over the frame limit
    INTERNAL_ERROR = 1011  # an unexpected server error; a peer that stopped answering pings
    TRY_AGAIN_LATER = 1013  # connection limits (per conversation, per process)
    UNAUTHORIZED = 4001
    FORBIDDEN = 4003
    SLOW_CONSUMER = 4008
    RATE_LIMIT_ABUSE = 4029
