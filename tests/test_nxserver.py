"""store.nxserver: the embedded nx-27017's connections checkpoint off the write path."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from neosqlite import Connection

from store import nxserver
from store.embedded import EmbeddedMongo, _cmdline

TIMEOUT = 10.0


@pytest.fixture
def checkpointer(monkeypatch: pytest.MonkeyPatch) -> Iterator[nxserver.Checkpointer]:
    checkpointer = nxserver.Checkpointer(every=0.01)
    monkeypatch.setattr(
        Connection, nxserver.HOOKED, getattr(Connection, nxserver.HOOKED)
    )  # restored after the test
    assert nxserver.install(checkpointer)
    yield checkpointer
    checkpointer.stop.set()
    for thread in threading.enumerate():
        if thread.name.startswith("checkpoint "):
            thread.join(TIMEOUT)


def test_a_connection_checkpoints_in_its_own_thread(
    checkpointer: nxserver.Checkpointer, tmp_path: Path
) -> None:
    path = tmp_path / "db.sqlite"
    db = Connection(str(path))
    try:
        autocheckpoint = db.db.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
        assert autocheckpoint == nxserver.WAL_RESET_PAGES
        assert db.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        names = [t.name for t in threading.enumerate()]
        assert f"checkpoint {path}" in names
        Connection(str(path)).close()  # the same file again: still one thread
        assert [t.name for t in threading.enumerate()].count(f"checkpoint {path}") == 1
        before = path.stat().st_size
        db["things"].insert_many([{"n": n, "text": "x" * 500} for n in range(400)])
        # far below the writer's own checkpoint: the main file grows only by the thread
        deadline = time.monotonic() + TIMEOUT
        while path.stat().st_size <= before:
            assert time.monotonic() < deadline, "no checkpoint copied the WAL"
            checkpointer.stop.wait(0.01)
        with sqlite3.connect(path) as other:
            assert other.execute("SELECT count(*) FROM things").fetchone()[0] == 400
    finally:
        db.close()


def test_an_in_memory_database_needs_no_thread(checkpointer: nxserver.Checkpointer) -> None:
    threads = threading.active_count()
    db = Connection(":memory:")
    db.close()
    assert threading.active_count() == threads


def test_without_the_hook_nothing_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(Connection, nxserver.HOOKED)
    assert not nxserver.install(nxserver.Checkpointer())


async def test_the_embedded_store_runs_it(tmp_path: Path) -> None:
    async with await EmbeddedMongo.start(tmp_path) as mongo:
        assert mongo.pid is not None
        args = _cmdline(mongo.pid)
        assert args is not None
        assert nxserver.__name__ in args
