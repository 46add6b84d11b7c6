"""The token bucket with a fake clock."""

from imserver.ratelimit import RateLimiter


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_burst_then_refusal_then_refill():
    """A bucket allows the burst, refuses past it, refills at the rate."""
    clock = Clock()
    limiter = RateLimiter(rate=20, burst=40, clock=clock)
    assert all(limiter.allow("u") for _ in range(40))
    assert not limiter.allow("u")
    clock.now += 0.5  # 10 tokens
    assert sum(limiter.allow("u") for _ in range(20)) == 10


def test_keys_have_their_own_buckets():
    """One user's burst does not limit another."""
    clock = Clock()
    limiter = RateLimiter(rate=1, burst=2, clock=clock)
    assert limiter.allow("a") and limiter.allow("a") and not limiter.allow("a")
    assert limiter.allow("b")


def test_full_buckets_are_forgotten_when_many_keys():
    """Past max_keys, buckets that refilled are pruned so memory stays bounded."""
    clock = Clock()
    limiter = RateLimiter(rate=10, burst=10, clock=clock, max_keys=100)
    for key in range(100):
        limiter.allow(key)
    clock.now += 5
    limiter.allow("new")
    assert len(limiter._buckets) <= 2
