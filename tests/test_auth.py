"""Authentication and origins (PROTOCOL.md section 7; issue 7, items 1 and 2).

The checks of `gateway/auth.py` one by one, then a table of every token case on every
endpoint of a live gateway with a secret, then `steerway token` and the logs of a
real process: tokens never appear in logs, events or error messages."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import httpx
import jwt
import orjson
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from gateway import auth
from gateway.auth import OPEN, Principal, Refused
from gateway.cli import main
from gateway.config import Settings
from gateway.core.limits import ConnectionSlots
from tests.conftest import TIMEOUT, Client, Gateway, run_gateway
from tests.helpers import expect
from tests.processes import spawn_gateway

SECRET = "steerway-test-secret-of-32-bytes-at-least"
OTHER = "another-secret-of-32-bytes-or-more-xxxxxx"
SECURED = Settings.load({"secret": SECRET}, environ={})


def token(
    sub: str = "alice",
    role: auth.Role = "user",
    convs: tuple[str, ...] = ("team-*",),
    runners: tuple[str, ...] = (),
    secret: str = SECRET,
    ttl_s: float = 3600,
    now: float | None = None,
) -> str:
    return auth.mint(secret, sub, role, ttl_s, convs, runners, now)


def scope(
    token_: str | None = None, header: str | None = None, origin: str | None = None
) -> dict[str, Any]:
    headers = [(b"host", b"gw.example:8000")]
    if header is not None:
        headers.append((b"authorization", header.encode()))
    if origin is not None:
        headers.append((b"origin", origin.encode()))
    query = f"after=0&token={token_}" if token_ is not None else "after=0"
    return {"headers": headers, "query_string": query.encode()}


def refusal(call: Any, *args: Any) -> tuple[int, str]:
    with pytest.raises(Refused) as caught:
        call(*args)
    return caught.value.close_code, caught.value.code.value


# --------------------------------------------------------------------------- tokens


def test_a_minted_token_verifies_to_its_claims() -> None:
    who = auth.verify(token(convs=("team-*", "c1")), SECRET)
    assert who == Principal("alice", "user", ("team-*", "c1"))
    assert who.author == "alice"
    runner = auth.verify(token("r", "runner", (), ("echo", "gpu-*")), SECRET)
    assert (runner.role, runner.runners) == ("runner", ("echo", "gpu-*"))
    assert OPEN.author == "anonymous"


def _raw(claims: dict[str, Any], secret: str = SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(claims, secret, algorithm=algorithm)


FUTURE = int(time.time()) + 3600
BAD_TOKENS = {
    "empty": "",
    "garbage": "not-a-token",
    "three dots": "a.b.c",
    "wrong secret": token(secret=OTHER),
    "expired": token(now=time.time() - 7200, ttl_s=60),
    "HS512": _raw({"sub": "a", "role": "user", "exp": FUTURE}, SECRET * 2, "HS512"),
    "alg none": jwt.encode({"sub": "a", "role": "user", "exp": FUTURE}, None, algorithm="none"),
    "no exp": _raw({"sub": "a", "role": "user"}),
    "no sub": _raw({"role": "user", "exp": FUTURE}),
    "no role": _raw({"sub": "a", "exp": FUTURE}),
    "unknown role": _raw({"sub": "a", "role": "root", "exp": FUTURE}),
    "sub not a string": _raw({"sub": 7, "role": "user", "exp": FUTURE}),
    "sub too long": _raw({"sub": "a" * 129, "role": "user", "exp": FUTURE}),
    "convs not a list": _raw({"sub": "a", "role": "user", "exp": FUTURE, "convs": "c1"}),
    "convs of numbers": _raw({"sub": "a", "role": "user", "exp": FUTURE, "convs": [1]}),
    "runners of nulls": _raw({"sub": "a", "role": "runner", "exp": FUTURE, "runners": [None]}),
    "exp not a number": _raw({"sub": "a", "role": "user", "exp": "soon"}),
}


@pytest.mark.parametrize("case", sorted(BAD_TOKENS))
def test_every_bad_token_is_4001_and_the_answer_never_echoes_it(case: str) -> None:
    bad = BAD_TOKENS[case]
    with pytest.raises(Refused) as caught:
        auth.verify(bad, SECRET)
    refused = caught.value
    assert (refused.close_code, refused.code.value, refused.reason) == (
        4001,
        "unauthorized",
        "unauthorized",
    )
    assert refused.code.http_status == 401
    assert not bad or bad not in refused.message
    assert "expired" in refused.message if case == "expired" else "invalid" in refused.message


def test_the_token_comes_from_the_header_first_then_the_query() -> None:
    assert auth.bearer(scope("q")) == "q"
    assert auth.bearer(scope("q", header="Bearer h")) == "h"
    assert auth.bearer(scope(header="bearer  h2 ")) == "h2"
    assert auth.bearer(scope("q", header="Basic abc")) == "q"
    assert auth.bearer(scope(header="Bearer ")) is None
    assert auth.bearer(scope()) is None


def test_authenticate_is_open_without_a_secret_and_needs_a_token_with_one() -> None:
    assert auth.authenticate(scope(), Settings.load(environ={})) is OPEN
    assert auth.authenticate(scope("junk"), Settings.load(environ={})) is OPEN
    assert refusal(auth.authenticate, scope(), SECURED) == (4001, "unauthorized")
    assert auth.authenticate(scope(token()), SECURED).sub == "alice"
    assert auth.authenticate(scope(header=f"Bearer {token('bob')}"), SECURED).sub == "bob"


def test_a_secret_shorter_than_32_bytes_is_refused_without_printing_it() -> None:
    with pytest.raises(ValueError, match="at least 32 bytes") as caught:
        Settings.load({"secret": "hunter2"}, environ={})
    assert "hunter2" not in str(caught.value)
    assert "hunter2" not in repr(Settings.load({"secret": SECRET}, environ={}))


# --------------------------------------------------------------------------- checks


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("team-*", "team-a", True),
        ("team-*", "team-", True),
        ("team-*", "xteam-a", False),
        ("*", "anything.at:all", True),
        ("a*b*c", "a-x-b-y-c", True),
        ("a*b*c", "a-x-c", False),
        ("a.b", "axb", False),  # only `*` is special
        ("c1", "c1", True),
        ("c1", "c10", False),
        ("*-prod", "eu-prod", True),
    ],
)
def test_conversation_patterns(pattern: str, name: str, expected: bool) -> None:
    assert auth.matches([pattern], name) is expected


USER = Principal("u", "user", ("team-*",))
ADMIN = Principal("root", "admin")
RUNNER = Principal("r", "runner", (), ("echo",))


def test_each_check_against_each_role() -> None:
    auth.for_conversation(USER, "team-a")
    auth.for_conversation(ADMIN, "anything")
    auth.for_conversation(OPEN, "anything")
    assert refusal(auth.for_conversation, USER, "other") == (4003, "forbidden")
    assert refusal(auth.for_conversation, RUNNER, "team-a") == (4003, "forbidden")
    auth.for_user(USER)
    assert refusal(auth.for_user, RUNNER) == (4003, "forbidden")
    auth.for_admin(ADMIN)
    auth.for_admin(OPEN)
    assert refusal(auth.for_admin, USER) == (4003, "forbidden")
    assert refusal(auth.for_admin, RUNNER) == (4003, "forbidden")
    auth.for_runner(RUNNER)
    auth.for_runner(OPEN)
    assert refusal(auth.for_runner, ADMIN) == (4003, "forbidden")
    assert refusal(auth.for_runner, USER) == (4003, "forbidden")
    auth.for_announce(RUNNER, "echo")
    auth.for_announce(OPEN, "anything")
    assert refusal(auth.for_announce, RUNNER, "gpu") == (4003, "forbidden")
    assert refusal(auth.for_announce, ADMIN, "echo") == (4003, "forbidden")


def test_origins() -> None:
    default = Settings.load(environ={})
    auth.check_origin(scope(), default)  # no Origin: not a browser
    auth.check_origin(scope(origin="http://gw.example:8000"), default)  # its own host
    auth.check_origin(scope(origin="https://GW.example:8000"), default)
    for origin in ("http://evil.example", "http://gw.example", "null", "file://x"):
        assert refusal(auth.check_origin, scope(origin=origin), default) == (1008, "forbidden")
    listed = Settings.load({"allowed_origins": ["https://app.example/"]}, environ={})
    auth.check_origin(scope(origin="https://app.example"), listed)
    assert refusal(auth.check_origin, scope(origin="http://gw.example:8000"), listed)[0] == 1008
    anyone = Settings.load({"allowed_origins": ["*"]}, environ={})
    auth.check_origin(scope(origin="http://evil.example"), anyone)


def test_admit_checks_origin_then_token_then_the_endpoint() -> None:
    evil = scope(token(), origin="http://evil.example")
    assert refusal(auth.admit, evil, SECURED, auth.for_admin)[0] == 1008
    assert refusal(auth.admit, scope("junk"), SECURED, auth.for_admin)[0] == 4001
    assert refusal(auth.admit, scope(token()), SECURED, auth.for_admin)[0] == 4003
    assert auth.admit(scope(token(role="admin")), SECURED, auth.for_admin).role == "admin"


def test_connection_slots_per_process_and_per_key() -> None:
    slots = ConnectionSlots(max_total=3, max_per_key=2)
    assert slots.acquire("a") is None
    assert slots.acquire("a") is None
    assert slots.acquire("a") == "too many connections to this conversation"
    assert slots.acquire(None) is None  # a connection of no conversation (the dashboard)
    assert slots.acquire("b") == "too many connections to this server"
    slots.release("a")
    assert (slots.total, slots.count("a")) == (2, 1)
    assert slots.acquire("b") is None
    for key in ("a", "b", None):
        slots.release(key)
    assert (slots.total, slots.count("a"), slots.count("b")) == (0, 0, 0)


def test_the_redactor_takes_tokens_out_of_log_lines() -> None:
    secret_token = token()
    lines = [
        (
            '%s - "WebSocket %s" [accepted]',
            ("127.0.0.1:5", f"/ws/conversations/c?token={secret_token}"),
        ),
        (
            '%s - "%s %s HTTP/%s" %d',
            ("1.2.3.4", "GET", f"/api/x?a=1&token={secret_token}", "1.1", 200),
        ),
        ("header Authorization: Bearer %s", (secret_token,)),
        ("a bare %s", (secret_token,)),
    ]
    redactor = auth.TokenRedactor()
    for msg, args in lines:
        record = logging.LogRecord("uvicorn.error", logging.INFO, "", 0, msg, args, None)
        assert redactor.filter(record)
        assert secret_token not in record.getMessage()
        assert "[redacted]" in record.getMessage()
    plain = logging.LogRecord("x", logging.INFO, "", 0, "no %s here", ("token",), None)
    redactor.filter(plain)
    assert plain.getMessage() == "no token here"


# --------------------------------------------------------------------------- live table

# (method, path, what it needs, the status it answers when served)
CID = "team-a"
REST = [
    ("POST", f"/api/conversations/{CID}/messages", "conversation", 200),
    ("GET", f"/api/conversations/{CID}/events?after=0", "conversation", 200),
    ("GET", f"/api/conversations/{CID}/transcript", "conversation", 200),
    ("GET", f"/api/runs?conversation_id={CID}", "conversation", 200),
    ("GET", "/api/runs/{run_id}", "conversation", 200),
    ("POST", "/api/runs/{run_id}/cancel", "conversation", 409),  # the run has ended
    ("GET", "/api/conversations", "user", 200),  # a user lists its own (issue 11)
    ("GET", "/api/runs", "admin", 200),
    ("GET", "/metrics", "admin", 200),
    ("GET", "/api/no/such/path", "user", 404),
]
CASES = {
    # case: (token, expected for conversation / admin / user endpoints)
    "missing": (None, (401, 401, 401)),
    "malformed": ("not.a.token", (401, 401, 401)),
    "expired": (token(now=time.time() - 7200, ttl_s=60), (401, 401, 401)),
    "wrongly signed": (token(secret=OTHER), (401, 401, 401)),
    "runner token": (token("r", "runner", ("*",), ("echo",)), (403, 403, 403)),
    "other conversations": (token(convs=("team-b", "x*")), (403, 403, None)),
    "user covering it": (token(), (None, 403, None)),
    "admin": (token("root", "admin", ()), (None, None, None)),
}
NEEDS = {"conversation": 0, "admin": 1, "user": 2}


async def _run_in(gw: Gateway) -> str:
    async with gw.client() as http:
        answer = await http.post(
            f"/api/conversations/{CID}/messages",
            json={"client_msg_id": "first", "text": "hello"},
            headers={"authorization": f"Bearer {token('root', 'admin', ())}"},
        )
        assert answer.status_code == 200, answer.text
        ack = answer.json()
    async with gw.connect(CID, after=0, token=token()) as client:
        await expect(client, "run.ended", run_id=ack["run_id"])
    return str(ack["run_id"])


async def test_every_token_case_on_every_endpoint() -> None:
    async with run_gateway(secret=SECRET) as gw, gw.client() as http:
        run_id = await _run_in(gw)
        for case, (tok, expected) in CASES.items():
            for method, path, needs, served in REST:
                status = expected[NEEDS[needs]] or served
                for via_header in (False, True):
                    url = path.format(run_id=run_id)
                    headers = {}
                    if tok is not None and via_header:
                        headers["authorization"] = f"Bearer {tok}"
                    elif tok is not None:
                        url += ("&" if "?" in url else "?") + f"token={tok}"
                    body = {"client_msg_id": f"k-{len(case)}", "text": "hi"}
                    answer = await http.request(
                        method, url, headers=headers, json=body if method == "POST" else None
                    )
                    assert answer.status_code == status, (case, method, path, answer.text)
                    if status in (401, 403):
                        error = answer.json()["error"]
                        assert error["code"] == ("unauthorized" if status == 401 else "forbidden")
                        assert tok is None or tok not in answer.text

            code = expected[NEEDS["conversation"]]
            query = {"after": 0} if tok is None else {"after": 0, "token": tok}
            if code is None:
                async with gw.connect(CID, **query) as client:
                    await client.send({"type": "ping", "nonce": case})
                    await client.until_type("pong", nonce=case)
            else:
                async with gw.connect(CID, ready=False, **query) as client:
                    with pytest.raises(ConnectionClosed) as closed:
                        await client.recv()
                assert closed.value.rcvd is not None
                assert closed.value.rcvd.code == {401: 4001, 403: 4003}[code], case
                assert tok is None or tok not in closed.value.rcvd.reason

        for path in ("/healthz", "/readyz", "/"):  # open, token or not
            assert (await http.get(path)).status_code == 200


async def test_a_user_token_lists_only_the_conversations_it_covers() -> None:
    """Issue 11, item 7: newest first, paged like the admin's listing, through patterns."""
    admin = {"authorization": f"Bearer {token('root', 'admin', ())}"}
    ids = ["team.a", "teamXa", "c1", "team.b", "c10", "other", "team.c"]
    async with run_gateway(secret=SECRET) as gw, gw.client() as http:
        for cid in ids:
            answer = await http.post(
                f"/api/conversations/{cid}/messages",
                json={"client_msg_id": "m1", "text": "hello"},
                headers=admin,
            )
            assert answer.status_code == 200, answer.text
            async with gw.connect(cid, after=0, token=token("root", "admin", ())) as client:
                await expect(client, "run.ended", run_id=answer.json()["run_id"])

        async def listing(tok: str, **params: Any) -> dict[str, Any]:
            answer = await http.get(
                "/api/conversations", params=params, headers={"authorization": f"Bearer {tok}"}
            )
            assert answer.status_code == 200, answer.text
            body: dict[str, Any] = answer.json()
            return body

        every = (await listing(token("root", "admin", ())))["conversations"]
        assert sorted(c["conversation_id"] for c in every) == sorted(ids)
        mine = token(convs=("team.*", "c1"))
        covered = [c for c in every if c["conversation_id"] in ("team.a", "team.b", "team.c", "c1")]
        assert (await listing(mine)) == {"conversations": covered, "next_before": None}
        # pages are full and meet: 3 + 1, then one at a time
        page1 = await listing(mine, limit=3)
        assert page1["conversations"] == covered[:3]
        page2 = await listing(mine, limit=3, before=page1["next_before"])
        assert page2 == {"conversations": covered[3:], "next_before": None}
        seen, cursor = [], None
        while True:
            page = await listing(mine, limit=1, **({"before": cursor} if cursor else {}))
            assert len(page["conversations"]) == 1
            seen += page["conversations"]
            cursor = page["next_before"]
            if cursor is None:
                break
        assert seen == covered
        # another conversation's cursor pages only through this token's conversations
        other_cursor = (await listing(token("root", "admin", ()), limit=1))["next_before"]
        rest = (await listing(mine, before=other_cursor))["conversations"]
        assert rest == [c for c in covered if c["conversation_id"] != every[0]["conversation_id"]]
        # no convs, or convs that match nothing: nothing is listed
        for convs in ((), ("nobody", "x*"), ("(.*)", "^.*$")):
            assert await listing(token(convs=convs)) == {"conversations": [], "next_before": None}
        assert (await listing(token(convs=("*",))))["conversations"] == every


async def _closed_with(url: str, first: dict[str, Any] | None = None) -> int | None:
    """Connect; send `first` if given; the close code the gateway answers with, or None
    when it answers with a frame that is not an error (the connection is served)."""
    async with websockets.connect(url, open_timeout=TIMEOUT) as ws:
        with contextlib.suppress(ConnectionClosed):  # a refusal may close it before `first`
            if first is not None:
                await ws.send(orjson.dumps(first).decode())
            async with asyncio.timeout(TIMEOUT):
                async for text in ws:
                    if orjson.loads(text)["type"] != "error":
                        return None
        return ws.close_code


# the close code on /ws/dashboard (admin) and /ws/runners (runner token), by case
OTHER_SOCKETS = {
    "missing": (4001, 4001),
    "malformed": (4001, 4001),
    "expired": (4001, 4001),
    "wrongly signed": (4001, 4001),
    "runner token": (4003, None),
    "other conversations": (4003, 4003),
    "user covering it": (4003, 4003),
    "admin": (None, 4003),
}


async def test_the_dashboard_needs_admin_and_runners_a_runner_token() -> None:
    hello = {"type": "hello", "runner": "echo", "supports_steering": True, "max_concurrency": 1}
    async with run_gateway(secret=SECRET) as gw:
        base = f"ws://127.0.0.1:{gw.port}/ws"
        for case, (tok, _) in CASES.items():
            query = "" if tok is None else f"?token={tok}"
            dashboard, runners = OTHER_SOCKETS[case]
            assert await _closed_with(f"{base}/dashboard{query}") == dashboard, case
            # a runner token is let in; its hello then names what it may announce
            code = await _closed_with(f"{base}/runners{query}", {**hello, "runner": "far-1"})
            assert code == (runners if runners is not None else 4003), case
        named = token("r", "runner", (), ("far-*",))
        assert (
            await _closed_with(f"{base}/runners?token={named}", {**hello, "runner": "far-1"})
            is None
        )
        assert (
            await _closed_with(f"{base}/runners?token={named}", {**hello, "runner": "near"}) == 4003
        )


async def test_the_header_works_on_the_websocket_and_the_subject_is_the_author() -> None:
    async with run_gateway(secret=SECRET) as gw:
        headers = {"authorization": f"Bearer {token('carol')}"}
        async with websockets.connect(
            gw.ws_url(CID, after=0), additional_headers=headers, open_timeout=TIMEOUT
        ) as ws:
            client = Client(ws)
            assert (await client.recv())["type"] == "ready"
            await client.message("x", "m1")
            assert (await expect(client, "user.message"))["author"] == "carol"
        async with gw.client() as http:
            answer = await http.post(
                "/api/conversations/team-z/messages",
                json={"client_msg_id": "m2", "text": "y"},
                headers={"authorization": f"Bearer {token('dave', convs=('team-z',))}"},
            )
            assert answer.status_code == 200
            events = (
                await http.get(
                    "/api/conversations/team-z/events?after=0",
                    headers={"authorization": f"Bearer {token('dave', convs=('team-z',))}"},
                )
            ).json()["events"]
            assert events[0]["author"] == "dave"


async def test_browser_origins_are_checked_with_or_without_a_secret() -> None:
    async with run_gateway() as gw:
        own = f"http://127.0.0.1:{gw.port}"
        async with websockets.connect(gw.ws_url("o1"), origin=own) as ws:
            assert orjson.loads(await ws.recv())["type"] == "ready"
        evil = "http://evil.example"
        async with websockets.connect(gw.ws_url("o1"), origin=evil) as ws:
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1008, "origin_refused")
    async with run_gateway(secret=SECRET, allowed_origins=["https://app.example"]) as gw:
        url = gw.ws_url("team-a", token=token())
        async with websockets.connect(url, origin="https://app.example") as ws:
            assert orjson.loads(await ws.recv())["type"] == "ready"
        async with websockets.connect(url, origin=f"http://127.0.0.1:{gw.port}") as ws:
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1008


# --------------------------------------------------------------------------- the command


def test_steerway_token_mints_a_token_the_gateway_accepts(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STEERWAY_SECRET", SECRET)
    assert (
        main(["token", "--sub", "alice", "--convs", "team-*", "--role", "user", "--ttl", "1h"]) == 0
    )
    minted = capsys.readouterr().out.strip()
    who = auth.verify(minted, SECRET)
    assert who == Principal("alice", "user", ("team-*",))
    exp = jwt.decode(minted, SECRET, algorithms=["HS256"])["exp"]
    assert 3590 <= exp - time.time() <= 3610
    assert (
        main(["token", "--sub", "r1", "--role", "runner", "--runners", "echo,gpu", "--ttl", "15m"])
        == 0
    )
    assert auth.verify(capsys.readouterr().out.strip(), SECRET).runners == ("echo", "gpu")
    with pytest.raises(SystemExit):
        main(["token", "--sub", "a", "--ttl", "soon"])
    monkeypatch.delenv("STEERWAY_SECRET")
    assert main(["token", "--sub", "alice"]) == 2
    assert "STEERWAY_SECRET" in capsys.readouterr().err


async def test_tokens_never_reach_the_logs_of_a_real_process() -> None:
    good, expired = token(), token(now=time.time() - 7200, ttl_s=60)
    proc = await spawn_gateway("--store", "memory", env={"STEERWAY_SECRET": SECRET})
    try:
        assert not any("no secret is configured" in line for line in proc.lines)
        base = f"{proc.ws}/ws/conversations/{CID}"
        async with websockets.connect(f"{base}?after=0&token={good}") as ws:
            assert orjson.loads(await ws.recv())["type"] == "ready"
        for bad in (expired, good + "x"):
            async with websockets.connect(f"{base}?token={bad}") as ws:
                with pytest.raises(ConnectionClosed):
                    await ws.recv()
        async with httpx.AsyncClient(base_url=proc.http, timeout=TIMEOUT) as http:
            answer = await http.get(f"/api/conversations/{CID}/events?token={expired}")
            assert answer.status_code == 401
            assert expired not in answer.text
    finally:
        assert await proc.terminate() == 0
    log = "".join(proc.lines)
    assert "[accepted]" in log  # uvicorn did log the requests, and their paths
    assert "[redacted]" in log
    for secret_text in (good, expired, SECRET):
        assert secret_text not in log
