"""Identifiers: time-ordered, so that newest-first listings sort by id as well."""

from __future__ import annotations

import secrets
import time


def new_id(prefix: str) -> str:
    """`prefix_` + 12 hex digits of milliseconds + 12 random hex digits (29 chars for `run`)."""
    return f"{prefix}_{time.time_ns() // 1_000_000:012x}{secrets.token_hex(6)}"


def now_ms() -> int:
    return time.time_ns() // 1_000_000
