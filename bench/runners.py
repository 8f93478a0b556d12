"""Runner benchmark: results per second through a remote runner against an in-process
one, in the same run.

    .venv/bin/python bench/runners.py [--count 20000] [--repeat 3] [--json out.json]

Run from the repo root.  One `steerway serve` (memory store) pinned to core 0 has
the in-process runner `flood` (bench/runner.py: `count=<n>` deltas as fast as it
can, then `run.completed`); a second process, pinned to core 1 with this
benchmark's client, serves the same runner class as the remote runner
`flood-remote` through gateway.runner_client.  Each measurement is one run of n
results in a fresh conversation with one client, alternating the two runners.
Results per second are counted on the gateway's own clock: from the run's
`run.started` to its `run.ended` (the `ts` of the two events).  Gateway CPU per
result is the server's utime+stime over the run, divided by the results.
Every process is stopped by its pid at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402
import uvloop  # noqa: E402
import websockets  # noqa: E402

from bench.fanout import (  # noqa: E402
    CLIENT_CORE,
    Server,
    _median,
    machine,
    prepare,
    proc_cpu_s,
    report,
    wait_quiet,
)
from bench.runner import Flood  # noqa: E402
from gateway.runner_client import RunnerClient  # noqa: E402

REMOTE = "flood-remote"


@dataclass
class Measurement:
    runner: str
    results: int
    seconds: float
    cpu_us_per_result: float
    others: float  # share of core 0 other processes used in the second before the run

    @property
    def per_s(self) -> float:
        return self.results / self.seconds


def _pin_to_client_core() -> None:
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {CLIENT_CORE})


@contextlib.contextmanager
def remote_runner(port: int) -> subprocess.Popen[bytes]:  # type: ignore[misc]
    """`python bench/runners.py --serve URL`: the remote `flood-remote`, once ready."""
    url = f"ws://127.0.0.1:{port}/ws/runners"
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__)), "--serve", url],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        preexec_fn=_pin_to_client_core,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        if not line.startswith("ready"):
            raise RuntimeError(f"the remote runner did not start: {line!r}")
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def measure(
    server: Server, runner: str, cid: str, count: int, others: float = 0.0
) -> Measurement:
    url = f"ws://127.0.0.1:{server.port}/ws/conversations/{cid}"
    async with websockets.connect(url, max_size=None) as ws:
        await ws.recv()  # ready
        cpu0 = proc_cpu_s(server.pid)
        message = {"type": "message", "client_msg_id": "m1", "text": f"count={count}"}
        await ws.send(orjson.dumps({**message, "runner": runner}).decode())
        started = ended = None
        async for raw in ws:
            if '"run.' not in raw:
                continue  # deltas, ack: not parsed (the client stays cheap)
            frame = orjson.loads(raw)
            if frame["type"] == "run.started":
                started = frame
            elif frame["type"] == "run.ended":
                ended = frame
                break
        cpu = proc_cpu_s(server.pid) - cpu0
    assert started is not None
    assert ended is not None
    if ended["status"] != "completed":
        raise RuntimeError(f"{runner}: the run ended {ended}")
    seconds = max(0.001, (ended["ts"] - started["ts"]) / 1000)
    results = count + 1  # the deltas and run.completed
    return Measurement(runner, results, seconds, cpu / results * 1e6, others)


async def bench(args: argparse.Namespace, logdir: Path) -> list[Measurement]:
    env = {"STEERWAY_RUNNERS": "bench.runner:Flood", "STEERWAY_RUNNER": "flood"}
    if args.runner_rate is not None:
        env["STEERWAY_RUNNER_RATE_PER_S"] = str(args.runner_rate)
    server = Server("gateway", False, "uvloop", logdir, env=env)
    server.start()
    out: list[Measurement] = []
    try:
        with remote_runner(server.port):
            await measure(server, "flood", "warm-a", 2000)  # imports, caches, JIT-free warm-up
            await measure(server, REMOTE, "warm-b", 2000)
            for i in range(args.repeat):
                for runner in ("flood", REMOTE):
                    others = await wait_quiet(lambda: proc_cpu_s(server.pid), args.quiet_wait)
                    m = await measure(server, runner, f"{runner}-{i}", args.count, others)
                    print(
                        f"  {runner:13s} {m.results} results in {m.seconds:.3f} s = "
                        f"{m.per_s:9.0f}/s, gateway {m.cpu_us_per_result:5.1f} µs/result, "
                        f"others {m.others:.0%} of core 0 before",
                        flush=True,
                    )
                    out.append(m)
    finally:
        server.stop()
    return out


def table(runs: list[Measurement]) -> str:
    rows = ["| runner | results/s (median) | range | gateway µs/result |", "|---|---:|---|---:|"]
    for name in ("flood", REMOTE):
        mine = [m for m in runs if m.runner == name]
        rates = sorted(m.per_s for m in mine)
        cpu = _median([m.cpu_us_per_result for m in mine])
        kind = "in-process" if name == "flood" else "remote"
        rows.append(
            f"| {kind} (`{name}`) | {_median(rates):.0f} | {rates[0]:.0f}-{rates[-1]:.0f} | "
            f"{cpu:.1f} |"
        )
    return "\n".join(rows)


def serve(url: str) -> None:
    """The remote runner process: `flood-remote` until SIGTERM."""

    async def main() -> None:
        client = RunnerClient(
            url,
            Flood(REMOTE),
            max_concurrency=4,
            on_ready=lambda _: print("ready", flush=True),
        )
        task = asyncio.create_task(client.serve_forever())
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    uvloop.run(main())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20_000, help="results per run")
    parser.add_argument("--repeat", type=int, default=3, help="runs per runner")
    parser.add_argument(
        "--runner-rate", type=float, help="STEERWAY_RUNNER_RATE_PER_S (default: the gateway's)"
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=30.0,
        help="before each run, wait up to this many seconds for core 0 to be free of other load",
    )
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    parser.add_argument("--serve", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return 0
    args.profile = None
    prepare(parser, args, sockets=16)
    logdir = Path(tempfile.mkdtemp(prefix="steerway-bench-"))
    print(f"# machine: {machine()}")
    print(f"# gateway on core 0; client and remote runner on core {CLIENT_CORE}")
    start = time.monotonic()
    try:
        runs = uvloop.run(bench(args, logdir))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; every process started was stopped", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(logdir, ignore_errors=True)
    print(f"# {time.monotonic() - start:.0f} s\n")
    print(table(runs))
    local = _median([m.per_s for m in runs if m.runner == "flood"])
    remote = _median([m.per_s for m in runs if m.runner == REMOTE])
    print(f"\nremote / in-process: {remote / local:.2f}")
    return report(args, [], None, {"runs": [asdict(m) for m in runs]})


if __name__ == "__main__":
    sys.exit(main())
