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


class ConnectionSlots:
    """Open connections, per process and per key (a conversation), each with a cap.

    `acquire` takes a slot at once or says which cap is reached; the caller releases
    it when the connection ends, so a burst of connects cannot overshoot."""

    __slots__ = ("_per_key", "max_per_key", "max_total", "total")

    def __init__(self, max_total: int, max_per_key: int) -> None:
        self.max_total = max_total
        self.max_per_key = max_per_key
        self.total = 0
        self._per_key: dict[str, int] = {}

    def count(self, key: str) -> int:
        return self._per_key.get(key, 0)

    def acquire(self, key: str | None = None) -> str | None:
        """None once a slot is taken; else the reason it is not."""
        if self.total >= self.max_total:
            return "too many connections to this server"
        if key is not None:
            held = self._per_key.get(key, 0)
            if held >= self.max_per_key:
                return "too many connections to this conversation"
            self._per_key[key] = held + 1
        self.total += 1
        return None

    def release(self, key: str | None = None) -> None:
        self.total -= 1
        if key is not None:
            held = self._per_key[key] - 1
            if held:
                self._per_key[key] = held
            else:
                del self._per_key[key]
