"""Cluster benchmark (issue 12, items 8 and 10): what cluster mode costs, in one run.

    .venv/bin/python bench/cluster.py [--clients 100] [--rate 100] [--duration 10]
                                      [--layouts single 1 2 3] [--repeat 1]
                                      [--lease 10] [--takeovers 3]
                                      [--before e88e9fa] [--before-rates 100 200]
                                      [--parts fanout takeover single-process]
                                      [--json out.json]

Run from the repo root (`make bench-cluster`).  It needs redis-server (Debian's) and
nx-27017 (the `test` extra).  Every server it starts is stopped by its pid, on a free
loopback port, and every temp dir is removed.  Three parts:

1. **fanout**: one conversation, `--clients` picows clients (bench/fanout.py's) and the
   `ticker` runner (bench/runner.py) at `--rate` chunks/s: clients x rate delivered
   chunks/s.  Every server process (the nodes, redis-server and the one nx-27017 that
   every layout shares, since the memory store cannot be shared between processes) is
   pinned to core 0, the clients to core 1.  One more connection, the sender, opens
   first on the owner node (so that the owner takes the conversation's lease there) and
   sends the trigger; it is not measured.  The measured clients sit on:
   - `single`: one `steerway serve` without STEERWAY_REDIS_URL (today's in-process
     bus), on the same nx-27017: the reference;
   - `1`: one node with Redis, the clients on it;
   - `2`: the owner and one other node, every client on the other;
   - `3`: the owner and two other nodes, the clients half on each.
   Latency is from the runner's stamp (on the owner) to the client's arrival, so in the
   cluster it includes the owner's store commit, its publish to Redis, Redis's delivery
   to each node and that node's fan-out.  CPU per delivered chunk is utime+stime from
   /proc/<pid>/stat over the run, summed over every node and redis-server (nx-27017's is
   shown apart: the same events are written in every layout).  Targets: the 3-node p99
   at most the single node's + 2 ms; the nodes' and Redis's CPU per chunk at most 1.5x
   the single node's, for 1, 2 and 3 nodes.
2. **takeover**: two nodes with the lease time `--lease` (default 10 s, the default of
   STEERWAY_LEASE_S); the owner runs a ticker run, a client of the conversation sits on
   the other node; the owner is killed with SIGKILL, and the figure is the time from
   the kill to that client's first event written by the new owner: the run's
   `run.ended` (failed, node_lost).  Target: under the lease time.
3. **single-process** (item 8): bench/fanout.py's gateway (memory store, no Redis, one
   process) from the tree at `--before` (the last main commit without the cluster;
   checked out with `git worktree add` into a temp dir, removed after) and from this
   tree, alternately, `--before-repeat` times at each of `--before-rates`.  Target: this
   tree within 10% of the one before (CPU per chunk and p99, medians).

The exit status is 0 only when every target passes.  Other load on core 0 is shown as
"others" and makes the latencies worse (the machine this ran on is shared).
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
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402
import uvloop  # noqa: E402
from redis.asyncio import Redis  # noqa: E402
from websockets.asyncio.client import connect as ws_client  # noqa: E402

from bench.chunks import trigger_text  # noqa: E402
from bench.fanout import (  # noqa: E402
    CLIENT_CORE,
    CONTENDED,
    SERVER_CORE,
    Delivery,
    RunResult,
    Server,
    _median,
    _stream,
    close,
    connect,
    gather_batched,
    machine,
    prepare,
    proc_cpu_s,
    report,
    run_notes,
    run_result,
    throughput,
)
from bench.persistence import pin  # noqa: E402
from store.embedded import EmbeddedMongo, free_port  # noqa: E402
from tests.cluster import RedisServer  # noqa: E402

# Targets of issue 12, items 8 and 10.
TARGET_EXTRA_P99_MS = 2.0
TARGET_CPU_RATIO = 1.5
TARGET_BEFORE_RATIO = 1.10
T = TypeVar("T")
BEFORE = "e88e9fa"  # main before the cluster (issue 12) was merged
LAYOUTS = ("single", "1", "2", "3")
STREAM_BEFORE_KILL_S = 1.0


# --------------------------------------------------------------------------- processes


class Shared:
    """The servers every layout shares: one nx-27017 and one redis-server, on core 0."""

    def __init__(self, mongo: EmbeddedMongo, redis: RedisServer) -> None:
        self.mongo = mongo
        self.redis = redis

    @property
    def pids(self) -> dict[str, int]:
        assert self.mongo.pid is not None
        assert self.redis.proc is not None
        return {"redis": self.redis.proc.pid, "store": self.mongo.pid}

    @classmethod
    @contextlib.asynccontextmanager
    async def running(cls, directory: Path) -> Any:
        mongo = await EmbeddedMongo.start(directory / "nx")
        redis = RedisServer(free_port())
        try:
            await redis.start()
            shared = cls(mongo, redis)
            for pid in shared.pids.values():
                pin(pid, SERVER_CORE)
            yield shared
        finally:
            await redis.stop()
            await mongo.stop()


def node(
    shared: Shared, logdir: Path, name: str, *, cluster: bool, lease_s: float = 10.0
) -> Server:
    """A `steerway serve` on the shared nx-27017 with the ticker runner; a cluster node
    (STEERWAY_REDIS_URL) when `cluster`, else a single process as today."""
    env = {
        "STEERWAY_STORE": shared.mongo.uri,
        "STEERWAY_MONGODB_URI": "",
        "STEERWAY_REDIS_URL": shared.redis.url if cluster else "",
        "STEERWAY_NODE": name,
        "STEERWAY_LEASE_S": f"{lease_s:g}",
    }
    return Server("gateway", False, "uvloop", logdir, env=env, label=name)


class Layout:
    """The nodes of one layout, seen by `_stream` as one server: its CPU is every node's,
    Redis's (when a cluster) and the store's, by process."""

    def __init__(self, label: str, nodes: list[Server], shared: Shared, cluster: bool) -> None:
        self.label = label
        self.nodes = nodes
        self.owner = nodes[0]
        # where the measured clients sit: every node but the owner, or the owner alone
        self.hosts = nodes[1:] or nodes
        self.extra = shared.pids if cluster else {"store": shared.pids["store"]}

    @property
    def pid(self) -> int:
        return self.owner.pid

    def cpu_parts(self) -> dict[str, float]:
        parts = {n.label: proc_cpu_s(n.pid) for n in self.nodes}
        parts.update((name, proc_cpu_s(pid)) for name, pid in self.extra.items())
        return parts

    def cpu_s(self) -> float:
        return sum(self.cpu_parts().values())


async def holder(shared: Shared, conversation_id: str) -> str | None:
    """The node that holds a conversation's lease, as Redis says (gateway/cluster/leases)."""
    client = Redis(port=shared.redis.port)
    try:
        value = await client.get(f"steerway:lease:{conversation_id}")
    finally:
        await client.aclose()
    return None if value is None else value.decode().split(" ", 1)[0]


async def measured(
    measure: Callable[[], Awaitable[T]], others: Callable[[T], float], retries: int, what: str
) -> T:
    """`measure()` again (up to `retries` times) while other processes took >= 10% of
    core 0 during it, as bench/fanout.py does; the last measurement is kept."""
    for attempt in range(retries + 1):
        result = await measure()
        share = others(result)
        if share < CONTENDED or attempt == retries:
            return result
        print(f"#   {what}: others took {share:.0%} of core {SERVER_CORE}; again", flush=True)
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- fan-out


@dataclass
class LayoutResult:
    layout: str
    nodes: int
    run: RunResult
    cpu_s: dict[str, float]  # by process over the run
    cluster_us_per_chunk: float  # every node and Redis, per delivered chunk
    store_us_per_chunk: float


async def layout_run(
    layout: Layout,
    shared: Shared,
    clients: int,
    rate: float,
    duration: float,
    quiet_wait: float,
    profile_dir: Path | None,
) -> LayoutResult:
    count = max(1, round(rate * duration))
    cid = f"cluster-{layout.label}-{uuid.uuid4().hex[:8]}"
    delivery = Delivery(clients, count)
    sender = await connect(layout.owner.url(cid), Delivery(1, count))
    conns = []
    try:
        if layout.label != "single":
            owner = await holder(shared, cid)
            if owner != layout.owner.label:
                raise RuntimeError(f"{cid} is held by {owner}, not {layout.owner.label}")
        urls = [layout.hosts[i % len(layout.hosts)].url(cid) for i in range(clients)]
        conns = await gather_batched([connect(url, delivery) for url in urls])
        window = await _stream(
            layout, conns, delivery, rate, count, duration, profile_dir, quiet_wait, [sender[0]]
        )  # type: ignore[arg-type]
    finally:
        close([*conns, sender])
    await asyncio.sleep(0.3)
    delivery.analyse([listener for _, listener in conns])
    run = run_result(f"cluster-{layout.label}", rate, clients, duration, count, delivery, window)
    parts: dict[str, float] = window["parts"]
    store = parts.get("store", 0.0)
    chunks = max(1, run.delivered)
    return LayoutResult(
        layout=layout.label,
        nodes=len(layout.nodes),
        run=run,
        cpu_s=parts,
        cluster_us_per_chunk=(sum(parts.values()) - store) / chunks * 1e6,
        store_us_per_chunk=store / chunks * 1e6,
    )


async def fanout_part(args: argparse.Namespace, shared: Shared, logdir: Path) -> list[LayoutResult]:
    results = []
    for repeat in range(args.repeat):
        for label in args.layouts:
            cluster = label != "single"
            count = 1 if label == "single" else int(label)
            names = [f"{'abc'[i]}{repeat}-{label}" for i in range(count)]
            nodes = [node(shared, logdir, name, cluster=cluster) for name in names]
            try:
                for n in nodes:
                    n.start()
                layout = Layout(label, nodes, shared, cluster)
                r = await measured(
                    partial(
                        layout_run,
                        layout,
                        shared,
                        args.clients,
                        args.rate,
                        args.duration,
                        args.quiet_wait,
                        args.profile,
                    ),
                    lambda r: r.run.others_share,
                    args.retries,
                    f"layout {label}",
                )
            finally:
                for n in nodes:
                    n.stop()
            results.append(r)
            print(
                f"#   {label:>6}: {r.run.delivered}/{r.run.expected} delivered, "
                f"p50 {r.run.p50_ms:.2f} p99 {r.run.p99_ms:.2f} ms, nodes+redis "
                f"{r.cluster_us_per_chunk:.2f} us/chunk, store {r.store_us_per_chunk:.2f}, "
                f"others on core {SERVER_CORE} {r.run.others_share:.0%}",
                flush=True,
            )
    return results


# --------------------------------------------------------------------------- take-over


@dataclass
class Takeover:
    lease_s: float
    seconds: float  # from the kill to the client's first event of the new owner
    first_event: str  # its type, status and reason
    new_holder: str | None
    last_offset_before: int
    offset_after: int


async def takeover_run(shared: Shared, logdir: Path, lease_s: float, index: int) -> Takeover:
    owner, other = (
        node(shared, logdir, f"{name}{index}-kill", cluster=True, lease_s=lease_s) for name in "ab"
    )
    cid = f"takeover-{uuid.uuid4().hex[:8]}"
    try:
        owner.start()
        other.start()
        async with (
            ws_client(owner.url(cid), max_size=None) as sender,
            ws_client(other.url(cid), max_size=None) as client,
        ):
            await sender.recv()  # ready: the owner holds the lease from here
            await client.recv()
            held = await holder(shared, cid)
            if held != owner.label:
                raise RuntimeError(f"{cid} is held by {held}, not {owner.label}")
            trigger = {"type": "message", "client_msg_id": "go", "text": trigger_text(50, 10**6)}
            await sender.send(orjson.dumps(trigger).decode())
            last, streaming = 0, 0.0
            async with asyncio.timeout(30):
                while not streaming or time.monotonic() < streaming + STREAM_BEFORE_KILL_S:
                    frame = orjson.loads(await client.recv())  # streams through the other node
                    last = max(last, frame.get("offset", 0))
                    if frame["type"] == "message.delta" and not streaming:
                        streaming = time.monotonic()
            killed = time.monotonic()
            os.kill(owner.pid, signal.SIGKILL)
            async with asyncio.timeout(lease_s * 3):
                while True:
                    frame = orjson.loads(await client.recv())
                    if frame["type"] != "message.delta" and frame.get("offset", 0) > last:
                        break  # the owner's last deltas may still arrive; this is new
                    last = max(last, frame.get("offset", 0))
            seconds = time.monotonic() - killed
            first = f"{frame['type']} {frame.get('status', '')} {frame.get('reason', '')}".strip()
            return Takeover(
                lease_s, seconds, first, await holder(shared, cid), last, frame.get("offset", 0)
            )
    finally:
        owner.stop()
        other.stop()


async def takeover_part(args: argparse.Namespace, shared: Shared, logdir: Path) -> list[Takeover]:
    out = []
    for i in range(args.takeovers):
        t = await takeover_run(shared, logdir, args.lease, i)
        out.append(t)
        print(
            f"#   take-over {i + 1}: {t.seconds:.2f} s after kill -9 ({t.first_event}, "
            f"now held by {t.new_holder}; lease {t.lease_s:g} s)",
            flush=True,
        )
    return out


# --------------------------------------------------------------------------- item 8


@contextlib.contextmanager
def checkout(rev: str) -> Any:
    """The tree at `rev`, as a temporary git worktree that is removed after."""
    path = Path(tempfile.mkdtemp(prefix="steerway-before-")) / "tree"
    git = ["git", "-C", str(ROOT)]
    subprocess.run([*git, "worktree", "add", "--detach", str(path), rev], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        yield path
    finally:
        subprocess.run([*git, "worktree", "remove", "--force", str(path)], check=False)
        shutil.rmtree(path.parent, ignore_errors=True)


def imported_from(root: Path) -> str:
    """Where a server started with `root` on PYTHONPATH imports `gateway` from: checked,
    because this interpreter's editable install points at the current tree."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run(
        [sys.executable, "-c", "import gateway; print(gateway.__file__)"],
        cwd=root, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return out.stdout.strip()


async def single_process_part(args: argparse.Namespace, logdir: Path) -> list[RunResult]:
    runs: list[RunResult] = []
    with checkout(args.before) as before:
        where = imported_from(before)
        if not where.startswith(str(before)):
            raise RuntimeError(f"the old tree's server would import {where}")
        print(f"#   before: {args.before} in {before}", flush=True)
        trees = [(f"before-{args.before}", before), ("this-tree", ROOT)]
        for _ in range(args.before_repeat):
            for label, root in trees:
                server = Server("gateway", False, "uvloop", logdir, label=label, root=root)
                try:
                    server.start()
                    for rate in args.before_rates:
                        r = await measured(
                            partial(
                                throughput,
                                server,
                                args.clients,
                                rate,
                                args.duration,
                                None,
                                args.quiet_wait,
                            ),
                            lambda r: r.others_share,
                            args.retries,
                            f"{label} rate {rate:g}",
                        )
                        runs.append(r)
                        print(
                            f"#   {label} rate {rate:g}: {r.delivered}/{r.expected}, p99 "
                            f"{r.p99_ms:.2f} ms, {r.cpu_us_per_chunk:.2f} us/chunk, others "
                            f"{r.others_share:.0%}",
                            flush=True,
                        )
                finally:
                    server.stop()
    return runs


# --------------------------------------------------------------------------- report


def fmt_layouts(results: list[LayoutResult]) -> str:
    head = (
        f"{'layout':<7} {'nodes':>5} {'delivered':>15} {'chunks/s':>8} {'p50 ms':>7} "
        f"{'p90 ms':>7} {'p99 ms':>7} {'max ms':>7} {'us/chunk':>8} {'store us':>8} "
        f"{'others':>6}  CPU share of core {SERVER_CORE} by process"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        run = r.run
        share = ", ".join(
            f"{name} {cpu / run.wall_s:.0%}" for name, cpu in r.cpu_s.items() if run.wall_s > 0
        )
        lines.append(
            f"{r.layout:<7} {r.nodes:>5} {f'{run.delivered}/{run.expected}':>15} "
            f"{run.delivered_per_s:>8.0f} {run.p50_ms:>7.2f} {run.p90_ms:>7.2f} "
            f"{run.p99_ms:>7.2f} {run.max_ms:>7.1f} {r.cluster_us_per_chunk:>8.2f} "
            f"{r.store_us_per_chunk:>8.2f} {run.others_share:>6.0%}  {share}"
        )
        notes = run_notes(run)
        if notes:
            lines.append("        ! " + "; ".join(notes))
    lines.append(
        "us/chunk: CPU of every node and redis-server per delivered chunk; store us: "
        "nx-27017's; others: other processes' share of core 0 during the run"
    )
    return "\n".join(lines)


def fmt_single_process(runs: list[RunResult]) -> str:
    head = (
        f"{'tree':<18} {'rate':>5} {'delivered':>15} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'us/chunk':>8} {'others':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in runs:
        lines.append(
            f"{r.server:<18} {r.rate:>5g} {f'{r.delivered}/{r.expected}':>15} "
            f"{r.p50_ms:>7.2f} {r.p99_ms:>7.2f} {r.cpu_us_per_chunk:>8.2f} {r.others_share:>6.0%}"
        )
    return "\n".join(lines)


def verdicts(
    layouts: list[LayoutResult], takeovers: list[Takeover], single: list[RunResult], before: str
) -> list[tuple[bool, str]]:
    out: list[tuple[bool, str]] = []
    by: dict[str, list[LayoutResult]] = {}
    for r in layouts:
        by.setdefault(r.layout, []).append(r)
    for label, group in by.items():
        complete = all(r.run.complete for r in group)
        got = sum(r.run.delivered for r in group), sum(r.run.expected for r in group)
        out.append((complete, f"layout {label}: every chunk delivered ({got[0]}/{got[1]})"))
    ref = by.get("single")
    if ref:
        ref_p99 = _median([r.run.p99_ms for r in ref])
        ref_cpu = _median([r.cluster_us_per_chunk for r in ref])
        rate = ref[0].run.clients * ref[0].run.rate
        for label, group in by.items():
            if label == "single":
                continue
            if label == "3":
                p99 = _median([r.run.p99_ms for r in group])
                out.append((
                    p99 <= ref_p99 + TARGET_EXTRA_P99_MS,
                    f"3 nodes, clients on the two non-owners, {rate:,.0f} chunks/s: p99 "
                    f"{p99:.2f} ms <= single node's {ref_p99:.2f} + {TARGET_EXTRA_P99_MS:g} ms",
                ))  # fmt: skip
            cpu = _median([r.cluster_us_per_chunk for r in group])
            ratio = cpu / ref_cpu if ref_cpu > 0 else float("inf")
            out.append((
                ratio <= TARGET_CPU_RATIO,
                f"{label} node(s) + Redis: CPU {cpu:.2f} us/chunk = {ratio:.2f}x the single "
                f"node's {ref_cpu:.2f} (<= {TARGET_CPU_RATIO:g}x)",
            ))  # fmt: skip
    for t in takeovers:
        ok = t.seconds < t.lease_s and t.first_event == "run.ended failed node_lost"
        out.append((
            ok,
            f"kill -9 of the owner to the first event of the new owner ({t.first_event}): "
            f"{t.seconds:.2f} s < lease {t.lease_s:g} s",
        ))  # fmt: skip
    rates = sorted({r.rate for r in single})
    for rate in rates:
        old = [r for r in single if r.rate == rate and r.server.startswith("before")]
        new = [r for r in single if r.rate == rate and r.server == "this-tree"]
        if not old or not new:
            continue
        at = f"single process, {new[0].clients * rate:,.0f} chunks/s ({len(new)} runs each)"
        for name, attr in (("CPU per chunk", "cpu_us_per_chunk"), ("p99", "p99_ms")):
            o = _median([getattr(r, attr) for r in old])
            n = _median([getattr(r, attr) for r in new])
            ratio = n / o if o > 0 else float("inf")
            out.append((
                ratio <= TARGET_BEFORE_RATIO,
                f"{at}: {name} {n:.2f} = {ratio:.2f}x {before}'s {o:.2f} "
                f"(<= {TARGET_BEFORE_RATIO:.2f}x)",
            ))  # fmt: skip
    return out


# --------------------------------------------------------------------------- main


async def bench(
    args: argparse.Namespace, logdir: Path
) -> tuple[list[LayoutResult], list[Takeover], list[RunResult]]:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    layouts: list[LayoutResult] = []
    takeovers: list[Takeover] = []
    single: list[RunResult] = []
    if "fanout" in args.parts or "takeover" in args.parts:
        async with Shared.running(logdir) as shared:
            if "fanout" in args.parts:
                print("# fanout: layouts " + " ".join(args.layouts), flush=True)
                layouts = await fanout_part(args, shared, logdir)
            if "takeover" in args.parts:
                print(f"# takeover: lease {args.lease:g} s", flush=True)
                takeovers = await takeover_part(args, shared, logdir)
    if "single-process" in args.parts:
        print(f"# single-process: {args.before} against this tree", flush=True)
        single = await single_process_part(args, logdir)
    return layouts, takeovers, single


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=100, help="measured clients")
    parser.add_argument("--rate", type=float, default=100.0, help="runner chunks per second")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of streaming")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    parser.add_argument("--repeat", type=int, default=1, help="runs of each layout")
    parser.add_argument("--lease", type=float, default=10.0, help="take-over: STEERWAY_LEASE_S")
    parser.add_argument("--takeovers", type=int, default=3, help="kills of an owner")
    parser.add_argument("--before", default=BEFORE, help="the tree item 8 compares against")
    parser.add_argument("--before-rates", type=float, nargs="+", default=[100.0, 200.0])
    parser.add_argument("--before-repeat", type=int, default=2, help="runs of each tree")
    parser.add_argument(
        "--parts",
        nargs="+",
        default=["fanout", "takeover", "single-process"],
        choices=["fanout", "takeover", "single-process"],
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=30.0,
        help="before each run, wait up to this many seconds for core 0 to be free of other load",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=2,
        help="measure a run again when other processes took >= 10%% of core 0 meanwhile",
    )
    parser.add_argument(
        "--profile", type=Path, help="attach py-spy to the owner node in each layout run"
    )
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    parser.add_argument("--keep-logs", action="store_true", help="keep the servers' logs")
    args = parser.parse_args()
    if not 0 < args.duration <= 600:
        parser.error("--duration must be in (0, 600]")
    if args.clients < 2:
        parser.error("--clients must be >= 2 (the 3-node layout splits them over two nodes)")

    prepare(parser, args, sockets=4 * args.clients)
    logdir = Path(tempfile.mkdtemp(prefix="steerway-bench-cluster-"))
    print(f"# machine: {machine()}; load average {os.getloadavg()}")
    print(
        f"# servers on core {SERVER_CORE}, clients on core {CLIENT_CORE}; {args.clients} "
        f"clients x {args.rate:g} chunks/s = {args.clients * args.rate:,.0f} delivered/s, "
        f"{args.duration:g} s each"
    )
    try:
        layouts, takeovers, single = uvloop.run(bench(args, logdir))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; every server started was stopped", file=sys.stderr)
        return 130
    finally:
        if not args.keep_logs:
            shutil.rmtree(logdir, ignore_errors=True)
    print()
    if layouts:
        print(fmt_layouts(layouts))
        print()
    if takeovers:
        for t in takeovers:
            print(
                f"take-over: {t.seconds:.2f} s from kill -9 to {t.first_event} at offset "
                f"{t.offset_after} (last before: {t.last_offset_before}), held by "
                f"{t.new_holder}, lease {t.lease_s:g} s"
            )
        print()
    if single:
        print(fmt_single_process(single))
        print()
    print(f"# load average after: {os.getloadavg()}")
    return report(
        args,
        verdicts(layouts, takeovers, single, args.before),
        None,
        {
            "layouts": [asdict(r) for r in layouts],
            "takeovers": [asdict(t) for t in takeovers],
            "single_process": [asdict(r) for r in single],
        },
    )


if __name__ == "__main__":
    sys.exit(main())
