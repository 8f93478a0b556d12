"""Persistence benchmark: the fan-out on the MongoDB store against the memory store,
and raw event append throughput on nx-27017.

    .venv/bin/python bench/persistence.py [--rate 1000] [--scenarios 1x10 10x10]
                                          [--duration 10] [--repeat 1]
                                          [--batches 1 16 256] [--appenders 1 10 100]
                                          [--append-seconds 3] [--json out.json]
                                          [--profile DIR] [--skip-fanout] [--skip-append]

Run from the repo root (`make bench-persistence`).  Two parts, in one run:

1. **Fan-out** (the machinery of bench/fanout.py): `steerway serve` pinned to core 0
   with the `ticker` runner, once with `STEERWAY_STORE=memory` and once with
   `STEERWAY_STORE=auto` (the embedded nx-27017, started by the gateway, data in a
   temp dir; it inherits core 0), and picows clients pinned to core 1.  A scenario
   `CxN` is C conversations of N clients each; each conversation streams
   `rate / C` chunks/s, so `rate` events/s are appended in all (one event per chunk
   while the clients keep up: the "events" and "commits" columns come from the
   gateway's /metrics); several conversations start their runs spread evenly over
   one period, not in phase.  Latency is from the runner's stamp to the client's
   arrival, so with the store it includes the group commit.  Target (issue 4,
   item 7): p99 with the store at most 10 ms above the memory store's, and every
   chunk delivered.
2. **Raw append** on nx-27017, no gateway: an `EmbeddedMongo` (pinned to core 0)
   and a `MongoStore` in this process (core 1).  Events with ~250-byte payloads
   (shaped like `message.delta`) are written through `store.write` in batches of
   each `--batches` size, one write at a time; then through `GroupCommitter` by
   each of `--appenders` concurrent appenders, each on its own conversation,
   appending one event plus its conversation's document per write, as an actor
   does, and again with the event alone (`GroupCommitter events`).

Every process is stopped by its pid at the end (the gateway stops its nx-27017;
the bench kills it by pid if it did not), and the temp dirs are removed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402
import uvloop  # noqa: E402

from bench.fanout import (  # noqa: E402
    CLIENT_CORE,
    CONTENDED,
    SERVER_CORE,
    Profiler,
    RunResult,
    Server,
    _median,
    client_check,
    core_busy_s,
    machine,
    percentile,
    prepare,
    proc_cpu_s,
    report,
    run_notes,
    throughput,
    wait_quiet,
)
from store.base import ConversationRecord, EventRecord, WriteBatch  # noqa: E402
from store.commit import GroupCommitter  # noqa: E402
from store.embedded import EmbeddedMongo  # noqa: E402
from store.mongo import MongoStore  # noqa: E402

TARGET_EXTRA_P99_MS = 10.0  # issue 4, item 7: store p99 <= memory p99 + 10 ms
PAYLOAD_BYTES = 250
NX = "nx-27017"


# --------------------------------------------------------------------------- processes


def pin(pid: int, core: int) -> None:
    """Move every thread of `pid` to `core` (threads started later inherit it)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(tid), {core})


def is_nx(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X") and (b"nx-27017" in cmdline or b"nx_27017" in cmdline)


class StoreServer(Server):
    """The gateway on one store: `memory`, or `nx-27017` (embedded, `--store auto`, with
    its data in a temp dir).  The embedded server is the gateway's child; its CPU counts
    as the server's while it runs on the server's core."""

    def __init__(self, store: str, logdir: Path, store_core: int) -> None:
        self.store = store
        self.store_core = store_core
        self.data_dir: Path | None = None
        env = {"STEERWAY_STORE": "memory"}
        if store == NX:
            self.data_dir = Path(tempfile.mkdtemp(prefix="steerway-bench-data-"))
            # `auto` with no STEERWAY_MONGODB_URI: the embedded server, as `steerway serve`
            env = {
                "STEERWAY_STORE": "auto",
                "STEERWAY_MONGODB_URI": "",
                "STEERWAY_DATA_DIR": str(self.data_dir),
            }
        # the label names the gateway's py-spy profiles: gateway-<store>-r<rate>-c<clients>
        super().__init__("gateway", False, "uvloop", logdir, env=env, label=f"gateway-{store}")
        self.store_pid: int | None = None

    def start(self, timeout: float = 60.0) -> None:
        super().start(timeout)
        if self.data_dir is None:
            return
        pid_file = self.data_dir / "nx-27017.pid"
        pid = int(pid_file.read_text().strip())
        with open(f"/proc/{pid}/stat") as f:
            ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        if ppid != self.pid or not is_nx(pid):
            raise RuntimeError(f"{pid_file} names pid {pid}, not the gateway's nx-27017")
        self.store_pid = pid
        if self.store_core != SERVER_CORE:
            pin(pid, self.store_core)

    def store_cpu_s(self) -> float:
        return proc_cpu_s(self.store_pid) if self.store_pid else 0.0

    def cpu_s(self) -> float:
        own = super().cpu_s()
        if self.store_core == SERVER_CORE:
            own += self.store_cpu_s()
        return own

    def metrics(self) -> dict[str, float]:
        url = f"http://127.0.0.1:{self.port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            return parse_metrics(response.read().decode())

    def stop(self) -> None:
        try:
            super().stop()  # SIGINT: the gateway stops its nx-27017 and exits
        finally:
            pid, self.store_pid = self.store_pid, None
            if pid is not None and is_nx(pid):
                print(f"#   nx-27017 pid {pid} outlived the gateway: killing it", flush=True)
                for sig in (signal.SIGTERM, signal.SIGKILL):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
                    deadline = time.monotonic() + 5
                    while is_nx(pid) and time.monotonic() < deadline:
                        time.sleep(0.05)
                    if not is_nx(pid):
                        break
            if self.data_dir is not None:
                shutil.rmtree(self.data_dir, ignore_errors=True)


_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)$")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {"name{labels}": value}."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match:
            out[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return out


def _sum(metrics: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in metrics.items() if k == prefix or k.startswith(prefix + "{"))


def delivery_buckets(before: dict[str, float], after: dict[str, float]) -> list[tuple[float, int]]:
    """The gateway's own result-to-first-send histogram over a run: (le seconds, count)."""
    name = "steerway_result_delivery_seconds_bucket"
    out = []
    for key, value in after.items():
        if key.startswith(name + "{"):
            le = re.search(r'le="([^"]+)"', key)
            if le:
                out.append((float(le.group(1)), int(value - before.get(key, 0.0))))
    return sorted(out)


def bucket_quantile(buckets: list[tuple[float, int]], q: float) -> float:
    """The upper bound (ms) of the bucket holding quantile q; inf past the last bucket."""
    if not buckets or buckets[-1][1] == 0:
        return float("nan")
    total = buckets[-1][1]
    for le, cumulative in buckets:
        if cumulative >= q * total:
            return le * 1000
    return float("inf")


# --------------------------------------------------------------------------- fan-out


@dataclass
class Scenario:
    conversations: int
    clients_each: int

    @classmethod
    def parse(cls, text: str) -> Scenario:
        match = re.fullmatch(r"(\d+)x(\d+)", text)
        if not match or int(match.group(1)) < 1 or int(match.group(2)) < 1:
            raise argparse.ArgumentTypeError(f"expected CONVERSATIONSxCLIENTS, got {text!r}")
        return cls(int(match.group(1)), int(match.group(2)))

    @property
    def name(self) -> str:
        return f"{self.conversations}x{self.clients_each}"

    @property
    def clients(self) -> int:
        return self.conversations * self.clients_each


@dataclass
class FanoutRun:
    store: str
    scenario: str
    conversations: int
    events_per_s: float  # appended, in all (the runner rate times the conversations)
    run: RunResult
    events: int  # appended during the measurement (gateway /metrics)
    commits: int  # group commits during the measurement (gateway /metrics)
    gateway_cpu_s: float
    store_cpu_s: float  # nx-27017's, over the whole measurement (connects included)
    client_core_others: float  # other processes' share of the client's core, same span
    internal_p50_ms: float  # the gateway's result-to-first-send histogram (bucket bounds)
    internal_p99_ms: float


async def fanout_run(
    server: StoreServer, scenario: Scenario, args: argparse.Namespace
) -> FanoutRun:
    rate_each = args.rate / scenario.conversations
    me = os.getpid()
    if args.quiet_wait > 0:  # throughput() waits for core 0; the client's core matters too

        def ours_on_client_core() -> float:
            nx = server.store_cpu_s() if server.store_core == CLIENT_CORE else 0.0
            return proc_cpu_s(me) + nx

        await wait_quiet(ours_on_client_core, args.quiet_wait, core=CLIENT_CORE)
    before = await asyncio.to_thread(server.metrics)
    store0, mine0, busy0, t0 = (
        server.store_cpu_s(),
        proc_cpu_s(me),
        core_busy_s(CLIENT_CORE),
        time.monotonic(),
    )
    profiler = None
    if args.profile is not None and server.store_pid is not None:
        out = args.profile / f"{NX}-server-{scenario.name}-{uuid.uuid4().hex[:6]}.folded"
        profiler = Profiler(server.store_pid, out, args.duration + 3)
    try:
        run = await throughput(
            server,
            scenario.clients,
            rate_each,
            args.duration,
            args.profile,
            args.quiet_wait,
            conversations=scenario.conversations,
        )
    finally:
        if profiler is not None:
            await asyncio.to_thread(profiler.wait)
    store_cpu = server.store_cpu_s() - store0
    ours = proc_cpu_s(me) - mine0 + (store_cpu if server.store_core == CLIENT_CORE else 0.0)
    client_core_others = max(0.0, core_busy_s(CLIENT_CORE) - busy0 - ours) / (time.monotonic() - t0)
    after = await asyncio.to_thread(server.metrics)
    buckets = delivery_buckets(before, after)
    on_core = server.store_core == SERVER_CORE and server.store_pid is not None
    # run.server_cpu_s covers the window only; the store's share of it is estimated
    # by its CPU over the whole measurement (it is idle outside the window)
    gateway_cpu = run.server_cpu_s - (store_cpu if on_core else 0.0)
    return FanoutRun(
        store=server.store,
        scenario=scenario.name,
        conversations=scenario.conversations,
        events_per_s=args.rate,
        run=run,
        events=int(
            _sum(after, "steerway_events_appended_total")
            - _sum(before, "steerway_events_appended_total")
        ),
        commits=int(
            after.get("steerway_store_batches", 0) - before.get("steerway_store_batches", 0)
        ),
        gateway_cpu_s=max(0.0, gateway_cpu),
        store_cpu_s=store_cpu,
        client_core_others=client_core_others,
        internal_p50_ms=bucket_quantile(buckets, 0.50),
        internal_p99_ms=bucket_quantile(buckets, 0.99),
    )


async def fanout(args: argparse.Namespace, logdir: Path) -> list[FanoutRun]:
    runs: list[FanoutRun] = []
    for rep in range(args.repeat):
        # alternate which store goes first, so slow drifts of the machine hit both alike
        stores = args.stores if rep % 2 == 0 else list(reversed(args.stores))
        for store in stores:
            server = StoreServer(store, logdir, args.store_core)
            print(f"# gateway, store {store}: starting on port {server.port}", flush=True)
            try:
                server.start()
                extra = f", {NX} pid {server.store_pid}" if server.store_pid else ""
                print(f"#   pid {server.pid}{extra}, log {server.log_path}", flush=True)
                for scenario in args.scenarios:
                    for attempt in range(args.retries + 1):
                        r = await fanout_run(server, scenario, args)
                        others = max(r.run.others_share, r.client_core_others)
                        if others < CONTENDED or attempt == args.retries:
                            break
                        print(
                            f"#   {scenario.name}: other processes took {r.run.others_share:.0%} "
                            f"of core {SERVER_CORE} and {r.client_core_others:.0%} of core "
                            f"{CLIENT_CORE}; measuring again",
                            flush=True,
                        )
                    runs.append(r)
                    print(
                        f"#   {scenario.name}: {r.run.delivered}/{r.run.expected} delivered, "
                        f"{r.events} events in {r.commits} commits, p50 {r.run.p50_ms:.2f} "
                        f"p99 {r.run.p99_ms:.2f} max {r.run.max_ms:.1f} ms, "
                        f"others on cores 0/1 {r.run.others_share:.0%}/"
                        f"{r.client_core_others:.0%}",
                        flush=True,
                    )
            finally:
                server.stop()
    return runs


# --------------------------------------------------------------------------- raw append


def payload(cid: str, offset: int, run_id: str, message_id: str) -> str:
    """A `message.delta` shaped like the gateway's, padded to about PAYLOAD_BYTES."""
    frame = {
        "type": "message.delta",
        "offset": offset,
        "ts": time.time_ns() // 1_000_000,
        "conversation_id": cid,
        "run_id": run_id,
        "message_id": message_id,
        "delta": "",
    }
    pad = max(0, PAYLOAD_BYTES - len(orjson.dumps(frame)))
    frame["delta"] = ("lorem ipsum dolor sit amet " * 10)[:pad]
    return orjson.dumps(frame).decode()


class Appender:
    """One conversation's events, numbered from 1."""

    def __init__(self, prefix: str) -> None:
        self.cid = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.run_id = uuid.uuid4().hex
        self.message_id = uuid.uuid4().hex
        self.head = 0

    def events(self, n: int) -> list[EventRecord]:
        out = []
        for _ in range(n):
            self.head += 1
            out.append(
                EventRecord(
                    conversation_id=self.cid,
                    offset=self.head,
                    type="message.delta",
                    ts=time.time_ns() // 1_000_000,
                    payload=payload(self.cid, self.head, self.run_id, self.message_id),
                    run_id=self.run_id,
                )
            )
        return out

    def conversation(self) -> ConversationRecord:
        return ConversationRecord(
            conversation_id=self.cid,
            head=self.head,
            last_activity=time.time_ns() // 1_000_000,
            runner="ticker",
            active_run={"run_id": self.run_id, "status": "running", "runner": "ticker"},
        )


@dataclass
class AppendResult:
    mode: str  # "store.write", "GroupCommitter" (event + head) or "GroupCommitter events"
    batch: int  # events per store.write, or concurrent appenders
    events: int
    writes: int  # store.write calls (commits, for GroupCommitter)
    seconds: float
    events_per_s: float
    p50_ms: float  # of one store.write, or of one append through the committer
    p99_ms: float
    max_ms: float
    store_cpu_share: float  # nx-27017's CPU / wall
    driver_cpu_share: float  # this process's CPU / wall (pymongo, payloads)
    payload_bytes: int = PAYLOAD_BYTES
    notes: list[str] = field(default_factory=list)


def _latency(values: list[int]) -> tuple[float, float, float]:
    ordered = sorted(values)
    top = ordered[-1] / 1e6 if ordered else float("nan")
    return percentile(ordered, 0.50), percentile(ordered, 0.99), top


class _Cpu:
    """CPU seconds of the store and of this process, and wall time, from creation on."""

    def __init__(self, mongo_pid: int) -> None:
        self.mongo_pid, self.me = mongo_pid, os.getpid()
        self.nx0, self.me0 = proc_cpu_s(mongo_pid), proc_cpu_s(self.me)
        self.t0 = time.monotonic()


def _appended(
    mode: str, batch: int, events: int, writes: int, latencies: list[int], cpu: _Cpu
) -> AppendResult:
    wall = time.monotonic() - cpu.t0
    p50, p99, top = _latency(latencies)
    return AppendResult(
        mode=mode,
        batch=batch,
        events=events,
        writes=writes,
        seconds=wall,
        events_per_s=events / wall,
        p50_ms=p50,
        p99_ms=p99,
        max_ms=top,
        store_cpu_share=(proc_cpu_s(cpu.mongo_pid) - cpu.nx0) / wall,
        driver_cpu_share=(proc_cpu_s(cpu.me) - cpu.me0) / wall,
    )


async def append_direct(
    store: MongoStore, mongo_pid: int, size: int, seconds: float
) -> AppendResult:
    appender = Appender(f"raw-b{size}")
    latencies: list[int] = []
    events = 0
    cpu = _Cpu(mongo_pid)
    deadline = cpu.t0 + seconds
    while time.monotonic() < deadline:
        batch = WriteBatch(events=appender.events(size))
        start = time.perf_counter_ns()
        await store.write(batch)
        latencies.append(time.perf_counter_ns() - start)
        events += size
    return _appended("store.write", size, events, len(latencies), latencies, cpu)


async def append_grouped(
    store: MongoStore, mongo_pid: int, appenders: int, seconds: float, head: bool
) -> AppendResult:
    committer = GroupCommitter(store)
    committer.start()
    latencies: list[int] = []
    cpu = _Cpu(mongo_pid)
    deadline = cpu.t0 + seconds

    async def one(appender: Appender) -> int:
        n = 0
        while time.monotonic() < deadline:
            batch = WriteBatch(events=appender.events(1))
            if head:  # as the gateway writes: the conversation document with every batch
                batch.conversations.append(appender.conversation())
            start = time.perf_counter_ns()
            await committer.write(batch)
            latencies.append(time.perf_counter_ns() - start)
            n += 1
        return n

    try:
        counts = await asyncio.gather(*(one(Appender(f"gc-{appenders}")) for _ in range(appenders)))
    finally:
        await committer.stop()
    mode = "GroupCommitter" if head else "GroupCommitter events"
    return _appended(mode, appenders, sum(counts), committer.batches, latencies, cpu)


async def raw_append(args: argparse.Namespace) -> list[AppendResult]:
    data_dir = Path(tempfile.mkdtemp(prefix="steerway-bench-raw-"))
    results: list[AppendResult] = []
    mongo: EmbeddedMongo | None = None
    try:
        mongo = await EmbeddedMongo.start(data_dir)
        assert mongo.pid is not None
        pin(mongo.pid, SERVER_CORE)
        print(f"# raw append: {NX} pid {mongo.pid} on core {SERVER_CORE}, {mongo.uri}", flush=True)
        store = await MongoStore.open(mongo.uri, "steerway_bench")
        try:
            await append_direct(store, mongo.pid, 16, 0.5)  # warm up the connection pool
            for size in args.batches:
                r = await append_direct(store, mongo.pid, size, args.append_seconds)
                results.append(r)
                print(
                    f"#   store.write x{size}: {r.events_per_s:,.0f} events/s, "
                    f"write p50 {r.p50_ms:.2f} p99 {r.p99_ms:.2f} ms",
                    flush=True,
                )
            for head in (True, False):
                for n in args.appenders:
                    r = await append_grouped(store, mongo.pid, n, args.append_seconds, head)
                    results.append(r)
                    print(
                        f"#   {r.mode}, {n} appenders: {r.events_per_s:,.0f} events/s in "
                        f"{r.writes} commits, append p50 {r.p50_ms:.2f} p99 {r.p99_ms:.2f} ms",
                        flush=True,
                    )
        finally:
            await store.close()
    finally:
        if mongo is not None:
            await mongo.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    return results


# --------------------------------------------------------------------------- report


def fmt_fanout(runs: list[FanoutRun]) -> str:
    head = (
        f"{'store':<9} {'conv x cl':>9} {'events/s':>8} {'delivered':>15} {'events':>6} "
        f"{'commits':>7} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'max ms':>7} "
        f"{'gw int p99':>10} {'gw CPU':>6} {'nx CPU':>6} {'cli CPU':>7} {'others':>6} "
        f"{'oth c1':>6} {'steal':>5}"
    )
    lines = [head, "-" * len(head)]
    for f in runs:
        r = f.run
        wall = r.wall_s or float("nan")
        nx = f"{f.store_cpu_s / wall:>6.0%}" if f.store == NX else f"{'-':>6}"
        lines.append(
            f"{f.store:<9} {f.scenario:>9} {f.events_per_s:>8g} "
            f"{f'{r.delivered}/{r.expected}':>15} {f.events:>6} {f.commits:>7} "
            f"{r.p50_ms:>7.2f} {r.p90_ms:>7.2f} {r.p99_ms:>7.2f} {r.max_ms:>7.1f} "
            f"{f'<= {f.internal_p99_ms:g}':>10} {f.gateway_cpu_s / wall:>6.0%} {nx} "
            f"{r.client_cpu_share:>7.0%} {r.others_share:>6.0%} {f.client_core_others:>6.0%} "
            f"{r.steal_share:>5.0%}"
        )
        notes = run_notes(r)
        if f.client_core_others >= CONTENDED:
            notes.append(f"other processes used {f.client_core_others:.0%} of core {CLIENT_CORE}")
        if notes:
            lines.append("          ! " + "; ".join(notes))
    return "\n".join(lines)


def fmt_append(results: list[AppendResult]) -> str:
    head = (
        f"{'how':<22} {'batch':>13} {'events':>7} {'writes':>6} {'events/s':>9} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'nx CPU':>6} {'driver CPU':>10}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        batch = f"{r.batch} events" if r.mode == "store.write" else f"{r.batch} appenders"
        lines.append(
            f"{r.mode:<22} {batch:>13} {r.events:>7} {r.writes:>6} {r.events_per_s:>9,.0f} "
            f"{r.p50_ms:>7.2f} {r.p99_ms:>7.2f} {r.max_ms:>7.1f} {r.store_cpu_share:>6.0%} "
            f"{r.driver_cpu_share:>10.0%}"
        )
    lines.append(
        f"(payloads of {PAYLOAD_BYTES} bytes; latency is of one store.write, or of one append "
        "through the committer;\n GroupCommitter: each append is one event plus its "
        "conversation's document, as the gateway writes; `events`: the event alone)"
    )
    return "\n".join(lines)


def verdicts(runs: list[FanoutRun], stores: list[str]) -> list[tuple[bool, str]]:
    out: list[tuple[bool, str]] = []
    scenarios = list(dict.fromkeys(f.scenario for f in runs))
    for name in scenarios:
        group = {s: [f for f in runs if f.scenario == name and f.store == s] for s in stores}
        first = next(f for f in runs if f.scenario == name)
        at = (
            f"{name} ({first.conversations} conversation(s), {first.run.clients} clients, "
            f"{first.events_per_s:g} events/s)"
        )
        n = max(len(g) for g in group.values())
        if n > 1:
            at += f", median of {n} runs"
        busy = max(max(f.run.others_share, f.client_core_others) for g in group.values() for f in g)
        if busy >= CONTENDED:
            at += f" (contended: others took up to {busy:.0%} of a core)"
        for store, g in group.items():
            delivered = sum(f.run.delivered for f in g)
            expected = sum(f.run.expected for f in g)
            ok = all(f.run.complete for f in g)
            out.append((ok, f"{at}, {store}: every chunk delivered ({delivered}/{expected})"))
        memory, nx = group.get("memory", []), group.get(NX, [])
        if memory and nx:
            m99 = _median([f.run.p99_ms for f in memory])
            s99 = _median([f.run.p99_ms for f in nx])
            spread = ""
            if n > 1:
                spread = (
                    f" (runs {min(f.run.p99_ms for f in nx):.2f}-"
                    f"{max(f.run.p99_ms for f in nx):.2f} vs "
                    f"{min(f.run.p99_ms for f in memory):.2f}-"
                    f"{max(f.run.p99_ms for f in memory):.2f})"
                )
            out.append(
                (
                    s99 <= m99 + TARGET_EXTRA_P99_MS,
                    f"{at}: p99 {NX} {s99:.2f} ms <= memory {m99:.2f} ms + "
                    f"{TARGET_EXTRA_P99_MS:g} ms (+{s99 - m99:.2f} ms){spread}",
                )
            )
    return out


# --------------------------------------------------------------------------- main


async def bench(
    args: argparse.Namespace, logdir: Path
) -> tuple[list[FanoutRun], list[AppendResult]]:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    runs = [] if args.skip_fanout else await fanout(args, logdir)
    appends = [] if args.skip_append else await raw_append(args)
    return runs, appends


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rate", type=float, default=1000.0, help="events/s appended, over all conversations"
    )
    parser.add_argument(
        "--scenarios",
        type=Scenario.parse,
        nargs="+",
        default=[Scenario(1, 10), Scenario(10, 10)],
        help="CONVERSATIONSxCLIENTS each (default: 1x10 10x10)",
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of streaming")
    parser.add_argument("--repeat", type=int, default=1, help="fan-out runs per store, scenario")
    parser.add_argument(
        "--stores", nargs="+", default=["memory", NX], choices=["memory", NX], help="stores to run"
    )
    parser.add_argument(
        "--store-core",
        type=int,
        default=SERVER_CORE,
        help=f"core of the gateway's nx-27017 (default {SERVER_CORE}, the gateway's own)",
    )
    parser.add_argument("--quiet-wait", type=float, default=60.0)
    parser.add_argument("--retries", type=int, default=2)
    parser.add_argument(
        "--batches", type=int, nargs="+", default=[1, 16, 256], help="events per store.write"
    )
    parser.add_argument(
        "--appenders", type=int, nargs="*", default=[1, 10, 100],
        help="concurrent appenders through GroupCommitter",
    )  # fmt: skip
    parser.add_argument("--append-seconds", type=float, default=3.0, help="per raw measurement")
    parser.add_argument("--skip-fanout", action="store_true")
    parser.add_argument("--skip-append", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    parser.add_argument(
        "--profile", type=Path, help="py-spy on the gateway and nx-27017 (folded stacks here)"
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the servers' logs")
    args = parser.parse_args()
    if not 0 < args.duration <= 600 or not 0 < args.append_seconds <= 600:
        parser.error("--duration and --append-seconds must be in (0, 600]")
    if not 0 < args.rate <= 100_000:
        parser.error("--rate must be in (0, 100000]")
    if any(b < 1 for b in args.batches) or any(a < 1 for a in args.appenders):
        parser.error("--batches and --appenders must be >= 1")
    if args.store_core not in os.sched_getaffinity(0):
        parser.error(f"--store-core {args.store_core} is not available")

    prepare(parser, args, sockets=2 * max(s.clients for s in args.scenarios))
    logdir = Path(tempfile.mkdtemp(prefix="steerway-bench-"))
    print(f"# machine: {machine()}")
    print(
        f"# gateway on core {SERVER_CORE} ({NX} on core {args.store_core}), client on core "
        f"{CLIENT_CORE}; {args.rate:g} events/s appended, scenarios "
        f"{' '.join(s.name for s in args.scenarios)}, {args.duration:g} s each"
    )
    try:
        runs, appends = uvloop.run(bench(args, logdir))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; every server started was stopped", file=sys.stderr)
        return 130
    finally:
        if args.keep_logs:
            print(f"# logs kept in {logdir}")
        else:
            shutil.rmtree(logdir, ignore_errors=True)
    results: list[tuple[bool, str]] = []
    if runs:
        print()
        print("Fan-out at a fixed append rate: latency from the runner's stamp to the client")
        print(fmt_fanout(runs))
        print(
            "(events, commits: appended and group commits in the measurement, from /metrics; "
            "gw int p99: the gateway's result-to-first-send histogram, bucket bound in ms)"
        )
        results = verdicts(runs, args.stores)
    if appends:
        print()
        print(f"Raw event append on {NX} (no gateway)")
        print(fmt_append(appends))
    print()
    return report(
        args,
        results,
        client_check([f.run for f in runs]) if runs else None,
        {"fanout": [asdict(f) for f in runs], "append": [asdict(a) for a in appends]},
    )


if __name__ == "__main__":
    sys.exit(main())
