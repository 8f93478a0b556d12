"""The per-connection token bucket (PROTOCOL.md section 7), fed the time by the test."""

from __future__ import annotations

from fractions import Fraction

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.limits import TokenBucket


def test_a_full_burst_then_refusals() -> None:
    bucket = TokenBucket(rate=10, burst=3, now=100.0)
    assert [bucket.take(100.0) for _ in range(5)] == [True, True, True, False, False]
    assert bucket.refusals == 2


def test_tokens_come_back_at_the_rate() -> None:
    bucket = TokenBucket(rate=4, burst=2, now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [True, True, False]
    assert bucket.take(0.125) is False  # half a token
    assert bucket.take(0.25) is True  # a whole one (0.5 + 0.5)
    assert bucket.take(0.25) is False
    assert bucket.take(0.75) is True  # two tokens back, one spent
    assert bucket.take(0.75) is True
    assert bucket.take(0.75) is False


def test_the_bucket_never_holds_more_than_the_burst() -> None:
    bucket = TokenBucket(rate=1000, burst=2, now=0.0)
    results = [bucket.take(3600.0) for _ in range(3)]
    assert results == [True, True, False]


def test_refusals_count_in_a_row_and_reset_on_success() -> None:
    bucket = TokenBucket(rate=1, burst=1, now=0.0)
    assert bucket.take(0.0) is True
    assert [bucket.take(0.5) for _ in range(3)] == [False, False, False]
    assert bucket.refusals == 3
    assert bucket.take(1.0) is True
    assert bucket.refusals == 0


def test_a_clock_going_back_adds_nothing() -> None:
    bucket = TokenBucket(rate=10, burst=1, now=50.0)
    assert bucket.take(50.0) is True
    assert bucket.take(40.0) is False  # no negative refill, no refill either
    assert bucket.tokens == 0.0


def test_a_zero_rate_never_refills() -> None:
    bucket = TokenBucket(rate=0, burst=2, now=0.0)
    assert [bucket.take(t) for t in (0.0, 1.0, 1e6)] == [True, True, False]


# Times on a 1/64 s grid and integer rates keep the float arithmetic exact, so the bucket
# can be compared with an exact reference in fractions.
steps = st.lists(st.integers(0, 200), min_size=1, max_size=80)


@settings(max_examples=200, deadline=None)
@given(rate=st.integers(0, 50), burst=st.integers(1, 20), gaps=steps)
def test_the_bucket_matches_an_exact_reference(rate: int, burst: int, gaps: list[int]) -> None:
    now = Fraction(0)
    bucket = TokenBucket(rate=rate, burst=burst, now=float(now))
    tokens = Fraction(burst)
    refusals = 0
    accepted = 0
    for gap in gaps:
        now += Fraction(gap, 64)
        tokens = min(Fraction(burst), tokens + Fraction(gap, 64) * rate)
        expected = tokens >= 1
        if expected:
            tokens -= 1
            refusals = 0
            accepted += 1
        else:
            refusals += 1
        assert bucket.take(float(now)) is expected
        assert bucket.refusals == refusals
        assert Fraction(bucket.tokens) == tokens
    # over any run, no more than the burst plus what the rate refills
    assert accepted <= burst + now * rate
