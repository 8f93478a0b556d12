"""The embedded MongoDB: an `nx-27017` server (a MongoDB wire server on SQLite, from
PyPI) run as a child process, for a gateway started without `STEERWAY_MONGODB_URI`.

    async with await EmbeddedMongo.start(".steerway") as mongo:
        store = await MongoStore.open(mongo.uri)

Everything lives in the data directory: `db/` (one SQLite file per database),
`nx-27017.pid`, `nx-27017.log` and `nx-27017.out` (the child's stdout and stderr).
The server listens on a free port of 127.0.0.1 and is stopped by its pid: SIGTERM,
a wait, then SIGKILL.  On Linux the child also gets SIGTERM when the process that
started it dies (PR_SET_PDEATHSIG), so a `kill -9` of the gateway alone does not
leave it running.

nx-27017 refuses to start while its pid file names a live process. After a
`kill -9` of both processes the file stays behind; it is removed when the pid in
it is not alive, is a zombie, or is not an nx-27017 process. A live nx-27017 is
given a few seconds to exit (it may be shutting down after its gateway died),
then reported as a conflict: it is never killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from pymongo import AsyncMongoClient
from pymongo.errors import PyMongoError

from store.base import StoreError

EXECUTABLE = "nx-27017"
SERVER_MODULE = "store.nxserver"
DEFAULT_DATA_DIR = Path(".steerway")


class EmbeddedMongoError(StoreError):
    """The embedded server could not be started."""


def find_executable() -> str:
    """nx-27017 next to the running interpreter (its virtualenv), else on PATH."""
    beside = Path(sys.executable).parent / EXECUTABLE
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(EXECUTABLE)
    if found is None:
        raise EmbeddedMongoError(
            f"{EXECUTABLE} is not installed (pip install nx-27017), "
            "or set STEERWAY_MONGODB_URI to use a MongoDB server"
        )
    return found


def server_command() -> list[str]:
    """nx-27017 with its checkpoints off the write path (store.nxserver) when this
    interpreter has it, else the plain nx-27017 program."""
    if importlib.util.find_spec("nx_27017") is not None:
        return [sys.executable, "-m", SERVER_MODULE]
    return [find_executable()]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _cmdline(pid: int) -> list[str] | None:
    """The command line of a live, non-zombie process; None when there is none."""
    proc = Path("/proc") / str(pid)
    if Path("/proc/self").is_dir():  # Linux
        try:
            status = (proc / "status").read_text()
            raw = (proc / "cmdline").read_bytes()
        except OSError:
            return None
        for line in status.splitlines():
            if line.startswith("State:") and line.split()[1:2] in (["Z"], ["X"]):
                return None
        return [part.decode(errors="replace") for part in raw.split(b"\0") if part]
    try:  # no /proc (macOS): ask ps
        out = subprocess.run(
            ["ps", "-o", "stat=,command=", "-p", str(pid)],
            capture_output=True,
            text=True,
            check=False,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if not out or out.split()[0].startswith("Z"):
        return None
    return out.split()[1:]


def clear_stale_pid_file(pid_file: Path) -> bool:
    """Remove `pid_file` unless it names a live nx-27017 process (not a zombie).
    Return True if it was removed. Raise EmbeddedMongoError if that server is alive."""
    try:
        text = pid_file.read_text().strip()
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise EmbeddedMongoError(f"cannot read {pid_file}: {exc}") from exc
    try:
        pid = int(text)
    except ValueError:
        pid = 0
    if pid > 0:
        args = _cmdline(pid)
        marks = ("nx-27017", "nx_27017", SERVER_MODULE)
        if args is not None and any(mark in a for a in args for mark in marks):
            raise EmbeddedMongoError(
                f"nx-27017 is already running on {pid_file.parent} (pid {pid}); "
                "stop it first, or use another data directory"
            )
    pid_file.unlink(missing_ok=True)
    return True


def _death_signal() -> Callable[[], None] | None:
    """A preexec_fn that asks Linux to SIGTERM the child when the thread that forked
    it dies (PR_SET_PDEATHSIG); None elsewhere. libc is looked up here, before the
    fork: the child only makes the call."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:  # pragma: no cover - runs in the child
        prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG

    return preexec


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class EmbeddedMongo:
    """One nx-27017 child process. Create it with `await EmbeddedMongo.start(data_dir)`."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str] = DEFAULT_DATA_DIR,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        executable: str | None = None,
        within: float = 20.0,
        busy_wait: float = 5.0,
    ) -> None:
        self.within = within  # seconds to wait for the first answer
        self.busy_wait = busy_wait  # seconds for a live nx-27017 on the pid file to exit
        self.data_dir = Path(data_dir).resolve()
        self.db_dir = self.data_dir / "db"
        self.pid_file = self.data_dir / "nx-27017.pid"
        self.log_file = self.data_dir / "nx-27017.log"
        self.out_file = self.data_dir / "nx-27017.out"
        self.host = host
        self.port = port or 0
        self.executable = executable
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    @property
    def uri(self) -> str:
        return f"mongodb://{self.host}:{self.port}/?directConnection=true"

    @classmethod
    async def start(
        cls,
        data_dir: str | os.PathLike[str] = DEFAULT_DATA_DIR,
        *,
        port: int | None = None,
        within: float = 20.0,
        busy_wait: float = 5.0,
        executable: str | None = None,
    ) -> EmbeddedMongo:
        """Start nx-27017 on `data_dir` and return once it answers a ping."""
        mongo = cls(data_dir, port=port, executable=executable, within=within, busy_wait=busy_wait)
        await mongo._start()
        return mongo

    async def _start(self) -> None:
        self.db_dir.mkdir(parents=True, exist_ok=True)
        await self._clear_pid_file()
        command = [self.executable] if self.executable else server_command()
        attempts = 1 if self.port else 3  # a free port can be taken before nx binds it
        for attempt in range(attempts):
            port = self.port if attempts == 1 else free_port()
            if await self._launch(command, port, last=attempt == attempts - 1):
                self.port = port
                return

    async def _clear_pid_file(self) -> None:
        """Remove a stale pid file. A live nx-27017 gets `busy_wait` seconds to exit:
        one whose gateway was just killed is on its way out (PR_SET_PDEATHSIG)."""
        deadline = time.monotonic() + self.busy_wait
        while True:
            try:
                clear_stale_pid_file(self.pid_file)
                return
            except EmbeddedMongoError:
                if time.monotonic() >= deadline:
                    raise
            await asyncio.sleep(0.05)

    async def _launch(self, command: list[str], port: int, *, last: bool) -> bool:
        args = [
            *command,
            "--host",
            self.host,
            "--port",
            str(port),
            "--data-dir",
            str(self.db_dir),
            "--pid-file",
            str(self.pid_file),
            "--log-file",
            str(self.log_file),
        ]
        with self.out_file.open("wb") as out:
            # Popen in this (the event loop's) thread: PR_SET_PDEATHSIG fires when the
            # forking *thread* ends, so a worker thread would kill the child early.
            self.process = subprocess.Popen(  # noqa: ASYNC220 - fork+exec, not a wait
                args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                start_new_session=True,  # not killed with the terminal's Ctrl-C group
                preexec_fn=_death_signal(),
            )
        uri = f"mongodb://{self.host}:{port}/?directConnection=true"
        deadline = time.monotonic() + self.within
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
            uri, serverSelectionTimeoutMS=250, connectTimeoutMS=250
        )
        started = False
        try:
            while True:
                code = self.process.poll()
                if code is not None:
                    output = _tail(self.out_file)
                    self.process = None
                    if not last and "address already in use" in output.lower():
                        return False
                    raise EmbeddedMongoError(
                        f"nx-27017 exited with status {code} at start; {self.out_file}:\n{output}"
                    )
                try:
                    await client.admin.command("ping")
                    started = True
                    return True
                except PyMongoError:
                    pass
                if time.monotonic() > deadline:
                    raise EmbeddedMongoError(
                        f"nx-27017 did not answer on {uri} within {self.within:.0f} s; "
                        f"{self.log_file}:\n{_tail(self.log_file)}\n{_tail(self.out_file)}"
                    )
                await asyncio.sleep(0.05)
        finally:
            await client.close()
            if not started:  # timed out, failed or cancelled: leave nothing running
                await self.stop()

    async def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the server by its pid, wait for it, SIGKILL it if it does not exit."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)
            try:
                await asyncio.to_thread(process.wait, grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)
                await asyncio.to_thread(process.wait, grace)
        # nx removes its pid file on a clean exit, not after SIGKILL; a file that
        # names another process (a server started since on this directory) stays
        with contextlib.suppress(OSError, ValueError):
            if int(self.pid_file.read_text().strip()) == process.pid:
                self.pid_file.unlink()

    async def __aenter__(self) -> EmbeddedMongo:
        if self.process is None:
            await self._start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
