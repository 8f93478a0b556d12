"""Soak: many connections that connect, chat, steer and disconnect for a bounded time,
with the gateway's memory and file descriptors before, during and after (issue 7, item 8).

    .venv/bin/python bench/soak.py [--connections 1000] [--conversations 100]
                                   [--duration 60] [--warmup 30] [--store auto|memory]
                                   [--json out.json]

Run from the repo root.  `steerway serve` runs as a subprocess pinned to core 0 (the
embedded nx-27017 store by default, in a temp dir, so that stored events are not in
the gateway's memory); this process, pinned to core 1, runs `--connections` clients at
once, spread over `--conversations` conversations.  Each client, over and over until
the time is up: connects, sends a message, sends a steering message (`mode: steer`)
as soon as the first is acknowledged, waits for a run of its conversation to end,
disconnects, and thinks 0.2-1 s.  Cold: after a warm-up of 50 clients, once idle
actors and store connections are gone.  Before: after a warm-up round of the same
soak (`--warmup` seconds, at full scale), settled the same way: the first burst
of 1,000 connections raises the process's memory once to a high-water mark that
the allocator keeps (docs/performance.md), and a leak is what grows beyond it.
During: sampled every second (the peak is reported).  After: once every client is
gone and as long again.  The target: memory (RSS) and file descriptors after
within 10% of before; the exit status is 0 when both are.
The gateway is stopped by its pid at the end (it stops its nx-27017).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402
from websockets.asyncio.client import connect  # noqa: E402
from websockets.exceptions import WebSocketException  # noqa: E402

from bench.fanout import CLIENT_CORE, Server, proc_rss_kib, report  # noqa: E402

ACTOR_IDLE_S = 2.0
SETTLE_S = 25.0  # idle actors stop (2 s), idle store connections close (10 s, pruned by 20 s)
TOLERANCE = 0.10


@dataclass
class Figures:
    rss_kib: int
    fds: int


@dataclass
class Counts:
    cycles: int = 0
    messages: int = 0
    steers: int = 0
    runs_seen: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


def figures(pid: int) -> Figures:
    return Figures(proc_rss_kib(pid), len(os.listdir(f"/proc/{pid}/fd")))


async def cycle(url: str, counts: Counts, n: int) -> None:
    """One visit: connect, chat, steer, wait for a run to end, disconnect."""
    async with connect(url, open_timeout=30, close_timeout=5, max_size=None) as ws:
        async with asyncio.timeout(30):
            assert orjson.loads(await ws.recv())["type"] == "ready"
            key = f"{os.getpid()}-{n}"
            await ws.send(
                orjson.dumps(
                    {
                        "type": "message",
                        "client_msg_id": f"m{key}",
                        "text": f"soak one two three {n}",
                    }
                ).decode()
            )
            counts.messages += 1
            steered = False
            while True:
                frame = orjson.loads(await ws.recv())
                kind = frame["type"]
                if kind == "ack" and not steered:
                    steered = True
                    await ws.send(
                        orjson.dumps(
                            {
                                "type": "message",
                                "client_msg_id": f"s{key}",
                                "text": "and steer",
                                "mode": "steer",
                            }
                        ).decode()
                    )
                    counts.steers += 1
                elif kind == "error":
                    counts.error(frame["code"])
                elif kind == "run.ended":
                    counts.runs_seen += 1
                    break


async def client(url: str, until: float, counts: Counts, rng: random.Random) -> None:
    await asyncio.sleep(rng.uniform(0, 2))  # not all at once
    n = 0
    while time.monotonic() < until:
        n += 1
        try:
            await cycle(url, counts, rng.randrange(1 << 40))
            counts.cycles += 1
        except (OSError, TimeoutError, WebSocketException) as exc:
            counts.error(type(exc).__name__)
        await asyncio.sleep(rng.uniform(0.2, 1.0))


async def settle(server: Server) -> Figures:
    """The gateway once its idle actors have stopped and its memory is steady."""
    await asyncio.sleep(SETTLE_S)
    last = figures(server.pid)
    for _ in range(10):
        await asyncio.sleep(0.5)
        now = figures(server.pid)
        if abs(now.rss_kib - last.rss_kib) < 256 and now.fds == last.fds:
            return now
        last = now
    return last


def clients(
    args: argparse.Namespace, server: Server, seconds: float, counts: Counts, rng: random.Random
) -> list[asyncio.Task[None]]:
    until = time.monotonic() + seconds
    return [
        asyncio.create_task(
            client(server.url(f"soak-{i % args.conversations}"), until, counts, rng)
        )
        for i in range(args.connections)
    ]


async def soak(args: argparse.Namespace, server: Server) -> dict[str, object]:
    rng = random.Random(7)
    url = server.url
    warm = Counts()
    await asyncio.gather(*(cycle(url(f"warm-{i % 10}"), warm, i) for i in range(50)))
    cold = await settle(server)
    print(f"cold: rss {cold.rss_kib / 1024:.1f} MiB, fds {cold.fds}")
    warmup = Counts()
    await asyncio.gather(*clients(args, server, args.warmup, warmup, rng))
    before = await settle(server)
    print(
        f"before (after a {args.warmup:.0f} s warm-up round, {warmup.cycles} visits): "
        f"rss {before.rss_kib / 1024:.1f} MiB, fds {before.fds}"
    )

    counts = Counts()
    workers = clients(args, server, args.duration, counts, rng)
    peak = Figures(0, 0)
    samples: list[dict[str, float]] = []
    start = time.monotonic()
    while not all(w.done() for w in workers):
        await asyncio.wait(workers, timeout=1.0)
        now = figures(server.pid)
        peak = Figures(max(peak.rss_kib, now.rss_kib), max(peak.fds, now.fds))
        samples.append({"t": round(time.monotonic() - start, 1), **asdict(now)})
        if len(samples) % 10 == 0:
            print(f"  t={samples[-1]['t']:5.0f}s rss {now.rss_kib / 1024:.1f} MiB, fds {now.fds}")
    for w in workers:
        w.result()
    print(f"during (peak): rss {peak.rss_kib / 1024:.1f} MiB, fds {peak.fds}")
    after = await settle(server)
    print(f"after: rss {after.rss_kib / 1024:.1f} MiB, fds {after.fds}")
    print(
        f"{counts.cycles} visits, {counts.messages} messages, {counts.steers} steering "
        f"messages, {counts.runs_seen} run ends seen; errors {counts.errors or 'none'}"
    )
    return {
        "cold": asdict(cold),
        "before": asdict(before),
        "peak": asdict(peak),
        "after": asdict(after),
        "counts": asdict(counts),
        "samples": samples,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--conversations", type=int, default=100)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of soak")
    parser.add_argument(
        "--warmup", type=float, default=30.0, help="seconds of the full-scale warm-up round"
    )
    parser.add_argument("--store", choices=["auto", "memory"], default="auto")
    parser.add_argument("--json", type=Path)
    parser.set_defaults(profile=None)  # what bench.fanout.report reads
    args = parser.parse_args()

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # the gateway inherits it
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.connections + 256 > hard:
        parser.error(f"{args.connections} connections need more than {hard} open files")
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {CLIENT_CORE})
    tmp = Path(tempfile.mkdtemp(prefix="steerway-soak-"))
    env = {
        "STEERWAY_STORE": args.store,
        "STEERWAY_MONGODB_URI": "",
        "STEERWAY_DATA_DIR": str(tmp / "data"),
        "STEERWAY_RUNNER": "echo",
        "STEERWAY_ECHO_DELAY_MS": "5",
        "STEERWAY_ACTOR_IDLE_S": str(ACTOR_IDLE_S),
    }
    server = Server("gateway", False, "asyncio", tmp, env=env, label="soak")
    try:
        server.start()
        result = asyncio.run(soak(args, server))
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    before, after = result["before"], result["after"]
    assert isinstance(before, dict)
    assert isinstance(after, dict)
    verdicts = [
        (
            after[k] <= before[k] * (1 + TOLERANCE),
            f"{k} after within 10% of before ({before[k]} -> {after[k]})",
        )
        for k in ("rss_kib", "fds")
    ]
    return report(args, verdicts, None, result)


if __name__ == "__main__":
    sys.exit(main())
