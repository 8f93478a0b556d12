"""`/metrics` (issue 3, item 8): Prometheus text with open connections, events appended,
runs by final status, steering messages by outcome and the histogram of the time from a
runner result to its delivery, each checked to move as it should."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, Literal

import httpx
from prometheus_client.parser import text_string_to_metric_families

from gateway.runners.base import RunContext
from tests.conftest import Client, run_gateway
from tests.helpers import PULL, TIMEOUT, Fed, ack_of, expect


class Slow:
    """Never answers; its own wall-clock limit is short."""

    name = "slow"
    supports_steering = False
    leftover_steering: Literal["follow_up", "drop"] = "follow_up"
    deadline_s: float | None = 0.2
    idle_s: float | None = None

    async def run(self, ctx: RunContext) -> AsyncIterator[Any]:
        await asyncio.Event().wait()
        yield {}  # pragma: no cover


class Scrape:
    """One parsed scrape of /metrics: sample values by name and labels."""

    def __init__(self, text: str) -> None:
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        self.types: dict[str, str] = {}
        for family in text_string_to_metric_families(text):
            if not family.name.endswith("_created"):  # the parser's view of *_created lines
                self.types[family.name] = family.type
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def get(self, name: str, **labels: str) -> float:
        """A sample's value; 0 for a labelled sample not exported yet."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def by_label(self, name: str, label: str) -> dict[str, float]:
        return {
            dict(labels)[label]: value
            for (sample, labels), value in self.samples.items()
            if sample == name and label in dict(labels)
        }

    def buckets(self, name: str) -> list[tuple[float, float]]:
        pairs = [
            (float(dict(labels)["le"]), value)
            for (sample, labels), value in self.samples.items()
            if sample == f"{name}_bucket"
        ]
        return sorted(pairs)


async def scrape(http: httpx.AsyncClient) -> Scrape:
    response = await http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return Scrape(response.text)


async def send(client: Client, text: str, cmid: str, **fields: Any) -> dict[str, Any]:
    await client.message(text, cmid, **fields)
    return await ack_of(client, cmid)


OPEN = "steerway_connections_open"
EVENTS = "steerway_events_appended_total"
RUNS = "steerway_runs_ended_total"
STEERING = "steerway_steering_messages_total"
DELIVERY = "steerway_result_delivery_seconds"


async def test_metrics_move_with_connections_events_runs_and_deliveries() -> None:
    async with run_gateway(runners=[Slow()]) as gw, gw.client() as http:
        first = await scrape(http)
        assert first.types == {
            "steerway_connections_open": "gauge",
            "steerway_events_appended": "counter",
            "steerway_runs_ended": "counter",
            "steerway_steering_messages": "counter",
            "steerway_result_delivery_seconds": "histogram",
            "steerway_client_errors": "counter",
            "steerway_slow_consumer_closes": "counter",
            "steerway_store_batches": "gauge",
            "steerway_replay_store_reads": "gauge",
        }
        assert first.by_label(EVENTS, "type") == {}
        assert first.get(f"{DELIVERY}_count") == 0
        assert first.get(OPEN, endpoint="conversation") == 0

        async with gw.connect("m", after=0) as a, gw.connect("m", after=0) as b:
            assert (await scrape(http)).get(OPEN, endpoint="conversation") == 2

            # echo "a b": deltas "echo:", " a", " b", message.completed and run.ended come
            # from runner results, user.message and run.started do not
            ack = await send(a, "a b", "m1")
            for client in (a, b):
                await expect(client, "run.ended", run_id=ack["run_id"])
            now = await scrape(http)
            assert now.by_label(EVENTS, "type") == {
                "user.message": 1,
                "run.started": 1,
                "message.delta": 3,
                "message.completed": 1,
                "run.ended": 1,
            }
            assert now.by_label(RUNS, "status") == {"completed": 1}
            # measured once per event, however many clients it goes to
            assert now.get(f"{DELIVERY}_count") == 5
            assert now.get(f"{DELIVERY}_bucket", le="+Inf") == 5
            assert 0 < now.get(f"{DELIVERY}_sum") < 5 * TIMEOUT
            counts = [value for _, value in now.buckets(DELIVERY)]
            assert counts == sorted(counts)
            # one group commit at least per batch of the actor: the message, then results
            assert 2 <= now.get("steerway_store_batches") <= 7

            ack = await send(a, "/fail", "m2")  # run.failed: its run.ended is a result
            await expect(a, "run.ended", run_id=ack["run_id"])
            ack = await send(a, "/sleep 600", "m3")
            await expect(a, "run.started", run_id=ack["run_id"])
            await a.send({"type": "cancel"})  # a cancel is not a runner result
            await expect(a, "run.ended", run_id=ack["run_id"])
            await expect(b, "run.ended", run_id=ack["run_id"])
            now = await scrape(http)
            assert now.by_label(RUNS, "status") == {"completed": 1, "failed": 1, "cancelled": 1}
            assert now.get(f"{DELIVERY}_count") == 6
            assert now.get(EVENTS, type="run.ended") == 3
            assert now.get(EVENTS, type="user.message") == 3

            async with gw.connect("t", after=0) as c:
                assert (await scrape(http)).get(OPEN, endpoint="conversation") == 3
                ack = await send(c, "wait", "m1", runner="slow")
                ended = await expect(c, "run.ended", run_id=ack["run_id"])
                assert (ended["status"], ended["reason"]) == ("timeout", "deadline")

            await a.send("{oops")
            assert (await a.until_type("error"))["code"] == "invalid_json"
            await a.send({"type": "cancel"})
            assert (await a.until_type("error"))["code"] == "no_active_run"
            now = await scrape(http)
            assert now.by_label(RUNS, "status") == {
                "completed": 1,
                "failed": 1,
                "cancelled": 1,
                "timeout": 1,
            }
            assert now.by_label("steerway_client_errors_total", "code") == {
                "invalid_json": 1,
                "no_active_run": 1,
            }
            assert now.get(EVENTS, type="run.ended") == 4
            total = sum(now.by_label(EVENTS, "type").values())
            assert total == 7 + 3 + 3 + 3  # offsets of m (7 + 3 + 3) and of t (3)

        # the closed connections are counted out (their server side ends a moment later)
        async with asyncio.timeout(TIMEOUT):
            while (await scrape(http)).get(OPEN, endpoint="conversation") != 0:
                pass


async def test_steering_outcomes() -> None:
    fed = Fed()
    async with (
        run_gateway(runners=[fed]) as gw,
        gw.client() as http,
        gw.connect("s", after=0) as ws,
    ):
        run = await send(ws, "go", "m0", runner="fed")
        await expect(ws, "run.started", run_id=run["run_id"])
        assert (await send(ws, "one", "s1"))["route"] == "steer"
        assert (await scrape(http)).by_label(STEERING, "outcome") == {"queued": 1}
        fed.put(PULL)
        await expect(ws, "steering.absorbed", run_id=run["run_id"])
        assert (await scrape(http)).by_label(STEERING, "outcome") == {"queued": 1, "absorbed": 1}

        for cmid in ("s2", "s3"):
            assert (await send(ws, cmid, cmid))["route"] == "steer"
        fed.put({"type": "run.completed", "data": {"finish_reason": "stop"}})
        await expect(ws, "run.ended", run_id=run["run_id"])
        follow_up = await ws.until(
            lambda f: f["type"] == "run.started" and f["run_id"] != run["run_id"]
        )
        assert len(follow_up["trigger_message_ids"]) == 2
        assert (await scrape(http)).by_label(STEERING, "outcome") == {
            "queued": 3,
            "absorbed": 1,
            "follow_up": 2,
        }

        assert (await send(ws, "four", "s4"))["route"] == "steer"
        await ws.send({"type": "cancel"})
        await expect(ws, "steering.dropped", run_id=follow_up["run_id"])
        await expect(ws, "run.ended", run_id=follow_up["run_id"])
        now = await scrape(http)
        assert now.by_label(STEERING, "outcome") == {
            "queued": 4,
            "absorbed": 1,
            "follow_up": 2,
            "dropped": 1,
        }
        assert now.by_label(RUNS, "status") == {"completed": 1, "cancelled": 1}
        assert now.get(EVENTS, type="steering.absorbed") == 1
        assert now.get(EVENTS, type="steering.dropped") == 1
        # results of the runner: run.completed gave run.ended and the follow-up's start
        assert now.get(f"{DELIVERY}_count") == 2
