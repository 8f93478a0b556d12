"""Per-connection frame rate limit: a token bucket, fed the time by its caller."""

from __future__ import annotations


class TokenBucket:
    """`rate` tokens a second up to `burst`; `take(now)` spends one if there is one.

    `refusals` counts refusals in a row, so that the edge can close an abusive
    client (4029) after enough of them instead of answering each forever."""

    __slots__ = ("burst", "rate", "refusals", "stamp", "tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = now
        self.refusals = 0

    def take(self, now: float) -> bool:
        elapsed = max(0.0, now - self.stamp)
        self.stamp = now
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            self.refusals = 0
            return True
        self.refusals += 1
        return False
