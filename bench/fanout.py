"""Fan-out benchmark: the gateway beside a bare `websockets` broadcast server.

    .venv/bin/python bench/fanout.py [--clients 100] [--rates 100 200] [--duration 10]
                                     [--idle-connections 1000] [--json out.json]
                                     [--profile DIR]

Run from the repo root (`make bench`).  It starts, each pinned to core 0 and on
a free loopback port, one server at a time:

* the bare baseline (`bench/baseline.py`: websockets.asyncio.server + broadcast),
* the gateway (`steerway serve`, one uvicorn worker, uvloop, httptools,
  websockets-sansio) with the `ticker` runner of `bench/runner.py`,

and drives them from this process, pinned to core 1, with picows clients: N
clients join one conversation, one sends `rate=R count=R*duration`, the runner
(or the baseline's ticker) streams chunks stamped with CLOCK_MONOTONIC, and the
clients check that every chunk arrives once and in order and record the latency
from the stamp to the arrival.  Server CPU is utime+stime from /proc/<pid>/stat
over the window, divided by the chunks delivered.  Idle memory is the VmRSS
delta of a fresh server over `--idle-connections` idle connections (opened with
the websockets client, which can offer permessage-deflate; picows cannot), with
and without compression.  Every process it starts is stopped by pid at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from array import array
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402
import uvloop  # noqa: E402
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect  # noqa: E402
from websockets.asyncio.client import connect as ws_client  # noqa: E402

from bench.chunks import trigger_text  # noqa: E402

SERVER_CORE = 0
CLIENT_CORE = 1
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Targets of issue 3, item 10.
TARGET_P99_MS = 5.0
TARGET_CPU_RATIO = 2.0
TARGET_IDLE_KIB = 32.0
CONTENDED = 0.10  # other processes' share of core 0 above which a run is flagged
CLIENT_CPU_LIMIT = 0.80  # above this share of its core the client may be the bottleneck


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pin_to_server_core() -> None:
    """preexec_fn: the server runs on core 0 and dies with the benchmark."""
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {SERVER_CORE})
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def core_times(core: int) -> tuple[float, float]:
    """Seconds core `core` spent busy (user + nice + system) and stolen by the hypervisor
    since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{core} "):
                v = [int(x) for x in line.split()[1:]]
                steal = v[7] if len(v) > 7 else 0
                return (v[0] + v[1] + v[2]) / CLK_TCK, steal / CLK_TCK
    return 0.0, 0.0


def core_busy_s(core: int) -> float:
    return core_times(core)[0]


async def wait_quiet(
    server_cpu_s: Callable[[], float],
    max_wait: float,
    threshold: float = 0.10,
    core: int = SERVER_CORE,
) -> float:
    """Wait (up to `max_wait` s) for a second in which other processes use under `threshold`
    of `core` (the server's); other sessions of the machine may be running tests.  Returns
    the share they used in the last second sampled.  `server_cpu_s` is `Server.cpu_s`: the
    CPU seconds of the processes on that core that are ours, and do not count as others."""
    deadline = time.monotonic() + max_wait
    while True:
        busy0, cpu0, t0 = core_busy_s(core), server_cpu_s(), time.monotonic()
        await asyncio.sleep(1.0)
        busy1, cpu1, t1 = core_busy_s(core), server_cpu_s(), time.monotonic()
        others = max(0.0, (busy1 - busy0) - (cpu1 - cpu0)) / (t1 - t0)
        if others < threshold or time.monotonic() >= deadline:
            return others


def proc_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


class Server:
    """One server subprocess on core 0; `stop()` ends it by pid.

    `env` is added to the gateway's environment (bench/persistence.py runs it with
    another store, STEERWAY_STORE=auto); `label` names the server in the results;
    `root` is the source tree it runs (bench/cluster.py runs an older checkout too)."""

    def __init__(
        self,
        kind: str,
        compression: bool,
        baseline_loop: str,
        logdir: Path,
        *,
        env: Mapping[str, str] | None = None,
        label: str | None = None,
        root: Path = ROOT,
    ) -> None:
        self.kind = kind
        self.root = root
        self.compression = compression
        self._label = label or ("gateway" if kind == "gateway" else "baseline")
        self.port = free_port()
        mode = "deflate" if compression else "plain"
        self.log_path = logdir / f"{self._label}-{mode}-{self.port}.log"
        env_extra = dict(env or {})
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
        if kind == "gateway":
            steerway = Path(sys.executable).with_name("steerway")
            # the installed `steerway` runs this checkout; another tree, its own gateway.cli
            if steerway.exists() and root == ROOT:
                cmd = [str(steerway)]
            else:
                cmd = [sys.executable, "-m", "gateway.cli"]
            self.argv = [*cmd, "serve", "--host", "127.0.0.1", "--port", str(self.port)]
            env.update(
                STEERWAY_STORE="memory",
                STEERWAY_RUNNERS="bench.runner:Ticker",
                STEERWAY_RUNNER="ticker",
                STEERWAY_WS_COMPRESSION="true" if compression else "false",
                STEERWAY_LOG_LEVEL="warning",
            )
            env.update(env_extra)
        else:
            self.argv = [sys.executable, "-m", "bench.baseline", "--port", str(self.port)]
            self.argv += ["--loop", baseline_loop] + (["--compression"] if compression else [])
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def label(self) -> str:
        return self._label

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def url(self, cid: str) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/conversations/{cid}"

    def start(self, timeout: float = 30.0) -> None:
        log = open(self.log_path, "wb")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(
            self.argv,
            cwd=self.root,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_pin_to_server_core,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited at start:\n{self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.kind} did not listen within {timeout} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def cpu_s(self) -> float:
        """CPU seconds of the server's processes on core 0 (a subclass may add children)."""
        return proc_cpu_s(self.pid)

    def cpu_parts(self) -> dict[str, float]:
        """`cpu_s` by process, named (bench/cluster.py sums several nodes, Redis and a store)."""
        return {self.label: self.cpu_s()}

    def rss_kib(self) -> int:
        return proc_rss_kib(self.pid)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGINT, 8.0), (signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
            try:
                proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue


def py_spy() -> str | None:
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else shutil.which("py-spy")


class Profiler:
    """py-spy attached to the server for one window (optional, perturbs the figures)."""

    def __init__(self, pid: int, out: Path, duration: float) -> None:
        exe = py_spy()
        assert exe is not None
        self.proc = subprocess.Popen(
            [exe, "record", "--pid", str(pid), "--rate", "250", "--nonblocking", "--format",
             "raw", "--duration", str(max(1, int(duration))), "--output", str(out)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def wait(self) -> None:
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


# --------------------------------------------------------------------------- client


class Delivery:
    """What the clients of one throughput run received.

    While the run streams, a client only stamps and keeps each frame (a few hundred
    nanoseconds), so that its own work adds as little as possible to the latency it
    measures; `analyse()` parses everything once the run is over."""

    def __init__(self, clients: int, count: int) -> None:
        self.clients = clients
        self.count = count
        self.ended = 0  # clients that saw run.ended or were closed
        self.closed: dict[int, int] = {}  # close code -> clients (-1: dropped without one)
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Filled in by analyse():
        self.latency_ns = array("q")
        self.delivered = 0
        self.misordered = 0  # a chunk that is not the next one expected: gap, duplicate, reorder
        self.frames = 0
        self.coalesced = 0
        self.errors: list[str] = []
        self.run_status: str | None = None
        self.first_stamp = 0
        self.last_arrival = 0

    def client_ended(self) -> None:
        self.ended += 1
        if self.ended >= self.clients and not self.finished.done():
            self.finished.set_result(None)

    def analyse(self, listeners: list[FastClient]) -> None:
        lat = self.latency_ns
        first, last = 0, 0
        for client in listeners:
            expected = 0
            for payload, now in zip(client.payloads, client.arrivals, strict=True):
                obj = orjson.loads(payload)
                kind = obj.get("type")
                if kind == "message.delta":
                    self.frames += 1
                    parts = obj["delta"].split(";")
                    if len(parts) > 2:
                        self.coalesced += 1
                    for part in parts:
                        if not part:
                            continue
                        seq_text, _, stamp = part.partition("@")
                        seq, ts = int(seq_text), int(stamp)
                        if seq != expected:
                            self.misordered += 1
                        expected = seq + 1
                        lat.append(now - ts)
                        self.delivered += 1
                        if first == 0 or ts < first:
                            first = ts
                        last = max(last, now)
                elif kind == "run.ended":
                    self.run_status = obj.get("status", "?")
                elif kind == "error":
                    self.errors.append(f"{obj.get('code')}: {obj.get('message')}")
            client.payloads.clear()
        self.first_stamp, self.last_arrival = first, last


_RUN_ENDED = b'"type":"run.ended"'


class FastClient(WSListener):  # type: ignore[misc]
    """A picows listener that stamps each frame's arrival and keeps it for later."""

    def __init__(self, delivery: Delivery) -> None:
        super().__init__()
        self.d = delivery
        self.done = False
        self.recording = False
        self.payloads: list[bytes] = []
        self.arrivals = array("q")
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: WSTransport | None = None
        self.partial: list[bytes] = []

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        now = time.monotonic_ns()
        kind = frame.msg_type
        if kind == WSMsgType.TEXT and frame.fin:
            payload = frame.get_payload_as_bytes()
        elif kind == WSMsgType.CLOSE:
            code = int(frame.get_close_code())
            self.d.closed[code] = self.d.closed.get(code, 0) + 1
            self._end()
            transport.disconnect()
            return
        elif kind in (WSMsgType.TEXT, WSMsgType.CONTINUATION):
            self.partial.append(frame.get_payload_as_bytes())
            if not frame.fin:
                return
            payload, self.partial = b"".join(self.partial), []
        else:
            return
        if self.recording:
            self.payloads.append(payload)
            self.arrivals.append(now)
            if _RUN_ENDED in payload:
                self._end()
        elif not self.ready.done() and orjson.loads(payload).get("type") == "ready":
            self.ready.set_result(None)

    def _end(self) -> None:
        if not self.done:
            self.done = True
            self.d.client_ended()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("disconnected before ready"))
        if not self.done:
            self.d.closed[-1] = self.d.closed.get(-1, 0) + 1
            self._end()


async def gather_batched(coros: list[Any], batch: int = 100) -> list[Any]:
    out: list[Any] = []
    for i in range(0, len(coros), batch):
        out += await asyncio.gather(*coros[i : i + batch])
    return out


@dataclass
class RunResult:
    server: str
    rate: float
    clients: int
    duration: float
    expected: int
    delivered: int
    misordered: int
    frames: int
    coalesced_frames: int
    closed: dict[str, int]
    errors: list[str]
    run_status: str | None
    delivered_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    server_cpu_s: float
    cpu_us_per_chunk: float
    server_cpu_share: float
    client_cpu_share: float
    others_share: float  # other processes' CPU on the server's core during the window
    steal_share: float  # time the hypervisor took from the server's core during the window
    wall_s: float

    @property
    def complete(self) -> bool:
        return self.delivered == self.expected and self.misordered == 0 and not self.closed


def percentile(sorted_values: list[int], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index] / 1e6


async def _stream(
    server: Server,
    conns: list[tuple[WSTransport, FastClient]],
    delivery: Delivery,
    rate: float,
    count: int,
    duration: float,
    profile_dir: Path | None,
    quiet_wait: float,
    senders: list[WSTransport],
) -> dict[str, Any]:
    """Start the run (one trigger from each of `senders`, one per conversation) and wait
    for it to end; the CPU and time figures of the window (`parts`: the server's CPU
    seconds by process, `cpu` their sum)."""
    await asyncio.sleep(0.5)  # let the server settle after the connection burst
    if quiet_wait > 0:
        await wait_quiet(server.cpu_s, quiet_wait)
    triggers = [
        orjson.dumps(
            {
                "type": "message",
                "client_msg_id": f"go-{uuid.uuid4().hex[:12]}",
                "text": trigger_text(rate, count),
            }
        )
        for _ in senders
    ]
    profiler = None
    if profile_dir is not None:
        name = f"{server.label}-r{rate:g}-c{len(conns)}-{uuid.uuid4().hex[:6]}.folded"
        profiler = Profiler(server.pid, profile_dir / name, duration)
        await asyncio.sleep(0.3)
    listeners = [listener for _, listener in conns]
    for listener in listeners:
        listener.recording = True
    gc.collect()
    gc.disable()
    me = os.getpid()
    core0, steal0 = core_times(SERVER_CORE)
    parts0, mine0, t0 = server.cpu_parts(), proc_cpu_s(me), time.monotonic()
    # Several conversations tick out of phase, evenly over one period. Absolute deadlines:
    # uvloop's timers count whole milliseconds, and a relative sleep under 1 ms returns at
    # once, which would start every run in the same millisecond (in phase).
    spacing, loop = 1.0 / (rate * len(senders)), asyncio.get_running_loop()
    first = loop.time()
    for i, (sender, trigger) in enumerate(zip(senders, triggers, strict=True)):
        await asyncio.sleep(max(0.0, first + i * spacing - loop.time()))
        sender.send(WSMsgType.TEXT, trigger)
    timed_out = 0.0
    try:
        await asyncio.wait_for(asyncio.shield(delivery.finished), duration + 15)
    except TimeoutError:
        timed_out = 1.0
    finally:
        gc.enable()
    parts1, mine1, t1 = server.cpu_parts(), proc_cpu_s(me), time.monotonic()
    core1, steal1 = core_times(SERVER_CORE)
    if profiler is not None:
        profiler.wait()
    parts = {name: parts1[name] - parts0[name] for name in parts0}
    return {
        "wall": t1 - t0,
        "cpu": sum(parts.values()),
        "parts": parts,
        "client_cpu": mine1 - mine0,
        "core_busy": core1 - core0,
        "steal": steal1 - steal0,
        "timed_out": timed_out,
    }


async def throughput(
    server: Server,
    clients: int,
    rate: float,
    duration: float,
    profile_dir: Path | None,
    quiet_wait: float,
    conversations: int = 1,
) -> RunResult:
    """`clients` clients spread evenly over `conversations` conversations, each of which
    streams `rate` chunks/s for `duration` s."""
    if not 1 <= conversations <= clients:
        raise ValueError("need 1 <= conversations <= clients")
    count = max(1, round(rate * duration))
    cid = f"bench-{int(rate)}-{uuid.uuid4().hex[:8]}"
    cids = [cid] if conversations == 1 else [f"{cid}-{i}" for i in range(conversations)]
    delivery = Delivery(clients, count)
    conns: list[tuple[WSTransport, FastClient]] = []
    try:
        urls = [server.url(cids[i % conversations]) for i in range(clients)]
        conns = await gather_batched([connect(url, delivery) for url in urls])
        # clients i < conversations are the first of each conversation: they start its run
        senders = [transport for transport, _ in conns[:conversations]]
        window = await _stream(
            server, conns, delivery, rate, count, duration, profile_dir, quiet_wait, senders
        )
    finally:
        close(conns)
    await asyncio.sleep(0.3)
    delivery.analyse([listener for _, listener in conns])
    return run_result(server.label, rate, clients, duration, count, delivery, window)


async def connect(url: str, delivery: Delivery) -> tuple[WSTransport, FastClient]:
    """A picows client of `delivery`, once it has its `ready`."""
    transport, listener = await ws_connect(lambda: FastClient(delivery), url)
    await asyncio.wait_for(listener.ready, 10)
    return transport, listener


def close(conns: list[tuple[WSTransport, FastClient]]) -> None:
    for transport, _ in conns:
        if not transport.is_disconnected:
            transport.send_close(WSCloseCode.OK)
            transport.disconnect()


def run_result(
    label: str,
    rate: float,
    clients: int,
    duration: float,
    count: int,
    delivery: Delivery,
    window: dict[str, Any],
) -> RunResult:
    """The figures of one run, from what `clients` clients received (`delivery`, analysed)
    and the window `_stream` measured."""
    if window["timed_out"]:
        delivery.errors.append("timed out waiting for run.ended")
    lat = sorted(delivery.latency_ns)
    span_ns = delivery.last_arrival - delivery.first_stamp if delivery.first_stamp else 0
    wall, cpu = window["wall"], window["cpu"]
    return RunResult(
        server=label,
        rate=rate,
        clients=clients,
        duration=duration,
        expected=clients * count,
        delivered=delivery.delivered,
        misordered=delivery.misordered,
        frames=delivery.frames,
        coalesced_frames=delivery.coalesced,
        closed={str(k): v for k, v in delivery.closed.items()},
        errors=delivery.errors[:5],
        run_status=delivery.run_status,
        delivered_per_s=delivery.delivered / (span_ns / 1e9) if span_ns > 0 else 0.0,
        p50_ms=percentile(lat, 0.50),
        p90_ms=percentile(lat, 0.90),
        p99_ms=percentile(lat, 0.99),
        max_ms=lat[-1] / 1e6 if lat else float("nan"),
        server_cpu_s=cpu,
        cpu_us_per_chunk=cpu / delivery.delivered * 1e6 if delivery.delivered else float("nan"),
        server_cpu_share=cpu / wall if wall > 0 else 0.0,
        client_cpu_share=window["client_cpu"] / wall if wall > 0 else 0.0,
        others_share=max(0.0, window["core_busy"] - cpu) / wall if wall > 0 else 0.0,
        steal_share=window["steal"] / wall if wall > 0 else 0.0,
        wall_s=wall,
    )


@dataclass
class IdleResult:
    server: str
    compression: bool
    connections: int
    negotiated: int  # connections on which permessage-deflate was agreed
    rss_before_kib: int
    rss_after_kib: int
    kib_per_connection: float


async def idle_memory(server: Server, n: int) -> IdleResult:
    cid = f"idle-{uuid.uuid4().hex[:8]}"
    url = server.url(cid)
    compression = "deflate" if server.compression else None

    async def one() -> Any:
        ws = await ws_client(url, compression=compression, max_size=None, open_timeout=20)
        await asyncio.wait_for(ws.recv(), 10)  # `ready`
        return ws

    warm = await gather_batched([one() for _ in range(min(20, n))])
    await asyncio.gather(*(ws.close() for ws in warm))
    await asyncio.sleep(1.0)
    before = server.rss_kib()
    conns = await gather_batched([one() for _ in range(n)])
    await asyncio.sleep(1.5)
    after = server.rss_kib()
    negotiated = sum(1 for ws in conns if ws.protocol.extensions)
    await gather_batched([ws.close() for ws in conns], batch=200)
    await asyncio.sleep(0.5)
    return IdleResult(
        server=server.label,
        compression=server.compression,
        connections=n,
        negotiated=negotiated,
        rss_before_kib=before,
        rss_after_kib=after,
        kib_per_connection=(after - before) / n,
    )


# --------------------------------------------------------------------------- report


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def run_notes(r: RunResult) -> list[str]:
    """What went wrong in one run, or made it less telling, for the tables' `!` lines."""
    notes = []
    if r.misordered:
        notes.append(f"{r.misordered} out of order/gap/duplicate")
    if r.coalesced_frames:
        notes.append(f"{r.coalesced_frames} coalesced frames")
    if r.closed:
        notes.append(f"closed early: {r.closed}")
    if r.errors:
        notes.append(f"errors: {r.errors}")
    if r.run_status not in (None, "completed"):  # the baseline ends no run: None
        notes.append(f"run.ended {r.run_status}")
    if r.others_share >= CONTENDED:
        notes.append(f"contended: other processes used {r.others_share:.0%} of core 0")
    return notes


def fmt_table(runs: list[RunResult], idle: list[IdleResult]) -> str:
    head = (
        f"{'server':<9} {'rate':>5} {'clients':>7} {'delivered':>17} {'chunks/s':>9} "
        f"{'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'max ms':>7} {'us/chunk':>8} "
        f"{'srv CPU':>7} {'cli CPU':>7} {'others':>6} {'steal':>5}"
    )
    lines = [head, "-" * len(head)]
    for r in runs:
        delivered = f"{r.delivered}/{r.expected}"
        lines.append(
            f"{r.server:<9} {r.rate:>5g} {r.clients:>7} {delivered:>17} {r.delivered_per_s:>9.0f} "
            f"{r.p50_ms:>7.2f} {r.p90_ms:>7.2f} {r.p99_ms:>7.2f} {r.max_ms:>7.1f} "
            f"{r.cpu_us_per_chunk:>8.2f} {r.server_cpu_share:>6.0%} {r.client_cpu_share:>7.0%} "
            f"{r.others_share:>6.0%} {r.steal_share:>5.0%}"
        )
        notes = run_notes(r)
        if notes:
            lines.append("          ! " + "; ".join(notes))
    if any(len(group) > 1 for group in _groups(runs).values()):
        lines += ["", "Medians over the repeats:"]
        for (server, rate), group in _groups(runs).items():
            lines.append(
                f"  {server:<9} {rate:>5g}/s  p50 {_median([r.p50_ms for r in group]):5.2f} ms  "
                f"p99 {_median([r.p99_ms for r in group]):5.2f} ms  "
                f"{_median([r.cpu_us_per_chunk for r in group]):6.2f} us/chunk  ({len(group)} runs)"
            )
    lines.append("")
    lines.append("Idle connections: server RSS delta per connection (KiB)")
    for i in idle:
        mode = "permessage-deflate" if i.compression else "no compression"
        agreed = f", deflate agreed on {i.negotiated}/{i.connections}" if i.compression else ""
        lines.append(
            f"  {i.server:<9} {mode:<19} {i.kib_per_connection:6.1f} KiB  "
            f"({i.rss_before_kib} -> {i.rss_after_kib} KiB over {i.connections}{agreed})"
        )
    return "\n".join(lines)


def _groups(runs: list[RunResult]) -> dict[tuple[str, float], list[RunResult]]:
    groups: dict[tuple[str, float], list[RunResult]] = {}
    for r in runs:
        groups.setdefault((r.server, r.rate), []).append(r)
    return groups


def verdicts(runs: list[RunResult], idle: list[IdleResult]) -> list[tuple[bool, str]]:
    """One verdict per target and rate; with repeats, on the medians (ranges shown)."""
    out: list[tuple[bool, str]] = []
    groups = _groups(runs)
    for (server, rate), gw in groups.items():
        if server != "gateway":
            continue
        base = groups.get(("baseline", rate), [])
        n = len(gw)
        at = f"{gw[0].clients} x {rate:g}/s = {gw[0].clients * rate:,.0f} chunks/s"
        if n > 1:
            at += f", {n} runs"
        busy = max(r.others_share for r in gw + base)
        if busy >= CONTENDED:
            at += f" (contended: others took up to {busy:.0%} of core 0)"
        delivered, expected = sum(r.delivered for r in gw), sum(r.expected for r in gw)
        complete = all(r.complete for r in gw)
        out.append((complete, f"{at}: every chunk delivered ({delivered}/{expected})"))
        p99s = [r.p99_ms for r in gw]
        p99 = _median(p99s)
        spread = f" (runs {min(p99s):.2f}-{max(p99s):.2f})" if n > 1 else ""
        out.append(
            (p99 <= TARGET_P99_MS, f"{at}: p99 {p99:.2f} ms{spread} <= {TARGET_P99_MS:g} ms")
        )
        if base:
            g_cpu = _median([r.cpu_us_per_chunk for r in gw])
            b_cpu = _median([r.cpu_us_per_chunk for r in base])
            ratio = g_cpu / b_cpu if b_cpu > 0 else float("inf")
            out.append(
                (
                    ratio <= TARGET_CPU_RATIO,
                    f"{at}: CPU {g_cpu:.2f} us/chunk = {ratio:.2f}x the baseline's "
                    f"{b_cpu:.2f} (<= {TARGET_CPU_RATIO:g}x)",
                )
            )
    for i in idle:
        if i.server == "gateway" and not i.compression:
            out.append(
                (
                    i.kib_per_connection <= TARGET_IDLE_KIB,
                    f"idle connection without compression: {i.kib_per_connection:.1f} KiB "
                    f"<= {TARGET_IDLE_KIB:g} KiB",
                )
            )
    return out


def client_check(runs: list[RunResult]) -> str:
    worst = max((r.client_cpu_share for r in runs), default=0.0)
    if worst < CLIENT_CPU_LIMIT:
        return (
            f"client check: its CPU stayed at or below {worst:.0%} of core {CLIENT_CORE}: "
            "not the bottleneck"
        )
    return (
        f"client check: WARNING, the client reached {worst:.0%} of core {CLIENT_CORE}: "
        "it may be the bottleneck; the latencies are upper bounds"
    )


def machine() -> str:
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} CPUs ({model}), Python {sys.version.split()[0]}, {sys.platform}"


# --------------------------------------------------------------------------- main


async def bench(args: argparse.Namespace, logdir: Path) -> tuple[list[RunResult], list[IdleResult]]:
    # SIGTERM ends the run like Ctrl-C does: the task is cancelled and `finally` stops the server.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    runs: list[RunResult] = []
    idle: list[IdleResult] = []
    kinds = [k for k in ("baseline", "gateway") if k in args.servers]
    for kind in kinds:
        for compression in (False, True):
            if args.idle_connections <= 0 and compression:
                continue
            server = Server(kind, compression, args.baseline_loop, logdir)
            label = f"{server.label}{' (permessage-deflate)' if compression else ''}"
            print(f"# {label}: pid starting on port {server.port}", flush=True)
            try:
                server.start()
                print(f"#   pid {server.pid}, log {server.log_path}", flush=True)
                if args.idle_connections > 0:
                    result = await idle_memory(server, args.idle_connections)
                    idle.append(result)
                    print(f"#   idle: {result.kib_per_connection:.1f} KiB/connection", flush=True)
                if compression:
                    continue
                for rate in args.rates:
                    for _ in range(args.repeat):
                        for attempt in range(args.retries + 1):
                            r = await throughput(
                                server,
                                args.clients,
                                rate,
                                args.duration,
                                args.profile,
                                args.quiet_wait,
                            )
                            if r.others_share < CONTENDED or attempt == args.retries:
                                break
                            print(
                                f"#   rate {rate:g}: other processes took "
                                f"{r.others_share:.0%} of core {SERVER_CORE}; measuring again",
                                flush=True,
                            )
                        runs.append(r)
                        print(
                            f"#   rate {rate:g}: {r.delivered}/{r.expected} delivered, "
                            f"p99 {r.p99_ms:.2f} ms, {r.cpu_us_per_chunk:.2f} us/chunk, "
                            f"client CPU {r.client_cpu_share:.0%}, "
                            f"others on core 0 {r.others_share:.0%}",
                            flush=True,
                        )
            finally:
                server.stop()
    return runs, idle


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=100, help="clients on one conversation")
    parser.add_argument(
        "--rates", type=float, nargs="+", default=[100.0, 200.0], help="runner chunks per second"
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of streaming")
    parser.add_argument("--idle-connections", type=int, default=1000, help="0 skips memory")
    parser.add_argument("--repeat", type=int, default=1, help="throughput runs per rate")
    parser.add_argument(
        "--servers", nargs="+", default=["baseline", "gateway"], choices=["baseline", "gateway"]
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        help="before each run, wait up to this many seconds for core 0 to be free of other load",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=2,
        help="measure a run again when other processes took >= 10%% of core 0 meanwhile",
    )
    parser.add_argument("--baseline-loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    parser.add_argument(
        "--profile", type=Path, help="attach py-spy to the server in each run (folded stacks here)"
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the servers' logs")
    args = parser.parse_args()
    if not 0 < args.duration <= 600:
        parser.error("--duration must be in (0, 600]")
    if args.clients < 1:
        parser.error("--clients must be >= 1")

    prepare(parser, args, sockets=2 * (args.idle_connections + args.clients))
    logdir = Path(tempfile.mkdtemp(prefix="steerway-bench-"))
    print(f"# machine: {machine()}")
    print(
        f"# servers on core {SERVER_CORE}, client on core {CLIENT_CORE}; {args.clients} clients, "
        f"rates {args.rates} chunks/s, {args.duration:g} s each"
    )
    try:
        runs, idle = uvloop.run(bench(args, logdir))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; every server started was stopped", file=sys.stderr)
        return 130
    finally:
        if not args.keep_logs:
            shutil.rmtree(logdir, ignore_errors=True)
    print()
    print(fmt_table(runs, idle))
    print()
    return report(
        args,
        verdicts(runs, idle),
        client_check(runs),
        {"runs": [asdict(r) for r in runs], "idle": [asdict(i) for i in idle]},
    )


def prepare(parser: argparse.ArgumentParser, args: argparse.Namespace, sockets: int) -> None:
    """Pin this process to the client core, allow `sockets` more open files, and check
    that `--profile` can work."""
    cpus = os.sched_getaffinity(0)
    if {SERVER_CORE, CLIENT_CORE} <= cpus:
        os.sched_setaffinity(0, {CLIENT_CORE})
    else:
        print(f"warning: cores {SERVER_CORE} and {CLIENT_CORE} are not both free", file=sys.stderr)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = sockets + 256
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, need), hard))
    if args.profile is not None:
        if py_spy() is None:
            parser.error("--profile needs py-spy: .venv/bin/python -m pip install py-spy")
        args.profile.mkdir(parents=True, exist_ok=True)


def report(
    args: argparse.Namespace,
    results: list[tuple[bool, str]],
    client: str | None,
    figures: dict[str, object],
) -> int:
    """Print the verdicts, write `--json`, and the exit status: 0 when all pass."""
    for ok, text in results:
        print(f"{'PASS' if ok else 'MISS'}  {text}")
    if client is not None:
        print(client)
    if args.profile is not None:
        print(f"profiles (py-spy folded stacks; figures above are perturbed): {args.profile}")
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "machine": machine(),
                    "args": {k: str(v) for k, v in vars(args).items()},
                    **figures,
                    "verdicts": [{"pass": ok, "target": text} for ok, text in results],
                },
                indent=2,
            )
        )
    return 0 if all(ok for ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
