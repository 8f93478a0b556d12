"""The shortest path through the gateway: a message, its run, its echo."""

from __future__ import annotations

from tests.conftest import Gateway


async def test_message_runs_echo(gw: Gateway) -> None:
    async with gw.connect("c1", after=0) as client:
        await client.message("hello  world", "m1")
        ack = await client.until_type("ack")
        assert ack["route"] == "run"
        assert ack["offset"] == 1
        done = await client.until_type("message.completed")
        assert done["message"]["content"] == "echo: hello world"
        ended = await client.until_type("run.ended")
        assert ended["status"] == "completed"
        assert ended["reason"] == "stop"
