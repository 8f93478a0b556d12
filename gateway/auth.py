"""Authentication and origin checks (PROTOCOL.md section 7): one small function per check.

Every endpoint but `/healthz`, `/readyz` and the static UI calls these where it
accepts a request, before anything is served:

- `check_origin(scope, settings)`: a browser WebSocket from an origin outside the
  allow-list is refused (close 1008);
- `authenticate(scope, settings)`: the `Principal` of the request's token, from
  `Authorization: Bearer` or `?token=`; a missing, malformed, expired or wrongly
  signed token is refused (close 4001, HTTP 401).  Without a secret everything
  is open: every request is `OPEN`, which every check lets through;
- one check per kind of endpoint, each refusing with close 4003 / HTTP 403:
  `for_conversation` (a user token whose `convs` cover the id, or admin),
  `for_user` (any user or admin token: REST), `for_admin` (the dashboard,
  run listings across conversations, `/metrics`), `for_runner` (`/ws/runners`) and
  `for_announce` (a runner name the runner token carries); and
  `listed_conversations`, what the conversation listing shows (all to an admin, a
  user's own `convs`).

WebSocket endpoints combine them with `admit(scope, settings, check)` and answer a
`Refused` with `refuse(send, refused)`: the socket is accepted, then closed with
the refusal's code and a fixed reason, so that a browser sees the code.

Tokens never reach a log, an event or an error message: messages here are fixed
strings, and `TokenRedactor` cleans uvicorn's log lines (which print query strings).
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

import jwt

from gateway.config import Settings
from gateway.core.limits import ConnectionSlots
from gateway.errors import SteerwayError
from gateway.protocol.codes import CloseCode, ErrorCode
from store.base import ConversationFilter

Role = Literal["user", "admin", "runner"]
ROLES: tuple[Role, ...] = ("user", "admin", "runner")
ALGORITHM = "HS256"
MAX_SUBJECT = 128  # `sub` becomes the `author` of stored messages
Scope = Mapping[str, Any]


class Refused(SteerwayError):
    """A request this endpoint does not serve: both answers, WebSocket and HTTP."""

    def __init__(self, message: str, code: ErrorCode, close_code: int, reason: str) -> None:
        super().__init__(message, code=code)
        self.close_code = close_code
        self.reason = reason  # the WebSocket close reason: a fixed word, never client data


def unauthorized(message: str) -> Refused:
    return Refused(message, ErrorCode.UNAUTHORIZED, CloseCode.UNAUTHORIZED, "unauthorized")


def forbidden(message: str) -> Refused:
    return Refused(message, ErrorCode.FORBIDDEN, CloseCode.FORBIDDEN, "forbidden")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request comes from: a verified token's claims, or `OPEN` without a secret."""

    sub: str
    role: Role
    convs: tuple[str, ...] = ()
    runners: tuple[str, ...] = ()
    open: bool = False  # no secret configured: every check passes

    @property
    def author(self) -> str:
        return "anonymous" if self.open else self.sub


OPEN = Principal("anonymous", "admin", ("*",), ("*",), open=True)


@functools.lru_cache(maxsize=4096)
def _pattern(pattern: str) -> re.Pattern[str]:
    """`*` matches any run of characters; everything else matches itself."""
    return re.compile(".*".join(re.escape(part) for part in pattern.split("*")), re.DOTALL)


def matches(patterns: Iterable[str], name: str) -> bool:
    return any(_pattern(p).fullmatch(name) is not None for p in patterns)


# --------------------------------------------------------------------------- tokens


def mint(
    secret: str,
    sub: str,
    role: Role,
    ttl_s: float,
    convs: Iterable[str] = (),
    runners: Iterable[str] = (),
    now: float | None = None,
) -> str:
    """A token as `steerway token` prints it."""
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "sub": sub,
        "role": role,
        "convs": list(convs),
        "iat": issued,
        "exp": issued + max(1, int(ttl_s)),
    }
    if role == "runner":
        claims["runners"] = list(runners)
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def _names(claims: dict[str, Any], key: str) -> tuple[str, ...]:
    value = claims.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise unauthorized(f"invalid token: `{key}` must be a list of names")
    return tuple(value)


def verify(token: str, secret: str) -> Principal:
    """The principal of a token signed with `secret`, or `Refused` (4001)."""
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            options={"require": ["exp", "sub", "role"], "verify_aud": False},
            leeway=0,
        )
    except jwt.ExpiredSignatureError:
        raise unauthorized("expired token") from None
    except jwt.PyJWTError:
        raise unauthorized("invalid token") from None  # PyJWT's text stays out of answers
    sub, role = claims["sub"], claims["role"]
    if not isinstance(sub, str) or not 0 < len(sub) <= MAX_SUBJECT:
        raise unauthorized(f"invalid token: `sub` must be 1-{MAX_SUBJECT} characters")
    if role not in ROLES:
        raise unauthorized("invalid token: `role` must be user, admin or runner")
    return Principal(sub, role, _names(claims, "convs"), _names(claims, "runners"))


def bearer(scope: Scope) -> str | None:
    """The request's token: `Authorization: Bearer`, else the `token` query parameter."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            header: str = value.decode("latin-1")
            scheme, _, credentials = header.partition(" ")
            if scheme.lower() == "bearer" and credentials.strip():
                return credentials.strip()
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    values = query.get("token")
    return values[-1] if values else None


def authenticate(scope: Scope, settings: Settings) -> Principal:
    secret = settings.secret_key
    if not secret:
        return OPEN
    token = bearer(scope)
    if token is None:
        raise unauthorized("missing token")
    return verify(token, secret)


# --------------------------------------------------------------------------- checks


def for_user(who: Principal) -> None:
    """REST: any user or admin token (a runner token is good for /ws/runners only)."""
    if who.role == "runner" and not who.open:
        raise forbidden("a runner token serves /ws/runners only")


def for_conversation(who: Principal, conversation_id: str) -> None:
    for_user(who)
    if who.role == "user" and not matches(who.convs, conversation_id):
        raise forbidden("the token does not cover this conversation")


def listed_conversations(who: Principal) -> ConversationFilter | None:
    """What a listing of conversations shows this principal: every one (None) to an admin,
    to a user those its `convs` cover (none when it has no `convs`)."""
    for_user(who)
    return None if who.role == "admin" else ConversationFilter.of(who.convs)


def for_admin(who: Principal) -> None:
    if who.role != "admin":
        raise forbidden("this endpoint needs an admin token")


def for_runner(who: Principal) -> None:
    """`/ws/runners` at its accept step: a runner token (or no secret)."""
    if who.role != "runner" and not who.open:
        raise forbidden("this endpoint needs a runner token")


def for_announce(who: Principal, runner: str) -> None:
    """A remote runner's `hello`: the name must be one its token carries."""
    for_runner(who)
    if not who.open and not matches(who.runners, runner):
        raise forbidden("the token does not carry this runner name")


def check_origin(scope: Scope, settings: Settings) -> None:
    """Browser WebSockets (those with an `Origin`) come from an allowed origin: the
    configured list, else the request's own host; no `Origin` is not a browser."""
    origin = next((v for k, v in scope.get("headers", ()) if k == b"origin"), None)
    if origin is None:
        return
    text = origin.decode("latin-1").strip().lower()
    allowed = [o.rstrip("/").lower() for o in settings.allowed_origins]
    if "*" in allowed or text in allowed:
        return
    if not allowed:
        host = next((v for k, v in scope.get("headers", ()) if k == b"host"), b"")
        parts = urlsplit(text)
        if parts.scheme in ("http", "https") and parts.netloc == host.decode("latin-1").lower():
            return
    raise Refused(
        "origin not allowed", ErrorCode.FORBIDDEN, CloseCode.POLICY_VIOLATION, "origin_refused"
    )


def admit(scope: Scope, settings: Settings, check: Callable[[Principal], None]) -> Principal:
    """A WebSocket's whole accept-step check: origin, token, then the endpoint's `check`."""
    check_origin(scope, settings)
    who = authenticate(scope, settings)
    check(who)
    return who


def take_slot(slots: ConnectionSlots, key: str | None = None) -> None:
    """A connection slot (per process, and per conversation with a `key`), or `Refused`
    with close 1013 "try again later" (PROTOCOL.md section 7, decision)."""
    reason = slots.acquire(key)
    if reason is not None:
        raise Refused(
            reason,
            ErrorCode.TOO_MANY_CONNECTIONS,
            CloseCode.TRY_AGAIN_LATER,
            ErrorCode.TOO_MANY_CONNECTIONS.value,
        )


async def refuse(send: Any, refused: Refused) -> None:
    """Answer a refused WebSocket: accepted, then closed with the refusal's code."""
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.close", "code": refused.close_code, "reason": refused.reason})


# --------------------------------------------------------------------------- logs


class TokenRedactor(logging.Filter):
    """Takes tokens out of log lines: uvicorn logs every request's path with its query."""

    _PATTERNS = (
        (re.compile(r"([?&]token=)[^&\s\"']*", re.IGNORECASE), r"\1[redacted]"),
        (re.compile(r"(bearer\s+)\S+", re.IGNORECASE), r"\1[redacted]"),
        (re.compile(r"eyJ[\w-]*\.[\w-]+\.[\w-]*"), "[redacted]"),  # any JWT
    )

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        clean = text
        for pattern, replacement in self._PATTERNS:
            clean = pattern.sub(replacement, clean)
        if clean != text:
            record.msg, record.args = clean, None
        return True


def redact_logs() -> None:
    """Install the redactor on uvicorn's loggers (once)."""
    for name in ("uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, TokenRedactor) for f in logger.filters):
            logger.addFilter(TokenRedactor())
