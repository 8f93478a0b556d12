"""Which remote runner takes a run (PROTOCOL.md section 10): pure bookkeeping, no I/O.

Runners join under a name with a `max_concurrency`; a run asks for a runner of
a name and gets the least-loaded one that is under its limit (ties: the one
that joined first).  When none is free the run waits in that name's queue, at
most `max_waiting` runs per name, first come first served; a freed place, or a
runner joining, goes to the first waiting run.  Giving up on a wait (its
timeout, a cancel) is `withdraw`.  Once `stop`ped (the gateway shuts down) nothing
more is placed: requests wait, freed places stay free.  Every method returns the
placements it made as `(run_id, runner_id)` pairs, so the edge can wake the runs
it placed.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass, field

Placement = tuple[str, int]  # (run_id, runner_id)


class Outcome(enum.Enum):
    WAITING = "waiting"  # queued until a runner of the name is free
    FULL = "full"  # the name's waiting queue is full: refused at once


@dataclass(slots=True)
class Slot:
    runner_id: int
    name: str
    capacity: int
    runs: set[str] = field(default_factory=set)

    @property
    def free(self) -> bool:
        return len(self.runs) < self.capacity


class Assignment:
    def __init__(self, max_waiting: int) -> None:
        self.max_waiting = max_waiting
        self.slots: dict[int, Slot] = {}  # insertion order = join order
        self.waiting: dict[str, OrderedDict[str, None]] = {}  # name -> run ids, oldest first
        self.placed: dict[str, int] = {}  # run_id -> runner_id
        self.stopped = False

    # ------------------------------------------------------------------ reading

    def names(self) -> set[str]:
        return {slot.name for slot in self.slots.values()}

    def load(self, runner_id: int) -> int:
        return len(self.slots[runner_id].runs)

    def waiting_count(self, name: str) -> int:
        return len(self.waiting.get(name, ()))

    def free(self) -> dict[str, int]:
        """Places a request would get at once, per name of the runners joined (0 when
        runs wait for the name, or once stopped)."""
        free: dict[str, int] = {}
        for slot in self.slots.values():
            blocked = self.stopped or slot.name in self.waiting
            room = 0 if blocked else slot.capacity - len(slot.runs)
            free[slot.name] = free.get(slot.name, 0) + room
        return free

    # ------------------------------------------------------------------ changes

    def stop(self) -> None:
        """Place nothing more: the runs placed go on, every other run waits."""
        self.stopped = True

    def join(self, runner_id: int, name: str, capacity: int) -> list[Placement]:
        """A runner connected; it takes waiting runs of its name up to its capacity."""
        if runner_id in self.slots:
            raise ValueError(f"runner {runner_id} already joined")
        self.slots[runner_id] = Slot(runner_id, name, max(1, capacity))
        return self._drain(name)

    def leave(self, runner_id: int) -> list[str]:
        """A runner went away: the runs it held (the edge fails them `runner_lost`)."""
        slot = self.slots.pop(runner_id, None)
        if slot is None:
            return []
        for run_id in slot.runs:
            del self.placed[run_id]
        return sorted(slot.runs)

    def request(self, run_id: str, name: str) -> int | Outcome:
        """Place a run on the least-loaded free runner of `name`, or queue it."""
        if run_id in self.placed or run_id in self.waiting.get(name, ()):
            raise ValueError(f"run {run_id} already requested a runner")
        slot = None if self.stopped else self._least_loaded(name)
        if slot is not None:
            return self._place(run_id, slot)
        queue = self.waiting.setdefault(name, OrderedDict())
        if len(queue) >= self.max_waiting:
            if not queue:
                del self.waiting[name]
            return Outcome.FULL
        queue[run_id] = None
        return Outcome.WAITING

    def withdraw(self, run_id: str, name: str) -> bool:
        """A waiting run gives up; False when it was not waiting (placed meanwhile)."""
        queue = self.waiting.get(name)
        if queue is None or run_id not in queue:
            return False
        del queue[run_id]
        if not queue:
            del self.waiting[name]
        return True

    def release(self, run_id: str) -> list[Placement]:
        """A placed run ended: its place goes to the first run waiting for that name."""
        runner_id = self.placed.pop(run_id, None)
        if runner_id is None:
            return []
        slot = self.slots[runner_id]
        slot.runs.discard(run_id)
        return self._drain(slot.name)

    # ------------------------------------------------------------------ internals

    def _least_loaded(self, name: str) -> Slot | None:
        best: Slot | None = None
        for slot in self.slots.values():
            if slot.name != name or not slot.free:
                continue
            if best is None or len(slot.runs) < len(best.runs):
                best = slot
        return best

    def _place(self, run_id: str, slot: Slot) -> int:
        slot.runs.add(run_id)
        self.placed[run_id] = slot.runner_id
        return slot.runner_id

    def _drain(self, name: str) -> list[Placement]:
        placements: list[Placement] = []
        queue = self.waiting.get(name)
        while queue and not self.stopped:
            slot = self._least_loaded(name)
            if slot is None:
                break
            run_id, _ = queue.popitem(last=False)
            placements.append((run_id, self._place(run_id, slot)))
        if queue is not None and not queue:
            del self.waiting[name]
        return placements
