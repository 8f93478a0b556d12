"""Summarise py-spy folded stacks (`fanout.py --profile DIR` writes them).

    python -m bench.folded DIR/gateway-r200-c100.folded [--top 25] [--match TEXT]

Prints the functions with the most samples on top of the stack (self) and the
most samples anywhere in the stack (inclusive), as shares of all samples.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_LINE = re.compile(r"\s*\(([^:()]+):\d+\)$")


def frame_name(frame: str) -> str:
    """`func (path/file.py:123)` -> `func (file.py)`: the same function at any line."""
    match = _LINE.search(frame)
    if match is None:
        return frame.strip()
    return f"{frame[: match.start()].strip()} ({match.group(1).rsplit('/', 1)[-1]})"


def summarise(path: Path, match: str | None = None) -> tuple[int, Counter[str], Counter[str]]:
    self_t: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        if match is not None and match not in stack:
            continue
        n = int(count)
        total += n
        frames = [frame_name(f) for f in stack.split(";")]
        self_t[frames[-1]] += n
        for name in set(frames):
            incl[name] += n
    return total, self_t, incl


# Where a gateway sample goes: the first category whose pattern is in the stack (leaf first).
CATEGORIES: list[tuple[str, list[str]]] = [
    ("socket write (transport.write: syscall, kernel TCP)", ["websockets_sansio_impl.py:506)"]),
    ("websockets framing per client", ["websockets/protocol.py", "websockets/frames.py"]),
    ("uvicorn send, other", ["websockets_sansio_impl.py"]),
    ("starlette send wrapper", ["starlette/_exception_handler.py"]),
    ("outbox + writer task", ["gateway/outbox.py", "Session._write"]),
    ("actor, event log, store", ["gateway/conversation.py", "gateway/eventlog.py", "store/"]),
    ("run driver, result rules", ["gateway/orchestrator.py", "gateway/core/results.py"]),
    ("bench runner", ["bench/"]),
]


def categorise(path: Path) -> tuple[int, Counter[str]]:
    """Samples per category, matching from the leaf frame upwards."""
    out: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        for frame in reversed(frames):
            hit = next((name for name, pats in CATEGORIES if any(p in frame for p in pats)), None)
            if hit is not None:
                out[hit] += n
                break
        else:
            leaf = frame_name(frames[-1])
            out[
                "event loop, task switching (uvloop/asyncio)" if "Runner.run" in leaf else leaf
            ] += n
    return total, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--match", help="only stacks containing this text")
    parser.add_argument("--categories", action="store_true", help="gateway cost categories")
    args = parser.parse_args()
    if args.categories:
        total, cats = categorise(args.path)
        print(f"{total} samples")
        for name, n in cats.most_common(args.top):
            print(f"{n / total:6.1%}  {name}")
        return
    total, self_t, incl = summarise(args.path, args.match)
    print(f"{total} samples")
    for title, counter in (("self", self_t), ("inclusive", incl)):
        print(f"\n-- {title}")
        for name, n in counter.most_common(args.top):
            print(f"{n / total:6.1%}  {name}")


if __name__ == "__main__":
    main()
