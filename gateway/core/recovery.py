"""Crash recovery: a conversation's live runs, rebuilt from its stored events.

The event log is the truth; run documents are a projection written after the
events of the same batch, so after a crash they may lag the log by one batch.
`rebuild` takes every event of each candidate run (the runs whose documents say
queued or running, and the runs named by events the documents do not reflect
yet) and works out, from events alone, which runs had started and not ended,
which were waiting to start, and which steering messages no run ever took.
The conversation machine then ends the interrupted run (`failed`,
`gateway_restart`) and carries on as if the gateway had never stopped
(PROTOCOL.md section 5.4: leftover steering becomes a follow-up run).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.core.runs import Run, RunKind, RunStatus, UserText

Event = dict[str, Any]


@dataclass
class Recovered:
    """What a conversation held when its gateway stopped."""

    interrupted: list[Run] = field(default_factory=list)  # started, never ended (one, or none)
    queue: list[Run] = field(default_factory=list)  # created, never started: run in order
    leftover: list[UserText] = field(default_factory=list)  # steering of ended runs, untaken
    settled: list[Run] = field(default_factory=list)  # documents to bring up to the log
    runner: str | None = None  # the conversation's runner, as the log shows it

    def __bool__(self) -> bool:
        return bool(self.interrupted or self.queue or self.leftover or self.settled)


def _text(event: Event) -> UserText:
    return UserText(event["message_id"], event["text"], event["author"], event["ts"])


@dataclass
class _History:
    run_id: str
    doc: dict[str, Any] | None
    created: Event | None = None  # the user.message that made the run (run, queue, interrupt)
    started: Event | None = None
    ended: Event | None = None
    steering: list[Event] = field(default_factory=list)
    taken: set[str] = field(default_factory=set)  # absorbed or dropped


def _history(run_id: str, events: list[Event], doc: dict[str, Any] | None) -> _History:
    h = _History(run_id, doc)
    for ev in events:
        kind = ev.get("type")
        if kind == "user.message":
            if ev.get("route") == "steer":
                h.steering.append(ev)
            elif h.created is None:
                h.created = ev
        elif kind == "run.started":
            h.started = ev
        elif kind == "run.ended":
            h.ended = ev
        elif kind in ("steering.absorbed", "steering.dropped"):
            h.taken.update(ev.get("message_ids", ()))
    return h


def _run(h: _History, kind: RunKind, triggers: list[UserText], default_runner: str) -> Run:
    doc = h.doc or {}
    started = h.started or {}
    created = h.created or started
    run = Run(
        h.run_id,
        str(doc.get("conversation_id") or created.get("conversation_id", "")),
        str(started.get("runner") or doc.get("runner") or default_runner),
        kind,
        triggers,
        created_at=int(doc.get("created_at") or created.get("ts", 0)),
    )
    counts = doc.get("steering") or {}
    run.counts.absorbed = int(counts.get("absorbed", 0))
    run.counts.dropped = int(counts.get("dropped", 0))
    return run


def rebuild(
    events: dict[str, list[Event]], docs: dict[str, dict[str, Any]], default_runner: str
) -> Recovered:
    """Work out the live state from the events of every candidate run.

    `events` maps each candidate run id to all its events (ascending); `docs`
    holds the run documents that exist for them."""
    histories = [_history(rid, evs, docs.get(rid)) for rid, evs in events.items()]
    carried = {
        mid
        for h in histories
        if h.started is not None
        for mid in h.started.get("trigger_message_ids", ())
    }
    out = Recovered()
    by_offset = sorted(
        histories, key=lambda h: (h.created or h.started or {}).get("offset", 1 << 62)
    )
    for h in by_offset:
        waiting = [_text(ev) for ev in h.steering if ev["message_id"] not in h.taken | carried]
        if h.started is not None:
            out.runner = h.started.get("runner", out.runner)
        if h.ended is not None:
            out.leftover.extend(waiting)  # its run ended before a follow-up took them
            if h.doc is not None and h.doc.get("status") in ("queued", "running"):
                run = _run(h, RunKind.RUN, [], default_runner)
                run.status = RunStatus(h.ended["status"])
                run.reason = h.ended.get("reason")
                run.ended_at = h.ended.get("ts")
                run.started_at = (h.started or {}).get("ts")
                run.usage = h.ended.get("usage")
                out.settled.append(run)
        elif h.started is not None:
            run = _run(h, RunKind.RUN, [], default_runner)
            run.status = RunStatus.RUNNING
            run.started_at = h.started.get("ts")
            for message in waiting:
                run.add_steering(message)
            out.interrupted.append(run)
        elif h.created is not None:
            kind = RunKind.QUEUE if h.created.get("route") == "queue" else RunKind.RUN
            run = _run(h, kind, [_text(h.created)], default_runner)
            for message in waiting:
                run.add_steering(message)
            out.queue.append(run)
        elif h.doc is not None:  # a document whose batch never reached the log
            run = _run(h, RunKind.RUN, [], default_runner)
            run.status = RunStatus.FAILED
            run.reason = "gateway_restart"
            out.settled.append(run)
    return out
