"""Bad input, PROTOCOL.md sections 3 and 7 (issue 3, item 7), over the real server.

Every error code is provoked, and after each refusal the same connection still
works; refusals before the upgrade are HTTP 400; a frame over 64 KiB closes with
1009 and rate-limit abuse with 4029; none of it disturbs another client of the
conversation nor a run in progress.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
import websockets
from websockets.exceptions import ConnectionClosedError, InvalidStatus

from store.base import WriteBatch
from store.memory import MemoryStore
from tests.conftest import Client, Gateway, run_gateway
from tests.helpers import TIMEOUT, Fed, assert_gap_free, delta, expect, run_completed

MAX_FRAME = 64 * 1024


class RefusingStore(MemoryStore):
    """The memory store, telling when it refused a write."""

    def __init__(self) -> None:
        super().__init__()
        self.refused = asyncio.Event()

    async def write(self, batch: WriteBatch) -> None:
        if self.fail:
            self.refused.set()
        await super().write(batch)


async def still_works(client: Client, nonce: str) -> None:
    """A ping on the connection is answered: it is open and served."""
    await client.send({"type": "ping", "nonce": nonce})
    pong = await client.until_type("pong", nonce=nonce)
    assert pong == {"type": "pong", "nonce": nonce}


async def refused(
    client: Client, frame: dict[str, Any] | str | bytes, code: str, cmid: str | None = None
) -> dict[str, Any]:
    """Send `frame`; the very next frame is the error, with `client_msg_id` exactly when
    the frame had a valid one; then the connection still works."""
    await client.send(frame)
    error = await client.recv()
    expected = {"type": "error", "code": code}
    if cmid is not None:
        expected["client_msg_id"] = cmid
    assert {k: v for k, v in error.items() if k != "message"} == expected, (frame, error)
    assert isinstance(error["message"], str)
    assert error["message"]
    await still_works(client, f"after-{len(client.frames)}")
    return error


def message(cmid: Any = "m1", text: Any = "hi", **fields: Any) -> dict[str, Any]:
    return {"type": "message", "client_msg_id": cmid, "text": text, **fields}


async def head(gw: Gateway, cid: str) -> int:
    async with gw.client() as http:
        response = await http.get(f"/api/conversations/{cid}/events")
    assert response.status_code == 200
    value: int = response.json()["head"]
    return value


# --------------------------------------------------------------------------- invalid_frame

INVALID_FRAMES: list[tuple[str, dict[str, Any] | str | bytes, str | None]] = [
    # JSON that is not an object
    ("array", "[]", None),
    ("string", '"ping"', None),
    ("number", "42", None),
    ("null", "null", None),
    # a binary frame, even one holding valid JSON
    ("binary", b'{"type":"ping"}', None),
    # unknown, missing or ill-typed type
    ("unknown type", {"type": "shout"}, None),
    ("unknown type with id", {"type": "shout", "client_msg_id": "m1"}, "m1"),
    ("no type", {"client_msg_id": "m1", "text": "hi"}, "m1"),
    ("type number", {"type": 5}, None),
    ("type null", {"type": None}, None),
    # missing fields
    ("no client_msg_id", {"type": "message", "text": "hi"}, None),
    ("no text", {"type": "message", "client_msg_id": "m1"}, "m1"),
    # extra fields
    ("message extra", message(extra=1), "m1"),
    ("ping extra", {"type": "ping", "extra": 1}, None),
    ("cancel extra", {"type": "cancel", "run": "x"}, None),
    # ill-typed fields
    ("text number", message(text=5), "m1"),
    ("text list", message(text=["hi"]), "m1"),
    ("text null", message(text=None), "m1"),
    ("mode bogus", message(mode="bogus"), "m1"),
    ("mode null", message(mode=None), "m1"),
    ("mode upper", message(mode="AUTO"), "m1"),
    ("metadata list", message(metadata=[1]), "m1"),
    ("metadata string", message(metadata="x"), "m1"),
    ("runner number", message(runner=5), "m1"),
    ("runner bad chars", message(runner="no such/runner"), "m1"),
    ("cancel run_id number", {"type": "cancel", "run_id": 5}, None),
    ("nonce number", {"type": "ping", "nonce": 5}, None),
    # an empty text
    ("empty text", message(text=""), "m1"),
    # ids with other characters or too long
    ("id number", message(cmid=7), None),
    ("id empty", message(cmid=""), None),
    ("id space", message(cmid="m 1"), None),
    ("id slash", message(cmid="m/1"), None),
    ("id newline", message(cmid="m1\n"), None),
    ("id non-ascii", message(cmid="mé"), None),
    ("id 65 chars", message(cmid="m" * 65), None),
    # metadata over 16 KiB as compact JSON: {"k":"..."} is 8 bytes + the value
    ("metadata 16 KiB + 1", message(metadata={"k": "x" * (16 * 1024 - 7)}), "m1"),
    ("cancel run_id 65 chars", {"type": "cancel", "run_id": "r" * 65}, None),
    ("nonce 129 chars", {"type": "ping", "nonce": "n" * 129}, None),
]


async def test_invalid_json_and_every_invalid_frame_leave_the_connection_working() -> None:
    async with (
        run_gateway(rate_burst=1000) as gw,
        gw.connect("bad", after=0) as client,
    ):
        for frame in ("{not json", "", "{", '{"type":"ping"', "\x00", "nan", "{'type':'ping'}"):
            await refused(client, frame, "invalid_json")
        for name, frame, cmid in INVALID_FRAMES:
            error = await refused(client, frame, "invalid_frame", cmid)
            assert error["message"], name
        # nothing was stored, nothing else was sent
        assert await head(gw, "bad") == 0
        assert {f["type"] for f in client.frames} == {"ready", "error", "pong"}
        # the boundary values are all accepted
        await client.send({"type": "ping", "nonce": "n" * 128})
        assert (await client.until_type("pong"))["nonce"] == "n" * 128
        await client.send({"type": "ping"})
        assert await client.until_type("pong") == {"type": "pong", "nonce": None}
        await client.send({"type": "cancel", "run_id": "r" * 64})
        assert (await client.until_type("error"))["code"] == "unknown_run"
        metadata = {"k": "x" * (16 * 1024 - 8)}
        assert len(orjson.dumps(metadata)) == 16 * 1024
        await client.send(message("m" * 64, "boundary", metadata=metadata, mode="queue"))
        ack = await expect(client, "ack")
        assert (ack["client_msg_id"], ack["offset"], ack["route"]) == ("m" * 64, 1, "run")
        stored = await expect(client, "user.message")
        assert stored["metadata"] == metadata
        await expect(client, "run.ended", run_id=ack["run_id"])
        # the key "m1", refused so many times, is still free
        await client.send(message("m1", "finally"))
        ack = await expect(client, "ack", client_msg_id="m1")
        assert ack["duplicate"] is False
        assert_gap_free(client)


async def test_text_too_long() -> None:
    async with run_gateway() as gw, gw.connect("long", after=0) as client:
        error = await refused(client, message("t1", "x" * 32_769), "text_too_long", "t1")
        assert "32768" in error["message"] or "32,768" in error["message"]
        assert await head(gw, "long") == 0
        await client.send(message("t1", "x" * 32_768))
        ack = await expect(client, "ack", client_msg_id="t1")
        assert (ack["offset"], ack["duplicate"]) == (1, False)
        stored = await expect(client, "user.message")
        assert stored["text"] == "x" * 32_768
        done = await expect(client, "message.completed", run_id=ack["run_id"])
        assert done["message"]["content"] == "echo: " + "x" * 32_768


async def test_no_active_run_and_unknown_run(gw: Gateway) -> None:
    async with gw.connect("c-cancel", after=0) as client:
        await refused(client, {"type": "cancel"}, "no_active_run")
        await refused(client, {"type": "cancel", "run_id": None}, "no_active_run")
        await client.send(message("m1", "a"))
        ack = await expect(client, "ack", client_msg_id="m1")
        await expect(client, "run.ended", run_id=ack["run_id"])
        # nothing active again, and naming the run that ended
        await refused(client, {"type": "cancel"}, "no_active_run")
        error = await refused(client, {"type": "cancel", "run_id": ack["run_id"]}, "no_active_run")
        assert ack["run_id"] in error["message"]
        # a run id that names no run of this conversation
        for run_id in ("run_nope", "", "r" * 64, ack["run_id"] + "x"):
            await refused(client, {"type": "cancel", "run_id": run_id}, "unknown_run")
        async with gw.connect("c-other", after=0) as other:
            await other.send(message("o1", "b"))
            theirs = await expect(other, "ack", client_msg_id="o1")
            await expect(other, "run.ended", run_id=theirs["run_id"])
        # a run of another conversation is not a run of this one
        await refused(client, {"type": "cancel", "run_id": theirs["run_id"]}, "unknown_run")
        async with gw.client() as http:
            doc = (await http.get(f"/api/runs/{theirs['run_id']}")).json()
        assert doc["status"] == "completed"
        assert await head(gw, "c-cancel") == 6  # user.message, run.started, 2 deltas, ...


async def test_rate_limited_then_served_again() -> None:
    async with (
        run_gateway(rate_per_s=4, rate_burst=3, rate_abuse=100_000) as gw,
        gw.connect("rate", after=0) as client,
    ):
        # five frames at once: the burst of three passes, the rest are refused
        for i in range(5):
            await client.send({"type": "ping", "nonce": str(i)})
        answers = [await client.recv() for _ in range(5)]
        assert [a["type"] for a in answers] == ["pong", "pong", "pong", "error", "error"]
        assert [a.get("nonce") for a in answers[:3]] == ["0", "1", "2"]
        assert {a["code"] for a in answers[3:]} == {"rate_limited"}
        # a refused message stores nothing and carries no ack
        await client.send(message("m1", "hi"))
        refusal = await client.recv()
        assert (refusal["type"], refusal["code"]) == ("error", "rate_limited")
        # the connection stays open: tokens come back (4 a second) and frames pass again
        async with asyncio.timeout(TIMEOUT):
            while True:
                await client.send({"type": "ping", "nonce": "again"})
                answer = await client.recv()
                if answer["type"] == "pong":
                    break
                assert answer["code"] == "rate_limited"
        assert answer == {"type": "pong", "nonce": "again"}
        assert await head(gw, "rate") == 0


async def test_rate_limit_abuse_closes_4029() -> None:
    async with (
        run_gateway(rate_per_s=0.001, rate_burst=2, rate_abuse=3) as gw,
        gw.connect("abuse", after=0) as client,
    ):
        await still_works(client, "1")
        await still_works(client, "2")
        for _ in range(2):  # refusals 1 and 2 are answered
            await client.send({"type": "ping"})
            assert (await client.recv())["code"] == "rate_limited"
        await client.send({"type": "ping"})  # the third refusal in a row closes
        with pytest.raises(ConnectionClosedError) as closed:
            await client.recv()
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4029, "rate_limit_abuse")
        # others are not affected
        async with gw.connect("abuse") as other:
            await still_works(other, "other")


async def test_queue_full_for_runs_and_for_steering() -> None:
    fed = Fed()
    async with (
        run_gateway(runners=[fed], rate_burst=1000) as gw,
        gw.connect("full", after=0) as client,
    ):
        await client.send(message("m0", "go", runner="fed"))
        active = await expect(client, "ack", client_msg_id="m0")
        await expect(client, "run.started", run_id=active["run_id"])
        # 100 steering messages wait for a runner that never pulls
        for i in range(100):
            await client.send(message(f"s{i}", "steer", mode="steer"))
        for i in range(100):
            ack = await expect(client, "ack", client_msg_id=f"s{i}")
            assert (ack["route"], ack["run_id"]) == ("steer", active["run_id"])
        await refused(client, message("s100", "one too many", mode="steer"), "queue_full", "s100")
        # `auto` that cannot steer is queued instead
        await client.send(message("q0", "auto"))
        assert (await expect(client, "ack", client_msg_id="q0"))["route"] == "queue"
        for i in range(1, 16):
            await client.send(message(f"q{i}", "queued", mode="queue"))
        queued = []
        for i in range(1, 16):
            ack = await expect(client, "ack", client_msg_id=f"q{i}")
            assert ack["route"] == "queue"
            queued.append(ack["run_id"])
        positions = [f["position"] for f in client.events() if f["type"] == "run.queued"]
        assert positions == list(range(1, 17))
        await refused(client, message("q16", "17th", mode="queue"), "queue_full", "q16")
        await refused(client, message("q16", "17th"), "queue_full", "q16")  # auto too
        before = await head(gw, "full")
        # a queued run is cancelled: there is room again, and the refused key is free
        await client.send({"type": "cancel", "run_id": queued[-1]})
        await expect(client, "run.ended", run_id=queued[-1])
        await client.send(message("q16", "17th", mode="queue"))
        ack = await expect(client, "ack", client_msg_id="q16")
        assert (ack["route"], ack["duplicate"], ack["offset"]) == ("queue", False, before + 2)
        await still_works(client, "end")
        await client.send({"type": "cancel"})  # the active run: its steering is dropped
        ended = await expect(client, "run.ended", run_id=active["run_id"])
        assert (ended["status"], ended["reason"]) == ("cancelled", "cancel_requested")
        dropped = await expect(client, "steering.dropped", run_id=active["run_id"])
        assert len(dropped["message_ids"]) == 100
        assert_gap_free(client)


async def test_runner_unavailable() -> None:
    plain = Fed("plain", supports_steering=False)
    async with run_gateway(runners=[plain]) as gw, gw.connect("nope", after=0) as client:
        # no runner of that name on the conversation's first message
        error = await refused(
            client, message("m1", "hi", runner="nope"), "runner_unavailable", "m1"
        )
        assert "nope" in error["message"]
        assert await head(gw, "nope") == 0
        # the key stays free; without a runner the gateway's default serves it
        await client.send(message("m1", "hi"))
        ack = await expect(client, "ack", client_msg_id="m1")
        started = await expect(client, "run.started", run_id=ack["run_id"])
        assert started["runner"] == "echo"
        await expect(client, "run.ended", run_id=ack["run_id"])

    async with run_gateway(runners=[plain]) as gw, gw.connect("plain", after=0) as client:
        await client.send(message("m1", "go", runner="plain"))
        active = await expect(client, "ack", client_msg_id="m1")
        # steer into a run whose runner cannot steer
        await refused(client, message("m2", "steer", mode="steer"), "runner_unavailable", "m2")
        # auto is queued instead; `runner` on a later message is ignored, not refused
        await client.send(message("m2", "later", runner="nope"))
        ack = await expect(client, "ack", client_msg_id="m2")
        assert ack["route"] == "queue"
        plain.put(delta("x"), run_completed())
        await expect(client, "run.ended", run_id=active["run_id"])
        started = await expect(client, "run.started", run_id=ack["run_id"])
        assert started["runner"] == "plain"
        plain.put(run_completed())
        await expect(client, "run.ended", run_id=ack["run_id"])
        assert_gap_free(client)


async def test_internal_when_the_store_is_down(gw: Gateway) -> None:
    async with gw.connect("down", after=0) as client:
        await client.send(message("m1", "a"))
        first = await expect(client, "ack", client_msg_id="m1")
        await expect(client, "run.ended", run_id=first["run_id"])
        stored = await head(gw, "down")
        gw.store.fail = True
        try:
            await refused(client, message("m2", "b"), "internal", "m2")
            await refused(client, message("m3", "c", mode="queue"), "internal", "m3")
            # a resend of a key the actor remembers is answered without the store
            await client.send(message("m1", "a"))
            dup = await expect(client, "ack", client_msg_id="m1", duplicate=True)
            assert {**dup, "duplicate": False} == first
        finally:
            gw.store.fail = False
        assert await head(gw, "down") == stored  # nothing was stored
        await client.send(message("m2", "b"))
        ack = await expect(client, "ack", client_msg_id="m2")
        assert (ack["offset"], ack["duplicate"], ack["route"]) == (stored + 1, False, "run")
        await expect(client, "run.ended", run_id=ack["run_id"])
        assert_gap_free(client)


async def test_internal_while_store_writes_fail_and_nothing_is_lost() -> None:
    fed = Fed()
    store = RefusingStore()
    async with (
        run_gateway(runners=[fed], store=store) as gw,
        gw.connect("writer", after=0) as writer,
        gw.connect("bystander", after=0) as bystander,
    ):
        await writer.send(message("w1", "go", runner="fed"))
        ack = await expect(writer, "ack", client_msg_id="w1")
        await bystander.send(message("b1", "first"))
        first = await expect(bystander, "ack", client_msg_id="b1")
        await expect(bystander, "run.ended", run_id=first["run_id"])
        gw.store.fail = True
        try:
            fed.put(delta("kept"))  # its write fails and is retried until the store is back
            await asyncio.wait_for(store.refused.wait(), TIMEOUT)
            assert not gw.hub.committer.healthy
            # while writes fail, messages are refused at once, on any conversation
            await refused(writer, message("w2", "steer", mode="steer"), "internal", "w2")
            await refused(bystander, message("b2", "second"), "internal", "b2")
            assert not [f for f in writer.frames if f["type"] == "message.delta"]
        finally:
            gw.store.fail = False
        # the result written late is delivered; the refused keys are free
        kept = await expect(writer, "message.delta", run_id=ack["run_id"])
        assert (kept["delta"], kept["offset"]) == ("kept", 3)
        await writer.send(message("w2", "steer", mode="steer"))
        steer = await expect(writer, "ack", client_msg_id="w2")
        assert (steer["route"], steer["offset"], steer["duplicate"]) == ("steer", 4, False)
        fed.put(run_completed())
        await expect(writer, "run.ended", run_id=ack["run_id"])
        await bystander.send(message("b2", "second"))
        again = await expect(bystander, "ack", client_msg_id="b2")
        assert (again["duplicate"], again["offset"]) == (False, 7)
        assert_gap_free(writer)
        assert_gap_free(bystander)


# --------------------------------------------------------------------------- frame size


def frame_of_size(size: int, cmid: str) -> str:
    """A message frame of exactly `size` bytes whose text is 32,768 characters."""
    overhead = len(orjson.dumps(message(cmid, "")))
    two_byte = size - overhead - 32_768  # each "é" takes two bytes, each "a" one
    text = "é" * two_byte + "a" * (32_768 - two_byte)
    raw = orjson.dumps(message(cmid, text))
    assert len(raw) == size
    assert len(text) == 32_768
    return raw.decode()


async def test_frame_over_64_kib_closes_1009(gw: Gateway) -> None:
    async with gw.connect("size", after=0) as client:
        await client.send(frame_of_size(MAX_FRAME, "exact"))
        ack = await expect(client, "ack", client_msg_id="exact")
        assert ack["route"] == "run"
        await expect(client, "run.ended", run_id=ack["run_id"])
        await client.send(frame_of_size(MAX_FRAME + 1, "over"))
        with pytest.raises(ConnectionClosedError) as closed:
            await client.until_type("pong")
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1009
    async with gw.connect("size", after=0) as again:
        await still_works(again, "reconnected")
        # nothing of the oversized frame was stored
        await expect(again, "run.ended", run_id=ack["run_id"])
        assert [f["client_msg_id"] for f in again.events() if f["type"] == "user.message"] == [
            "exact"
        ]


# --------------------------------------------------------------------------- before the upgrade


async def test_illegal_conversation_id_or_after_is_400_before_the_upgrade(gw: Gateway) -> None:
    async def status_of(url: str) -> int:
        with pytest.raises(InvalidStatus) as refusal:
            await websockets.connect(url, open_timeout=TIMEOUT)
        body = orjson.loads(refusal.value.response.body)
        assert body["error"]["code"] == "invalid_frame", (url, body)
        status: int = refusal.value.response.status_code
        return status

    base = f"ws://127.0.0.1:{gw.port}/ws/conversations/"
    for cid in ("-x", ".x", ":x", "x" * 129, "a%20b", "a$b", "%C3%A9t%C3%A9", "a%00", "a!"):
        assert await status_of(base + cid) == 400, cid
    for after in ("-1", "x", "1.5", "", "1e3", "%2B1", "0x1", "%EF%BC%91", "1&after=-1"):
        assert await status_of(gw.ws_url("ok", after=after)) == 400, after
    # none of it created a conversation
    async with gw.client() as http:
        listing = (await http.get("/api/conversations")).json()
    assert listing == {"conversations": [], "next_before": None}


async def test_legal_extremes_are_accepted(gw: Gateway) -> None:
    for cid, query in (("x" * 128, {"after": "0"}), ("0.a_b:c-d", {}), ("Z", {"after": "99"})):
        async with gw.connect(cid, **query) as client:
            assert client.frames[0]["conversation_id"] == cid
            assert client.frames[0]["head"] == 0
            await still_works(client, "ok")


# --------------------------------------------------------------------------- isolation


async def test_bad_input_disturbs_no_other_client_and_no_run() -> None:
    fed = Fed()
    async with (
        run_gateway(runners=[fed], rate_per_s=0.001, rate_burst=40, rate_abuse=3) as gw,
        gw.connect("shared", after=0) as watcher,
        gw.connect("shared", after=0) as vandal,
        gw.connect("shared", after=0) as flooder,
    ):
        await watcher.send(message("w1", "go", runner="fed"))
        ack = await expect(watcher, "ack", client_msg_id="w1")
        run_id = ack["run_id"]
        await expect(vandal, "run.started", run_id=run_id)
        fed.put(delta("one"))
        await expect(watcher, "message.delta", delta="one")

        for frame, code, cmid in [
            ("{oops", "invalid_json", None),
            (b"\x00\x01", "invalid_frame", None),
            (message("v1", ""), "invalid_frame", "v1"),
            (message("v1", "x" * 32_769), "text_too_long", "v1"),
            (message("v1", "hi", mode="steer", extra=True), "invalid_frame", "v1"),
            ({"type": "cancel", "run_id": "run_nope"}, "unknown_run", None),
            ({"type": "cancel", "run_id": "r" * 65}, "invalid_frame", None),
        ]:
            await vandal.send(frame)
            error = await vandal.until_type("error")
            assert (error["code"], error.get("client_msg_id")) == (code, cmid)
        fed.put(delta(" two"))
        await expect(vandal, "message.delta", delta=" two")

        # the flooder is rate limited, then closed for abuse
        def answer(frame: dict[str, Any]) -> bool:
            return frame["type"] in ("pong", "error")

        pongs = 0
        while True:
            await flooder.send({"type": "ping"})
            reply = await flooder.until(answer)
            if reply["type"] == "error":
                break
            pongs += 1
        assert (pongs, reply["code"]) == (40, "rate_limited")  # the burst, then refusals
        await flooder.send({"type": "ping"})
        assert (await flooder.until(answer))["code"] == "rate_limited"
        await flooder.send({"type": "ping"})
        with pytest.raises(ConnectionClosedError) as abused:
            await flooder.until(answer)
        assert abused.value.rcvd is not None
        assert abused.value.rcvd.code == 4029

        # the vandal ends with a frame over the limit
        await vandal.send("[" + " " * MAX_FRAME + "]")
        with pytest.raises(ConnectionClosedError) as closed:
            await vandal.until_type("pong")
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1009

        fed.put(delta(" three"), run_completed())
        ended = await expect(watcher, "run.ended", run_id=run_id)
        assert (ended["status"], ended["reason"]) == ("completed", "stop")
        # the watcher saw the whole run, in order, no gap, and none of the errors
        assert [f["type"] for f in watcher.events()] == [
            "user.message",
            "run.started",
            "message.delta",
            "message.delta",
            "message.delta",
            "run.ended",
        ]
        assert "".join(f["delta"] for f in watcher.events() if "delta" in f) == "one two three"
        assert_gap_free(watcher)
        assert not [f for f in watcher.frames if f["type"] in ("error", "pong")]
        # what the vandal and the flooder received before their close is the same prefix
        for other in (vandal, flooder):
            assert_gap_free(other)
            mine = watcher.events()[: len(other.events())]
            assert other.events() == mine
        assert len(vandal.events()) == 4
        # a new client of the conversation replays the same events
        async with gw.connect("shared", after=0) as late:
            await expect(late, "run.ended", run_id=run_id)
            assert late.events() == watcher.events()
