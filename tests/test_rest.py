"""REST, PROTOCOL.md section 8 (issue 3, item 8), over the real server.

POST .../messages routes exactly like the WebSocket and shares its idempotency
keys; every error status of section 8; events, transcript, conversation and run
listings with their pagination; run documents and cancel; health and readiness.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.conftest import Gateway, run_gateway
from tests.helpers import PULL, Fed, delta, event_texts, expect, run_completed

ACK_KEYS = {"type", "client_msg_id", "offset", "message_id", "route", "run_id", "duplicate"}


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str)
    assert body["error"]["message"]


async def post(http: httpx.AsyncClient, cid: str, body: Any) -> httpx.Response:
    return await http.post(f"/api/conversations/{cid}/messages", json=body)


async def post_ack(http: httpx.AsyncClient, cid: str, body: Any) -> dict[str, Any]:
    response = await post(http, cid, body)
    assert response.status_code == 200, response.text
    ack: dict[str, Any] = response.json()
    assert set(ack) == ACK_KEYS
    assert ack["type"] == "ack"
    return ack


# --------------------------------------------------------------------------- POST messages

LARGEST_BODY = 32_768 * 12 + 16_384 * 6 + 4096  # rest.body_limit of the default settings


async def test_the_largest_legal_message_is_taken() -> None:
    """Issue 11, item 3: the text counts characters, whatever bytes they take; the body
    limit admits the largest legal message however it is escaped, and no more."""
    async with run_gateway() as gw, gw.client() as http:
        url = "/api/conversations/big/messages"
        ack = await post_ack(http, "big", {"client_msg_id": "two", "text": "é" * 32_768})
        assert ack["route"] == "run"
        assert_error(
            await post(http, "big", {"client_msg_id": "two+", "text": "é" * 32_769}),
            413,
            "text_too_long",
        )
        # 32,768 four-byte characters, every one escaped as a surrogate pair (12 bytes),
        # and 16 KiB of metadata as compact JSON, escaped too (6 bytes for each byte)
        metadata = {"m": "a" * (16_384 - len('{"m":""}'))}
        body = {
            "client_msg_id": "four",
            "text": "\U0001f600" * 32_768,
            "metadata": metadata,
        }
        raw = json.dumps(body, ensure_ascii=True).encode()
        raw = raw.replace(b"a", b"\\u0061")  # the longest spelling of ASCII
        assert 32_768 * 12 + 16_000 * 6 < len(raw) <= LARGEST_BODY
        response = await http.post(url, content=raw)
        assert response.status_code == 200, response.text
        events = (await http.get("/api/conversations/big/events")).json()["events"]
        stored = [e for e in events if e.get("client_msg_id") == "four"]
        assert stored[0]["text"] == "\U0001f600" * 32_768
        assert stored[0]["metadata"] == metadata
        # one byte over the limit, declared or streamed: 413 before anything is parsed
        over = b"{" + b" " * (LARGEST_BODY - 1) + b"}"

        async def chunks() -> Any:
            for start in range(0, len(over), 65_536):
                yield over[start : start + 65_536]

        for content in (over, chunks()):
            response = await http.post(url, content=content)
            assert_error(response, 413, "text_too_long")
            assert f"request body over {LARGEST_BODY} bytes" in response.json()["error"]["message"]
        # at the limit, whitespace is only whitespace: the body is parsed (and incomplete)
        at = b"{" + b" " * (LARGEST_BODY - 2) + b"}"
        assert_error(await http.post(url, content=at), 400, "invalid_frame")
        events = (await http.get("/api/conversations/big/events")).json()["events"]
        keys = [e["client_msg_id"] for e in events if e["type"] == "user.message"]
        assert keys == ["two", "four"]  # nothing else was stored


async def test_post_message_routes_like_the_websocket() -> None:
    fed = Fed()
    async with (
        run_gateway(runners=[fed]) as gw,
        gw.connect("route", after=0) as ws,
        gw.client() as http,
    ):
        run = await post_ack(http, "route", {"client_msg_id": "r1", "text": "go", "runner": "fed"})
        assert (run["route"], run["offset"], run["duplicate"]) == ("run", 1, False)
        stored = await expect(ws, "user.message", client_msg_id="r1")
        assert stored == {
            "type": "user.message",
            "offset": 1,
            "ts": stored["ts"],
            "conversation_id": "route",
            "run_id": run["run_id"],
            "message_id": run["message_id"],
            "client_msg_id": "r1",
            "text": "go",
            "route": "run",
            "author": "anonymous",
        }
        started = await expect(ws, "run.started", run_id=run["run_id"])
        assert (started["offset"], started["runner"]) == (2, "fed")

        steer = await post_ack(
            http, "route", {"type": "message", "client_msg_id": "r2", "text": "s"}
        )
        assert (steer["route"], steer["run_id"], steer["offset"]) == ("steer", run["run_id"], 3)
        meta = {"source": "rest", "n": [1, 2]}
        queue = await post_ack(
            http, "route", {"client_msg_id": "r3", "text": "q", "mode": "queue", "metadata": meta}
        )
        assert (queue["route"], queue["offset"]) == ("queue", 4)
        assert queue["run_id"] != run["run_id"]
        assert (await expect(ws, "user.message", client_msg_id="r3"))["metadata"] == meta
        queued = await expect(ws, "run.queued", run_id=queue["run_id"])
        assert (queued["offset"], queued["position"]) == (5, 1)

        # a resend, whatever its text, returns the first ack with duplicate true
        again = await post_ack(
            http, "route", {"client_msg_id": "r1", "text": "other", "mode": "queue"}
        )
        assert again == {**run, "duplicate": True}
        # keys are shared with the WebSocket, both ways
        await ws.message("whatever", "r2")
        dup = await expect(ws, "ack", client_msg_id="r2")
        assert dup == {**steer, "duplicate": True}
        await ws.message("from ws", "w1", mode="queue")
        w1 = await expect(ws, "ack", client_msg_id="w1")
        assert await post_ack(http, "route", {"client_msg_id": "w1", "text": "x"}) == {
            **w1,
            "duplicate": True,
        }

        # interrupt: the active run is cancelled, the new one starts at once
        interrupt = await post_ack(
            http, "route", {"client_msg_id": "r4", "text": "stop", "mode": "interrupt"}
        )
        assert interrupt["route"] == "interrupt"
        ended = await expect(ws, "run.ended", run_id=run["run_id"])
        assert (ended["status"], ended["reason"]) == ("cancelled", "interrupted")
        dropped = await expect(ws, "steering.dropped", run_id=run["run_id"])
        assert (dropped["message_ids"], dropped["reason"]) == ([steer["message_id"]], "cancelled")
        await expect(ws, "run.started", run_id=interrupt["run_id"])
        offsets = [f["offset"] for f in ws.events()]
        assert offsets == list(range(1, len(offsets) + 1))
        # nothing but the WebSocket's own acks went to the WebSocket client
        assert {f["client_msg_id"] for f in ws.frames if f["type"] == "ack"} == {"r2", "w1"}

        # a body of another type is refused
        for body in ({"type": "ping"}, {"type": "cancel"}, {"type": "cancel", "run_id": "x"}):
            assert_error(await post(http, "route", body), 400, "invalid_frame")
        fed.put(run_completed())
        await expect(ws, "run.ended", run_id=interrupt["run_id"])


async def test_post_message_errors() -> None:
    plain = Fed("plain", supports_steering=False)
    async with run_gateway(runners=[plain]) as gw, gw.client() as http:
        url = "/api/conversations/err/messages"
        for raw in (b"{", b"", b"not json", b'{"client_msg_id": "m1",}'):
            response = await http.post(url, content=raw)
            assert_error(response, 400, "invalid_json")
        for raw in (b"null", b"1", b'"message"'):
            response = await http.post(url, content=raw)
            assert_error(response, 400, "invalid_frame")
        for body in (
            [],
            "text",
            {"text": "hi"},
            {"client_msg_id": "m1"},
            {"client_msg_id": "m1", "text": ""},
            {"client_msg_id": "m1", "text": 5},
            {"client_msg_id": "m1", "text": "hi", "extra": 1},
            {"client_msg_id": "m1", "text": "hi", "mode": "bogus"},
            {"client_msg_id": "bad id", "text": "hi"},
            {"client_msg_id": "m" * 65, "text": "hi"},
            {"client_msg_id": "m1", "text": "hi", "metadata": {"k": "x" * 16_377}},
            {"type": "shout", "client_msg_id": "m1", "text": "hi"},
        ):
            assert_error(await post(http, "err", body), 400, "invalid_frame")
        for cid in ("-x", "x" * 129, "a%20b", "%C3%A9"):
            response = await http.post(
                f"/api/conversations/{cid}/messages", json={"client_msg_id": "m", "text": "hi"}
            )
            assert_error(response, 400, "invalid_frame")
        assert_error(
            await post(http, "err", {"client_msg_id": "m1", "text": "x" * 32_769}),
            413,
            "text_too_long",
        )
        assert_error(
            await post(http, "err", {"client_msg_id": "m1", "text": "hi", "runner": "nope"}),
            503,
            "runner_unavailable",
        )
        # nothing was stored by any of these: the key is free, the conversation new
        events = (await http.get("/api/conversations/err/events")).json()
        assert events == {"events": [], "head": 0}
        ok = await post_ack(http, "err", {"client_msg_id": "m1", "text": "x" * 32_768})
        assert (ok["offset"], ok["duplicate"]) == (1, False)

        # a runner that cannot steer
        active = await post_ack(
            http, "plain", {"client_msg_id": "p0", "text": "go", "runner": "plain"}
        )
        assert_error(
            await post(http, "plain", {"client_msg_id": "p1", "text": "s", "mode": "steer"}),
            503,
            "runner_unavailable",
        )
        # 16 queued runs, then queue_full (auto queues too, as it cannot steer)
        for i in range(16):
            ack = await post_ack(http, "plain", {"client_msg_id": f"q{i}", "text": "q"})
            assert ack["route"] == "queue"
        for mode in ("queue", "auto"):
            assert_error(
                await post(http, "plain", {"client_msg_id": "q16", "text": "q", "mode": mode}),
                409,
                "queue_full",
            )
        # the store is down: internal, for a known and a new conversation
        gw.store.fail = True
        try:
            for cid in ("plain", "brand-new"):
                assert_error(
                    await post(http, cid, {"client_msg_id": "z", "text": "z", "mode": "queue"}),
                    503,
                    "internal",
                )
            assert_error(await http.get("/api/conversations/plain/events"), 503, "internal")
        finally:
            gw.store.fail = False
        head = (await http.get("/api/conversations/plain/events?limit=1")).json()["head"]
        assert head == 2 + 2 * 16  # run p0 (user.message, run.started), 16 x (message, queued)
        assert (await http.get("/api/conversations/brand-new/events")).json()["head"] == 0
        # cancel every run: the cancel of an ended run is 409, of an unknown one 404
        cancel = await http.post(f"/api/runs/{active['run_id']}/cancel")
        assert cancel.status_code == 202
        assert cancel.json() == {"run_id": active["run_id"], "status": "cancelled"}
        assert_error(await http.post(f"/api/runs/{active['run_id']}/cancel"), 409, "no_active_run")
        assert_error(await http.post("/api/runs/run_nope/cancel"), 404, "unknown_run")
        assert_error(await http.get("/api/runs/run_nope"), 404, "unknown_run")
        doc = (await http.get(f"/api/runs/{active['run_id']}")).json()
        assert (doc["status"], doc["reason"]) == ("cancelled", "cancel_requested")
        runs = (await http.get("/api/runs", params={"conversation_id": "plain"})).json()["runs"]
        for run in runs:
            if run["status"] in ("queued", "running"):
                assert (await http.post(f"/api/runs/{run['run_id']}/cancel")).status_code == 202


async def test_bad_query_parameters_and_unknown_paths(gw: Gateway) -> None:
    async with gw.client() as http:
        bad = [
            "/api/conversations/c1/events?after=-1",
            "/api/conversations/c1/events?after=x",
            "/api/conversations/c1/events?after=1.5",
            "/api/conversations/c1/events?after=",
            "/api/conversations/c1/events?limit=0",
            "/api/conversations/c1/events?limit=-1",
            "/api/conversations/c1/events?limit=x",
            "/api/conversations/-c1/events",
            "/api/conversations/-c1/transcript",
            "/api/conversations?limit=0",
            "/api/conversations?limit=1.5",
            "/api/conversations?before=garbage",
            "/api/conversations?before=WzFd",  # base64 of [1]: not a cursor of ours
            "/api/runs?limit=0",
            "/api/runs?before=%%%",
            "/api/runs?before=WzFd",
            "/api/conversations/c1/transcript?before=ImEi",  # base64 of "a": not an offset
            "/api/conversations/c1/transcript?before=dHJ1ZQ==",  # base64 of true
            "/api/conversations/c1/transcript?limit=0",
            "/api/runs?status=bogus",
            "/api/runs?conversation_id=-x",
        ]
        for path in bad:
            assert_error(await http.get(path), 400, "invalid_frame")
        for method, path in (
            ("GET", "/api/nope"),
            ("GET", "/api/conversations/c1"),
            ("POST", "/api/conversations/c1/nope"),
            ("DELETE", "/api/runs/x/y/z"),
        ):
            assert_error(await http.request(method, path), 404, "not_found")


# --------------------------------------------------------------------------- reading


async def test_events_transcript_and_unknown_conversations(gw: Gateway) -> None:
    async with gw.connect("read", after=0) as ws, gw.client() as http:
        assert (await http.get("/api/conversations/never/events")).json() == {
            "events": [],
            "head": 0,
        }
        assert (await http.get("/api/conversations/never/transcript")).json() == {
            "turns": [],
            "next_before": None,
        }
        await ws.message("hello  world", "m1")
        first = await expect(ws, "ack", client_msg_id="m1")
        await expect(ws, "run.ended", run_id=first["run_id"])
        second = await post_ack(http, "read", {"client_msg_id": "m2", "text": "again"})
        await expect(ws, "run.ended", run_id=second["run_id"])
        texts = event_texts(ws)
        head = len(texts)
        assert head == 13  # 2 x (user.message, run.started, message.completed, run.ended) + 5

        # the very bytes the WebSocket client received
        response = await http.get("/api/conversations/read/events")
        assert response.content == (
            b'{"events":[' + ",".join(texts).encode() + b'],"head":%d}' % head
        )
        window = (await http.get("/api/conversations/read/events?after=3&limit=4")).json()
        assert [e["offset"] for e in window["events"]] == [4, 5, 6, 7]
        assert window["head"] == head
        tail = (await http.get(f"/api/conversations/read/events?after={head - 1}")).json()
        assert [e["offset"] for e in tail["events"]] == [head]
        beyond = (await http.get("/api/conversations/read/events?after=1000")).json()
        assert beyond == {"events": [], "head": head}

        events = ws.events()
        users = [e for e in events if e["type"] == "user.message"]
        replies = [e for e in events if e["type"] == "message.completed"]
        transcript = (await http.get("/api/conversations/read/transcript")).json()
        assert transcript["next_before"] is None
        turns = transcript["turns"]
        assert turns == [
            {
                "role": "user",
                "content": "hello  world",
                "message_id": users[0]["message_id"],
                "run_id": first["run_id"],
                "ts": users[0]["ts"],
            },
            {
                "role": "assistant",
                "content": "echo: hello world",
                "message_id": replies[0]["message_id"],
                "run_id": first["run_id"],
                "ts": replies[0]["ts"],
            },
            {
                "role": "user",
                "content": "again",
                "message_id": second["message_id"],
                "run_id": second["run_id"],
                "ts": users[1]["ts"],
            },
            {
                "role": "assistant",
                "content": "echo: again",
                "message_id": replies[1]["message_id"],
                "run_id": second["run_id"],
                "ts": replies[1]["ts"],
            },
        ]


async def test_transcript_pages_back_from_the_newest_turns(gw: Gateway) -> None:
    async with gw.client() as http:
        for n in range(3):  # 3 runs: 6 turns
            ack = await post_ack(http, "pages", {"client_msg_id": f"m{n}", "text": f"t{n}"})
            async with gw.connect("pages", after=0) as ws:
                await expect(ws, "run.ended", run_id=ack["run_id"])
        url = "/api/conversations/pages/transcript"
        everything = (await http.get(url)).json()
        assert [t["content"] for t in everything["turns"]] == [
            "t0", "echo: t0", "t1", "echo: t1", "t2", "echo: t2"
        ]  # fmt: skip
        seen: list[str] = []
        cursor = None
        while True:  # newest page first, each page in order
            page = (
                await http.get(url, params={"limit": 4, **({"before": cursor} if cursor else {})})
            ).json()
            seen = [t["content"] for t in page["turns"]] + seen
            cursor = page["next_before"]
            if cursor is None:
                break
        assert seen == [t["content"] for t in everything["turns"]]
        first = (await http.get(url, params={"limit": 4})).json()
        assert [t["content"] for t in first["turns"]] == ["t1", "echo: t1", "t2", "echo: t2"]
        clamped = (await http.get(url, params={"limit": 10**9})).json()
        assert clamped == everything


async def test_events_limit_default_500_and_clamped_to_5000() -> None:
    fed = Fed()
    fed.put(*(delta(str(i)) for i in range(5_100)), run_completed())
    async with run_gateway(runners=[fed]) as gw, gw.client() as http:
        ack = await post_ack(http, "many", {"client_msg_id": "m1", "text": "go", "runner": "fed"})
        async with gw.connect("many", after=5_102) as ws:  # from just before the end
            await expect(ws, "run.ended", run_id=ack["run_id"])
        url = "/api/conversations/many/events"
        default = (await http.get(url)).json()
        assert default["head"] == 5_103  # user.message, run.started, 5,100 deltas, run.ended
        assert [e["offset"] for e in default["events"]] == list(range(1, 501))
        clamped = (await http.get(url, params={"limit": 100_000})).json()
        assert [e["offset"] for e in clamped["events"]] == list(range(1, 5_001))
        assert [e["delta"] for e in clamped["events"][2:5]] == ["0", "1", "2"]
        rest = (await http.get(url, params={"after": 5_000, "limit": 5_000})).json()
        assert [e["offset"] for e in rest["events"]] == list(range(5_001, 5_104))
        assert rest["events"][-1]["type"] == "run.ended"


async def test_conversations_most_recently_active_first_with_pagination() -> None:
    # Each echo run of two words takes at least 2 x 3 ms: activities are distinct.
    async with run_gateway(echo_delay_ms=3) as gw, gw.client() as http:

        async def talk(cid: str, cmid: str) -> dict[str, Any]:
            async with gw.connect(cid) as ws:
                await ws.message("x y", cmid)
                ack = await expect(ws, "ack", client_msg_id=cmid)
                await expect(ws, "run.ended", run_id=ack["run_id"])
                return ack

        assert (await http.get("/api/conversations")).json() == {
            "conversations": [],
            "next_before": None,
        }
        # created in the order c, b, a: the listing is not in id order
        for cid in ("conv-c", "conv-b", "conv-a"):
            await talk(cid, "m1")

        async def listing(**params: Any) -> dict[str, Any]:
            response = await http.get("/api/conversations", params=params)
            assert response.status_code == 200, response.text
            body: dict[str, Any] = response.json()
            return body

        everything = await listing()
        assert [c["conversation_id"] for c in everything["conversations"]] == [
            "conv-a",
            "conv-b",
            "conv-c",
        ]
        assert everything["next_before"] is None
        item = everything["conversations"][0]
        assert set(item) == {"conversation_id", "head", "last_activity", "active_run"}
        assert (item["head"], item["active_run"]) == (7, None)

        await talk("conv-c", "m2")  # conv-c is now the most recently active
        order = ["conv-c", "conv-a", "conv-b"]
        page1 = await listing(limit=2)
        assert [c["conversation_id"] for c in page1["conversations"]] == order[:2]
        assert page1["conversations"][0]["head"] == 14
        assert isinstance(page1["next_before"], str)
        page2 = await listing(limit=2, before=page1["next_before"])
        assert [c["conversation_id"] for c in page2["conversations"]] == order[2:]
        assert page2["next_before"] is None
        assert (await listing(limit=3))["next_before"] is None
        seen, cursor = [], None
        while True:
            page = await listing(limit=1, **({"before": cursor} if cursor else {}))
            seen += [c["conversation_id"] for c in page["conversations"]]
            cursor = page["next_before"]
            if cursor is None:
                break
        assert seen == order
        activity = [c["last_activity"] for c in (await listing())["conversations"]]
        assert activity == sorted(activity, reverse=True)
        assert len(set(activity)) == 3

        # a conversation with a run in progress shows it
        async with gw.connect("conv-live", after=0) as ws:
            await ws.message("/sleep 600", "m1")
            ack = await expect(ws, "ack", client_msg_id="m1")
            await expect(ws, "run.started", run_id=ack["run_id"])
            live = (await listing(limit=1))["conversations"][0]
            assert live["conversation_id"] == "conv-live"
            assert live["active_run"] == {
                "run_id": ack["run_id"],
                "status": "running",
                "runner": "echo",
            }
            await ws.send({"type": "cancel"})
            await expect(ws, "run.ended", run_id=ack["run_id"])
        live = (await listing(limit=1))["conversations"][0]
        assert (live["conversation_id"], live["active_run"]) == ("conv-live", None)


def _ms(run_id: str) -> int:
    return int(run_id.split("_", 1)[1][:12], 16)


async def test_runs_listing_filters_and_pagination() -> None:
    fed = Fed()
    async with run_gateway(runners=[fed], echo_delay_ms=2) as gw, gw.client() as http:
        created: list[str] = []
        status: dict[str, str] = {}
        where: dict[str, str] = {}
        for cid, text in (("ra", "x y"), ("rb", "/fail"), ("ra", "x y"), ("rb", "x y")):
            async with gw.connect(cid) as ws:
                await ws.message(text, f"m{len(created)}")
                ack = await expect(ws, "ack", client_msg_id=f"m{len(created)}")
                ended = await expect(ws, "run.ended", run_id=ack["run_id"])
            created.append(ack["run_id"])
            status[ack["run_id"]] = ended["status"]
            where[ack["run_id"]] = cid
        # one running and one queued run in a third conversation
        running = await post_ack(http, "rc", {"client_msg_id": "c1", "text": "go", "runner": "fed"})
        queued = await post_ack(http, "rc", {"client_msg_id": "c2", "text": "q", "mode": "queue"})
        for ack, state in ((running, "running"), (queued, "queued")):
            created.append(ack["run_id"])
            status[ack["run_id"]] = state
            where[ack["run_id"]] = "rc"
        # ids are time-ordered: newest first is descending id order
        assert [_ms(r) for r in created] == sorted(_ms(r) for r in created)
        newest_first = sorted(created, reverse=True)

        async def runs(**params: Any) -> dict[str, Any]:
            response = await http.get("/api/runs", params=params)
            assert response.status_code == 200, response.text
            body: dict[str, Any] = response.json()
            return body

        everything = await runs()
        assert [r["run_id"] for r in everything["runs"]] == newest_first
        assert everything["next_before"] is None
        assert {r["run_id"]: r["status"] for r in everything["runs"]} == status
        for state in ("completed", "failed", "running", "queued", "cancelled", "timeout"):
            listed = await runs(status=state)
            assert [r["run_id"] for r in listed["runs"]] == [
                r for r in newest_first if status[r] == state
            ], state
        for cid in ("ra", "rb", "rc", "nobody"):
            listed = await runs(conversation_id=cid)
            assert [r["run_id"] for r in listed["runs"]] == [
                r for r in newest_first if where[r] == cid
            ]
        both = await runs(conversation_id="ra", status="completed")
        assert [r["run_id"] for r in both["runs"]] == [r for r in newest_first if where[r] == "ra"]
        assert len(both["runs"]) == 2

        # pages of 4, then 2: the last page says so with a null cursor
        page1 = await runs(limit=4)
        assert [r["run_id"] for r in page1["runs"]] == newest_first[:4]
        page2 = await runs(limit=4, before=page1["next_before"])
        assert [r["run_id"] for r in page2["runs"]] == newest_first[4:]
        assert page2["next_before"] is None
        assert (await runs(limit=6))["next_before"] is None
        filtered = await runs(limit=1, status="completed")
        assert len(filtered["runs"]) == 1
        more = await runs(limit=1, status="completed", before=filtered["next_before"])
        assert [r["run_id"] for r in filtered["runs"] + more["runs"]] == [
            r for r in newest_first if status[r] == "completed"
        ][:2]
        # clean up: cancelling the running run starts the queued one
        assert (await http.post(f"/api/runs/{running['run_id']}/cancel")).status_code == 202
        assert (await http.post(f"/api/runs/{queued['run_id']}/cancel")).status_code == 202


async def test_run_document_and_cancel() -> None:
    fed = Fed(leftover_steering="drop")
    async with (
        run_gateway(runners=[fed]) as gw,
        gw.connect("doc", after=0) as ws,
        gw.client() as http,
    ):
        ack = await post_ack(http, "doc", {"client_msg_id": "m1", "text": "go", "runner": "fed"})
        run_id = ack["run_id"]
        started = await expect(ws, "run.started", run_id=run_id)
        s1 = await post_ack(http, "doc", {"client_msg_id": "s1", "text": "one"})
        doc = (await http.get(f"/api/runs/{run_id}")).json()
        assert doc == {
            "run_id": run_id,
            "conversation_id": "doc",
            "runner": "fed",
            "status": "running",
            "reason": None,
            "error": None,
            "trigger_message_ids": [ack["message_id"]],
            "created_at": started["ts"],
            "started_at": started["ts"],
            "ended_at": None,
            "usage": None,
            "steering": {"queued": 1, "absorbed": 0, "dropped": 0},
            "node": gw.hub.node,  # the node that runs it
        }
        fed.put(PULL)
        absorbed = await expect(ws, "steering.absorbed", run_id=run_id)
        assert absorbed["message_ids"] == [s1["message_id"]]
        s2 = await post_ack(http, "doc", {"client_msg_id": "s2", "text": "two"})
        s3 = await post_ack(http, "doc", {"client_msg_id": "s3", "text": "three"})
        fed.put({"type": "run.completed", "data": {"finish_reason": "done"}, "usage": {"t": 9}})
        ended = await expect(ws, "run.ended", run_id=run_id)
        dropped = await expect(ws, "steering.dropped", run_id=run_id)
        assert (dropped["message_ids"], dropped["reason"]) == (
            [s2["message_id"], s3["message_id"]],
            "run_ended",
        )
        doc = (await http.get(f"/api/runs/{run_id}")).json()
        assert doc == {
            "run_id": run_id,
            "conversation_id": "doc",
            "runner": "fed",
            "status": "completed",
            "reason": "done",
            "error": None,
            "trigger_message_ids": [ack["message_id"]],
            "created_at": started["ts"],
            "started_at": started["ts"],
            "ended_at": ended["ts"],
            "usage": {"t": 9},
            "steering": {"queued": 0, "absorbed": 1, "dropped": 2},
            "node": gw.hub.node,  # the node that runs it
        }
        assert_error(await http.post(f"/api/runs/{run_id}/cancel"), 409, "no_active_run")
        assert (await http.get(f"/api/runs/{run_id}")).json() == doc  # never changes

        # cancel a running run, then a queued one (which never starts)
        running = await post_ack(http, "doc", {"client_msg_id": "m2", "text": "go"})
        queued = await post_ack(http, "doc", {"client_msg_id": "m3", "text": "q", "mode": "queue"})
        response = await http.post(f"/api/runs/{queued['run_id']}/cancel")
        assert (response.status_code, response.json()) == (
            202,
            {"run_id": queued["run_id"], "status": "cancelled"},
        )
        ended = await expect(ws, "run.ended", run_id=queued["run_id"])
        assert (ended["status"], ended["reason"]) == ("cancelled", "cancel_requested")
        qdoc = (await http.get(f"/api/runs/{queued['run_id']}")).json()
        assert (qdoc["status"], qdoc["started_at"], qdoc["ended_at"]) == (
            "cancelled",
            None,
            ended["ts"],
        )
        assert (await http.post(f"/api/runs/{running['run_id']}/cancel")).status_code == 202
        ended = await expect(ws, "run.ended", run_id=running["run_id"])
        assert (ended["status"], ended["reason"]) == ("cancelled", "cancel_requested")
        assert_error(await http.post(f"/api/runs/{running['run_id']}/cancel"), 409, "no_active_run")
        starts = [f["run_id"] for f in ws.events() if f["type"] == "run.started"]
        assert starts == [run_id, running["run_id"]]


# --------------------------------------------------------------------------- health


async def test_healthz_and_readyz(gw: Gateway) -> None:
    async with gw.client() as http:
        health = await http.get("/healthz")
        assert (health.status_code, health.text) == (200, "ok")
        ready = await http.get("/readyz")
        assert ready.status_code == 200
        gw.store.fail = True
        try:
            assert_error(await http.get("/readyz"), 503, "internal")
            assert (await http.get("/healthz")).status_code == 200
        finally:
            gw.store.fail = False
        assert (await http.get("/readyz")).status_code == 200


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics"])
async def test_operational_endpoints_need_no_conversation(gw: Gateway, path: str) -> None:
    async with gw.client() as http:
        response = await http.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
