"""nx-27017 with SQLite's WAL checkpoints moved off the write path.

Run as `python -m store.nxserver <nx-27017 arguments>`; `store.embedded` does.

nx-27017 stores every document in its own SQLite transaction (WAL mode,
`synchronous=NORMAL`). SQLite checkpoints the WAL inside the commit that takes
it past 1,000 pages, so at 1,000 events/s one insert every 150-300 ms waited
10-20 ms for the checkpoint's copy and fsync: most of the embedded store's
p99 delivery latency (docs/performance.md). Here a thread per database file
runs a PASSIVE checkpoint, which never waits for a writer, every
CHECKPOINT_EVERY seconds, so the pages are copied off the write path. Only a
writer can start the WAL over, and only once it is fully copied, which under
steady writes a PASSIVE checkpoint never catches: the writer's own checkpoint
stays, at WAL_RESET_PAGES instead of 1,000, and finds little left to copy. It
bounds the WAL (about 16 MiB). Durability is SQLite's WAL as before: a commit
is in the WAL before the insert is answered, and a crash replays the WAL.

This hooks one method of neosqlite, which nx-27017 is built on. If a release
renames it, the server runs unchanged and says so on stderr.
"""

from __future__ import annotations

import logging
import sqlite3
import sys
import threading
from collections.abc import Callable
from typing import Any

CHECKPOINT_EVERY = 0.25  # seconds between PASSIVE checkpoints
WAL_RESET_PAGES = 4000  # the writer's own checkpoint, which resets the WAL, at this size
HOOKED = "_configure_connection"

log = logging.getLogger("steerway.nxserver")


def checkpoint_forever(path: str, every: float, stop: threading.Event) -> None:
    """PASSIVE checkpoints of the database at `path` until `stop` is set."""
    connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        while not stop.wait(every):
            try:
                connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            except sqlite3.Error as exc:  # busy or closing: the next round tries again
                log.debug("checkpoint of %s: %s", path, exc)
    finally:
        connection.close()


class Checkpointer:
    """One checkpoint thread per database file the server opens."""

    def __init__(self, every: float = CHECKPOINT_EVERY) -> None:
        self.every = every
        self.stop = threading.Event()
        self._paths: set[str] = set()
        self._lock = threading.Lock()

    def adopt(self, db: sqlite3.Connection) -> None:
        """Leave the connection's own checkpoint only the WAL's reset; copy here."""
        db.execute(f"PRAGMA wal_autocheckpoint={WAL_RESET_PAGES}")
        path = db.execute("PRAGMA database_list").fetchone()[2]
        if not path:  # an in-memory database has no WAL
            return
        with self._lock:
            if path in self._paths:
                return
            self._paths.add(path)
        threading.Thread(
            target=checkpoint_forever,
            args=(path, self.every, self.stop),
            name=f"checkpoint {path}",
            daemon=True,
        ).start()


def install(checkpointer: Checkpointer) -> bool:
    """Hook neosqlite's connection set-up; False if this neosqlite has no such hook."""
    from neosqlite import connection

    original: Callable[[Any], None] | None = getattr(connection.Connection, HOOKED, None)
    if original is None:
        return False

    def configure(self: Any) -> None:
        original(self)
        checkpointer.adopt(self.db)

    setattr(connection.Connection, HOOKED, configure)
    return True


def main() -> int:
    from nx_27017.nx_27017 import main as serve

    if not install(Checkpointer()):
        print(
            f"steerway: neosqlite has no Connection.{HOOKED}; "
            "nx-27017 runs with SQLite's automatic checkpoints",
            file=sys.stderr,
        )
    sys.argv[0] = "nx-27017"
    return int(serve() or 0)


if __name__ == "__main__":
    sys.exit(main())
