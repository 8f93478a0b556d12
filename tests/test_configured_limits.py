"""Every limit is a setting, answered as PROTOCOL.md sections 3, 7 and 8 say (issue 7,
item 3): frame and text size, metadata size, the frame rate, steering and queued runs
per conversation, and WebSocket connections per conversation and per process (close
1013, "try again later": a decision, docs/protocol.md)."""

from __future__ import annotations

from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from tests.conftest import Client, run_gateway
from tests.helpers import Fed, expect, settled
from tests.test_bad_input import message, refused, still_works

SMALL = {
    "max_frame_bytes": 2048,
    "max_text_chars": 10,
    "max_metadata_bytes": 32,
    "max_queued_runs": 1,
    "max_steering": 2,
    "max_conversation_clients": 2,
    "max_connections": 4,
}


async def closed_with(client: Client) -> tuple[int, str]:
    with pytest.raises(ConnectionClosed) as closed:
        await client.recv()
    assert closed.value.rcvd is not None
    return closed.value.rcvd.code, closed.value.rcvd.reason


async def test_text_metadata_and_frame_sizes_follow_the_settings() -> None:
    async with (
        run_gateway(**SMALL) as gw,
        gw.connect("sizes", after=0) as client,
        gw.client() as http,
    ):
        await client.send(message("t10", "x" * 10))
        ack = await expect(client, "ack", client_msg_id="t10")
        await expect(client, "run.ended", run_id=ack["run_id"])
        error = await refused_error(client, message("t11", "é" * 11), "text_too_long", "t11")
        assert error["message"] == "text over 10 characters"
        meta = {"k": "v" * 24}  # {"k":"vvv…"}: 32 bytes exactly
        await client.send(message("m32", "ok", metadata=meta))
        ack = await expect(client, "ack", client_msg_id="m32")
        await expect(client, "run.ended", run_id=ack["run_id"])
        await refused(
            client, message("m33", "ok", metadata={"k": "v" * 25}), "invalid_frame", "m33"
        )

        post = "/api/conversations/sizes/messages"
        answer = await http.post(post, json={"client_msg_id": "r1", "text": "y" * 11})
        assert (answer.status_code, answer.json()["error"]["code"]) == (413, "text_too_long")
        answer = await http.post(
            post, json={"client_msg_id": "r2", "text": "y", "metadata": {"k": "v" * 25}}
        )
        assert (answer.status_code, answer.json()["error"]["code"]) == (400, "invalid_frame")
        # the REST body limit follows them: 10 x 12 + 32 x 6 + 4096 bytes (issue 11, item 3)
        for size, status in ((10 * 12 + 32 * 6 + 4096, 400), (10 * 12 + 32 * 6 + 4097, 413)):
            answer = await http.post(post, content=b"{" + b" " * (size - 2) + b"}")
            assert answer.status_code == status, answer.text

        await client.send(message("big", "z", metadata={"pad": "p" * 2100}))
        code, reason = await closed_with(client)
        assert (code, reason.endswith("exceeds limit of 2048 bytes")) == (1009, True)


async def refused_error(
    client: Client, frame: dict[str, Any], code: str, cmid: str
) -> dict[str, Any]:
    await refused(client, frame, code, cmid)
    return next(f for f in reversed(client.frames) if f.get("type") == "error")


async def test_steering_and_queued_runs_per_conversation_follow_the_settings() -> None:
    fed = Fed()
    async with run_gateway(runners=[fed], **SMALL) as gw, gw.connect("q", after=0) as client:
        await client.send(message("a", "go", runner="fed"))
        active = await expect(client, "ack", client_msg_id="a")
        for key in ("s1", "s2"):
            await client.send(message(key, "steer", mode="steer"))
            assert (await expect(client, "ack", client_msg_id=key))["route"] == "steer"
        await refused(client, message("s3", "more", mode="steer"), "queue_full", "s3")
        await client.send(message("q1", "auto"))
        assert (await expect(client, "ack", client_msg_id="q1"))["route"] == "queue"
        await refused(client, message("q2", "full", mode="queue"), "queue_full", "q2")
        await client.send({"type": "cancel", "run_id": active["run_id"]})
        await expect(client, "run.ended", run_id=active["run_id"])


async def test_the_rate_limit_follows_the_settings() -> None:
    rate = {"rate_burst": 8, "rate_per_s": 0.001, "rate_abuse": 3}  # no refill meanwhile
    async with run_gateway(**rate) as gw, gw.connect("rate", after=0) as client:
        for i in range(8):
            await client.send({"type": "ping", "nonce": str(i)})
        for i in range(8):
            await client.until_type("pong", nonce=str(i))
        for _ in range(2):
            await client.send({"type": "ping"})
            assert (await client.until_type("error"))["code"] == "rate_limited"
        await client.send({"type": "ping"})  # the third refusal in a row
        assert await closed_with(client) == (4029, "rate_limit_abuse")


async def test_connections_per_conversation_and_per_process_are_capped_with_1013() -> None:
    async with run_gateway(**SMALL) as gw:
        slots = gw.app.state.connections
        async with gw.connect("c1") as a1, gw.connect("c1") as a2:
            async with gw.connect("c1", ready=False) as third:
                assert await closed_with(third) == (1013, "too_many_connections")
            async with gw.connect("c2") as b1, gw.connect("c2") as b2:
                async with gw.connect("c3", ready=False) as fifth:
                    assert await closed_with(fifth) == (1013, "too_many_connections")
                # at the limit, every connected client is still served: pings, and a
                # message acked and answered to both clients of its conversation
                for i, client in enumerate((a1, a2, b1, b2)):
                    await still_works(client, f"served-{i}")
                await b1.message("full", "limit-1")
                ack = await expect(b1, "ack", client_msg_id="limit-1")
                for client in (b1, b2):
                    await expect(client, "run.ended", run_id=ack["run_id"])
            await settled(gw, lambda: slots.total == 2)  # c2's two have ended
            async with gw.connect("c3") as again:
                await still_works(again, "room again")
        await settled(gw, lambda: slots.total == 0)
        assert slots.count("c1") == 0
