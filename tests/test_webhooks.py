"""Webhooks (issue 15, item 1): settings, signing (checked with the verifier of
docs/webhooks.md), deliveries to a real receiving server (order per conversation,
retries, giving up, replay), a slow endpoint that never slows a conversation, the
admin REST endpoints, and deliveries that survive `kill -9` of a real gateway."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway import auth
from gateway.errors import ConfigError
from gateway.webhooks import signing
from gateway.webhooks.endpoints import EVENT_TYPES, load_endpoints
from gateway.webhooks.subscriptions import Subscriptions
from store.base import EventRecord, WriteBatch
from store.memory import MemoryStore
from tests.conftest import TIMEOUT, Gateway, run_gateway, serve_asgi
from tests.processes import reader, spawn_gateway

ROOT = Path(__file__).resolve().parent.parent
KEY = bytes(range(32))
SECRET = "whsec_" + base64.b64encode(KEY).decode()
ADMIN_SECRET = "steerway-test-secret-of-32-bytes-at-least"
FAST = {  # retries within tens of milliseconds
    "webhook_backoff_s": 0.02,
    "webhook_backoff_max_s": 0.1,
    "webhook_poll_s": 0.05,
    "webhook_timeout_s": 5,
}


def docs_verifier() -> Callable[..., bool]:
    """The verifier of docs/webhooks.md, run as it is written there."""
    text = (ROOT / "docs" / "webhooks.md").read_text()
    found = re.search(r"```python\n(.*?)```", text.split("## Verifying a delivery")[1], re.S)
    assert found is not None
    code = found.group(1)
    assert len(code.strip().splitlines()) <= 12  # "a ten-line verifier", imports aside
    scope: dict[str, Any] = {}
    exec(code, scope)
    verify: Callable[..., bool] = scope["verify"]
    return verify


# ----------------------------------------------------------------- the receiving server


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    status: int = 200

    @property
    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class Receiver:
    """A webhook endpoint that keeps every request; `answer` picks each one's status,
    `gate` (when set) holds every answer until it is set."""

    port: int = 0
    got: list[Received] = field(default_factory=list)
    answer: Callable[[Received], int] = lambda r: 200
    gate: asyncio.Event | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def handle(self, request: Request) -> Response:
        got = Received({k.lower(): v for k, v in request.headers.items()}, await request.body())
        got.status = self.answer(got)
        self.got.append(got)
        self._changed.set()
        if self.gate is not None:
            await self.gate.wait()
        return Response(b"" if got.status == 204 else b"ok", status_code=got.status)

    async def until(self, condition: Callable[[], bool], within: float = TIMEOUT) -> None:
        async with asyncio.timeout(within):
            while not condition():
                self._changed.clear()
                await self._changed.wait()

    def delivered(self) -> list[Received]:
        return [r for r in self.got if 200 <= r.status < 300]

    def per_conversation(self) -> dict[str, list[int]]:
        """The offsets each conversation's deliveries came with, as received."""
        out: dict[str, list[int]] = {}
        for r in self.got:
            data = r.json["data"]
            offset = 0 if r.json["type"] == "conversation.created" else data["offset"]
            out.setdefault(data["conversation_id"], []).append(offset)
        return out


@contextlib.asynccontextmanager
async def receiver() -> AsyncIterator[Receiver]:
    recv = Receiver()
    app = Starlette(routes=[Route("/hook", recv.handle, methods=["POST"])])
    async with serve_asgi(app) as server:
        recv.port = server.port
        try:
            yield recv
        finally:
            if recv.gate is not None:
                recv.gate.set()  # answer what is held, so that the server stops


def config(
    tmp_path: Path, url: str, events: tuple[str, ...] = EVENT_TYPES, name: str = "hook"
) -> str:
    path = tmp_path / "webhooks.toml"
    quoted = ", ".join(f'"{e}"' for e in events)
    path.write_text(f'[webhooks.{name}]\nurl = "{url}"\nsecret = "{SECRET}"\nevents = [{quoted}]\n')
    return str(path)


@contextlib.asynccontextmanager
async def hooked(tmp_path: Path, recv: Receiver, **settings: Any) -> AsyncIterator[Gateway]:
    async with run_gateway(
        webhooks_config=config(tmp_path, recv.url), **{**FAST, **settings}
    ) as gw:
        yield gw


async def chat(gw: Gateway, cid: str, *texts: str) -> None:
    """Send messages to a conversation, each once the run before it ended."""
    async with gw.connect(cid) as client:
        for n, text in enumerate(texts):
            await client.message(text, f"{cid}-{n}")
            await client.until_type("run.ended")


async def recorded(gw: Gateway, count: int) -> list[dict[str, Any]]:
    """The endpoint's deliveries once `count` of them are delivered or given up: the
    dispatcher records an answer after the receiver has counted it, and no event says
    when, so the store is looked at until then."""
    async with asyncio.timeout(TIMEOUT):
        while True:
            docs = await gw.store.list_deliveries("hook", 1000)
            if sum(d["status"] != "pending" for d in docs) >= count:
                return docs
            await asyncio.sleep(0.01)


def ended_runs(recv: Receiver, cid: str) -> int:
    return sum(
        r.json["type"] == "run.ended" and r.json["data"]["conversation_id"] == cid
        for r in recv.delivered()
    )


# ----------------------------------------------------------------------------- settings


def test_endpoints_from_a_file_and_the_environment(tmp_path: Path) -> None:
    path = config(tmp_path, "https://example.com/a", ("run.ended",), name="billing-1")
    env = {
        "STEERWAY_WEBHOOKS__BILLING_1__EVENTS": "run.started, message.completed run.started",
        "STEERWAY_WEBHOOKS__AUDIT__URL": "http://audit.local:8080/in?x=1",
        "STEERWAY_WEBHOOKS__AUDIT__SECRET": SECRET,
        "STEERWAY_WEBHOOKS__AUDIT__EVENTS": "conversation.created",
    }
    billing, audit = load_endpoints(path, env)
    assert (billing.name, billing.url) == ("billing-1", "https://example.com/a")
    assert billing.events == ("run.started", "message.completed")  # the environment wins
    assert billing.key == KEY
    assert (audit.name, audit.events) == ("audit", ("conversation.created",))
    assert SECRET not in repr(audit)
    assert load_endpoints(None, {}) == []


@pytest.mark.parametrize(
    ("toml", "env", "problems"),
    [
        (
            '[webhooks."bad name"]\nurl = "http://x/"\nevents = ["run.ended"]\n'
            f'secret = "{SECRET}"\n',
            {},
            ["[webhooks.bad name] name: String should match pattern '^[A-Za-z0-9_-]{1,64}$'"],
        ),
        (
            "[webhooks]\nhook = 3\n",
            {},
            ["STEERWAY_WEBHOOKS_CONFIG: 'F': [webhooks.hook] must be a table"],
        ),
        (
            "[other]\n",
            {},
            ["STEERWAY_WEBHOOKS_CONFIG: 'F': expected only [webhooks.<name>] tables"],
        ),
        (
            "",
            {
                "STEERWAY_WEBHOOKS__H__URL": "http://x/",
                "STEERWAY_WEBHOOKS__H__SECRET": SECRET,
                "STEERWAY_WEBHOOKS__H__EVENTS": " , ",
            },
            ["[webhooks.h] events: name at least one of " + ", ".join(EVENT_TYPES)],
        ),
        (
            "",
            {
                "STEERWAY_WEBHOOKS__H__URL": "http://x/",
                "STEERWAY_WEBHOOKS__H__SECRET": "whsec_" + base64.b64encode(b"x" * 65).decode(),
                "STEERWAY_WEBHOOKS__H__EVENTS": "run.ended",
                "STEERWAY_WEBHOOKS__H__URLS": "http://y/",
            },
            [
                "STEERWAY_WEBHOOKS__H__URLS: expected STEERWAY_WEBHOOKS__<NAME>__URL, __SECRET "
                "or __EVENTS"
            ],
        ),
        (
            "",
            {
                "STEERWAY_WEBHOOKS__H__URL": "http://x/",
                "STEERWAY_WEBHOOKS__H__SECRET": "whsec_" + base64.b64encode(b"x" * 65).decode(),
                "STEERWAY_WEBHOOKS__H__EVENTS": "run.ended",
            },
            ["[webhooks.h] secret: the key must be 24 to 64 bytes, not 65"],
        ),
    ],
)
def test_bad_endpoints_are_config_errors(
    tmp_path: Path, toml: str, env: dict[str, str], problems: list[str]
) -> None:
    path = tmp_path / "F"
    path.write_text(toml)
    with pytest.raises(ConfigError) as caught:
        load_endpoints(path, env)
    assert [p.replace(str(path), "F") for p in caught.value.problems] == problems


# ------------------------------------------------------------------- signing, body, order


async def test_deliveries_are_signed_and_verified_by_the_documented_verifier(
    tmp_path: Path,
) -> None:
    verify = docs_verifier()
    async with receiver() as recv, hooked(tmp_path, recv) as gw:
        await chat(gw, "c1", "hello there")
        await recv.until(lambda: ended_runs(recv, "c1") == 1)
        stored = [orjson.loads(p) for p in await gw.store.read_events("c1", 0, 1000)]
    kinds = [r.json["type"] for r in recv.got]
    assert kinds == ["conversation.created", "run.started", "message.completed", "run.ended"]
    for r in recv.got:
        assert verify(SECRET, r.headers, r.body)
        assert r.headers["content-type"] == "application/json"
        assert abs(int(r.headers["webhook-timestamp"]) - time.time()) < 60
        tampered = r.body.replace(b"c1", b"c2")
        assert not verify(SECRET, r.headers, tampered)
        other = "whsec_" + base64.b64encode(b"y" * 32).decode()
        assert not verify(other, r.headers, r.body)
        old = {**r.headers, "webhook-timestamp": str(int(time.time()) - 3600)}
        old["webhook-signature"] = signing.signature(
            KEY, r.headers["webhook-id"], int(old["webhook-timestamp"]), r.body
        )
        assert not verify(SECRET, old, r.body)  # signed, but an hour old: a replay
    first, *rest = recv.got
    # conversation.created carries the first event; the others their own, as stored
    assert first.json["data"] == stored[0]
    assert first.headers["webhook-id"] == "hook:c1:0"
    for r in rest:
        data = r.json["data"]
        assert data == stored[data["offset"] - 1]
        assert r.headers["webhook-id"] == f"hook:c1:{data['offset']}"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", r.json["timestamp"])


async def test_only_the_subscribed_types_are_delivered(tmp_path: Path) -> None:
    async with receiver() as recv:
        url = config(tmp_path, recv.url, ("run.ended",))
        async with run_gateway(webhooks_config=url, **FAST) as gw:
            await chat(gw, "c1", "one", "two")
            await recv.until(lambda: len(recv.got) == 2)
    assert [r.json["type"] for r in recv.got] == ["run.ended", "run.ended"]


async def test_order_per_conversation_with_a_failing_then_recovering_endpoint(
    tmp_path: Path,
) -> None:
    """The endpoint fails its first 12 requests (500): each delivery is retried, with
    backoff, and no conversation's delivery overtakes an earlier one."""
    failures = 12

    def answer(r: Received) -> int:
        return 500 if len(recv.got) < failures else 204

    async with receiver() as recv, hooked(tmp_path, recv) as gw:
        recv.answer = answer
        await asyncio.gather(*(chat(gw, f"c{n}", "a b", "c d", "e f") for n in range(3)))
        await recv.until(lambda: all(ended_runs(recv, f"c{n}") == 3 for n in range(3)))
        docs = await recorded(gw, 3 * (1 + 3 * 3))
    assert sum(r.status == 500 for r in recv.got) == failures
    for cid, offsets in recv.per_conversation().items():
        delivered = [
            0 if r.json["type"] == "conversation.created" else r.json["data"]["offset"]
            for r in recv.delivered()
            if r.json["data"]["conversation_id"] == cid
        ]
        assert delivered == sorted(delivered), (cid, delivered)
        assert len(delivered) == len(set(delivered)) == 1 + 3 * 3
        assert offsets == sorted(offsets), (cid, offsets)  # a retry repeats, never jumps
    assert all(d["status"] == "delivered" for d in docs)
    retried = [d for d in docs if d["attempts"] > 1]
    assert sum(d["attempts"] - 1 for d in docs) == failures
    assert all(d["last_status"] == 204 and d["last_error"] is None for d in retried)


async def test_a_410_gives_up_at_once_and_a_failing_one_after_the_give_up_time(
    tmp_path: Path,
) -> None:
    def answer(r: Received) -> int:
        if r.json["type"] == "conversation.created":
            return 410
        return 503 if r.json["type"] == "run.started" else 200

    async with receiver() as recv, hooked(tmp_path, recv, webhook_give_up_s=0.3) as gw:
        recv.answer = answer
        await chat(gw, "c1", "hi")
        await recv.until(lambda: ended_runs(recv, "c1") == 1)
        failed = [d for d in await recorded(gw, 4) if d["status"] == "failed"]
    kinds = [r.json["type"] for r in recv.got]
    assert kinds.count("conversation.created") == 1  # 410: never again
    assert kinds.count("run.started") > 1  # retried until given up, then the rest went
    assert kinds[-2:] == ["message.completed", "run.ended"]
    by_type = {d["type"]: d for d in failed}
    assert set(by_type) == {"conversation.created", "run.started"}
    assert by_type["conversation.created"]["attempts"] == 1
    assert by_type["conversation.created"]["last_status"] == 410
    assert by_type["run.started"]["last_error"] == "HTTP 503"


async def test_an_endpoint_that_does_not_answer_never_slows_a_conversation(
    tmp_path: Path,
) -> None:
    async with receiver() as recv, hooked(tmp_path, recv, webhook_timeout_s=30) as gw:
        recv.gate = asyncio.Event()  # the endpoint holds every request
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.gather(*(chat(gw, f"c{n}", "a", "b", "c") for n in range(4)))
        elapsed = loop.time() - started
        await recv.until(lambda: len(recv.got) == 4)  # one per conversation, each held
        assert elapsed < 5  # nothing waited for the 30 s the endpoint may take
        assert len(recv.got) == 4  # and the rest of each queue waits for its head
        recv.gate.set()
        await recv.until(lambda: all(ended_runs(recv, f"c{n}") == 3 for n in range(4)))


async def test_a_delivery_left_out_by_a_crash_is_written_when_the_conversation_loads(
    tmp_path: Path,
) -> None:
    """Events stored, the process killed before their deliveries: the conversation's
    next load writes them from the events ahead of its document."""
    store = MemoryStore()
    payload = orjson.dumps(
        {"type": "run.ended", "offset": 1, "ts": 1000, "conversation_id": "c1", "run_id": "r"}
    ).decode()
    await store.write(WriteBatch(events=[EventRecord("c1", 1, "run.ended", 1000, payload, "r")]))
    async with receiver() as recv:
        url = config(tmp_path, recv.url, ("run.ended",))
        async with (
            run_gateway(store=store, webhooks_config=url, **FAST) as gw,
            gw.connect("c1"),
        ):
            await recv.until(lambda: len(recv.got) == 1)
    assert recv.got[0].json["data"] == orjson.loads(payload)


def test_subscriptions_build_deliveries_in_offset_order() -> None:
    (endpoint,) = load_endpoints(
        None,
        {
            "STEERWAY_WEBHOOKS__H__URL": "http://x/",
            "STEERWAY_WEBHOOKS__H__SECRET": SECRET,
            "STEERWAY_WEBHOOKS__H__EVENTS": "conversation.created,run.started",
        },
    )
    events = [
        EventRecord("c", 1, "user.message", 0, '{"a":"é"}'),
        EventRecord("c", 2, "run.started", 1_700_000_000_123, "{}"),
    ]
    first, second = Subscriptions([endpoint]).deliveries(events)
    assert (first.id, first.type, first.offset) == ("h:c:0", "conversation.created", 0)
    assert (
        first.body
        == '{"type":"conversation.created","timestamp":"1970-01-01T00:00:00.000Z","data":{"a":"é"}}'
    )
    assert (second.id, second.type) == ("h:c:2", "run.started")
    assert orjson.loads(second.body)["timestamp"] == "2023-11-14T22:13:20.123Z"


# ------------------------------------------------------------------------- REST, replay


async def test_the_admin_sees_deliveries_and_replays_one(tmp_path: Path) -> None:
    async with (
        receiver() as recv,
        hooked(tmp_path, recv, secret=ADMIN_SECRET, webhook_give_up_s=0.2) as gw,
    ):
        recv.answer = lambda r: 500 if r.json["type"] == "run.started" else 200
        admin = {"authorization": f"Bearer {auth.mint(ADMIN_SECRET, 'ops', 'admin', 60)}"}
        user = {"authorization": f"Bearer {auth.mint(ADMIN_SECRET, 'u', 'user', 60)}"}
        async with gw.client() as http:
            ack = await http.post(
                "/api/conversations/c1/messages",
                json={"client_msg_id": "k1", "text": "hi"},
                headers=admin,
            )
            assert ack.status_code == 200
            await recv.until(lambda: ended_runs(recv, "c1") == 1)
            listing = (await http.get("/api/webhooks", headers=admin)).json()
            (endpoint,) = listing["endpoints"]
            assert (endpoint["name"], endpoint["url"]) == ("hook", recv.url)
            assert endpoint["events"] == list(EVENT_TYPES)
            assert "secret" not in endpoint
            assert [d["status"] for d in endpoint["deliveries"]].count("delivered") == 3
            (failure,) = endpoint["failures"]
            assert failure["delivery_id"] == f"hook:c1:{failure['offset']}"
            assert (failure["type"], failure["last_error"]) == ("run.started", "HTTP 500")
            assert "body" not in failure
            page = (await http.get("/api/webhooks?limit=1", headers=admin)).json()
            assert len(page["endpoints"][0]["deliveries"]) == 1

            recv.answer = lambda r: 200
            tries = len(recv.got)
            replay = f"/api/webhooks/deliveries/{failure['delivery_id']}/replay"
            answer = await http.post(replay, headers=admin)
            assert answer.status_code == 202
            assert answer.json()["delivery"]["status"] == "pending"
            await recv.until(lambda: len(recv.got) == tries + 1)
            again = recv.got[-1]
            assert again.headers["webhook-id"] == failure["delivery_id"]  # the same key
            assert again.json["type"] == "run.started"
            # refusals, answered as elsewhere
            assert (await http.get("/api/webhooks", headers=user)).status_code == 403
            assert (await http.post(replay, headers=user)).status_code == 403
            assert (await http.get("/api/webhooks")).status_code == 401
            for unknown in ("hook:c9:1", "nohook:c1:1", "x" * 2000, "hook"):
                missing = await http.post(
                    f"/api/webhooks/deliveries/{unknown}/replay", headers=admin
                )
                assert missing.status_code == 404
                assert missing.json()["error"]["code"] == "not_found"
            bad = await http.get("/api/webhooks?limit=lots", headers=admin)
            assert bad.status_code == 400
            assert (await http.get(replay, headers=admin)).status_code == 404  # as elsewhere
        docs = {d["_id"]: d for d in await recorded(gw, 4)}
    assert docs[failure["delivery_id"]]["status"] == "delivered"


async def test_no_endpoints_configured(gw: Gateway) -> None:
    async with gw.client() as http:
        assert (await http.get("/api/webhooks")).json() == {"endpoints": []}
        missing = await http.post("/api/webhooks/deliveries/hook:c1:1/replay")
        assert missing.status_code == 404


# ----------------------------------------------------------------------------- kill -9


async def test_deliveries_survive_kill_9_of_the_gateway(tmp_path: Path) -> None:
    """A real gateway on the embedded store, deliveries in flight (the endpoint holds
    them), `kill -9`, a restart on the same data: every event is delivered at least
    once, in order per conversation, as the receiving server counts."""
    conversations = [f"k{n}" for n in range(3)]
    async with receiver() as recv:
        recv.gate = asyncio.Event()
        env = {
            "STEERWAY_WEBHOOKS_CONFIG": config(tmp_path, recv.url),
            "STEERWAY_DATA_DIR": str(tmp_path / "data"),
            "STEERWAY_ECHO_DELAY_MS": "1",
            "STEERWAY_WEBHOOK_TIMEOUT_S": "1",  # a lease of 11 s: the restart waits it out
            "STEERWAY_WEBHOOK_BACKOFF_S": "0.05",
            "STEERWAY_WEBHOOK_BACKOFF_MAX_S": "0.2",
            "STEERWAY_WEBHOOK_POLL_S": "0.1",
        }
        first = await spawn_gateway(env=env)
        try:
            for cid in conversations:
                async with reader(first, cid, 0) as r:
                    for n in range(2):
                        ack = await r.send("one two", f"{cid}-{n}")
                        await r.until("run.ended", run_id=ack["run_id"])
            await recv.until(lambda: len(recv.got) >= len(conversations))  # in flight
        finally:
            await first.kill()
        recv.gate.set()
        held = len(recv.got)
        second = await spawn_gateway(env=env)
        try:
            expected = 1 + 2 * 3  # created, then started/completed/ended of two runs
            await recv.until(
                lambda: all(
                    len(set(recv.per_conversation().get(cid, []))) == expected
                    for cid in conversations
                ),
                within=40,
            )
        finally:
            assert await second.terminate() == 0
    assert held == len(conversations)  # only the heads went before the kill
    for cid, offsets in recv.per_conversation().items():
        # at least once: the head held when the gateway died is sent again; in order
        assert offsets.count(0) == 2, (cid, offsets)
        assert offsets == sorted(offsets), (cid, offsets)
        for r in recv.got:
            assert (
                signing.signature(
                    KEY, r.headers["webhook-id"], int(r.headers["webhook-timestamp"]), r.body
                )
                == r.headers["webhook-signature"]
            )
