"""Token buckets, one per key, with an injected clock.

``RATE_LIMIT`` tokens a second refill each bucket up to ``RATE_BURST``; a
message takes one token, and without one it is refused with
``rate_limited`` (nothing stored).

Imports: stdlib only.
"""

import threading
import time


class RateLimiter:
    """Allow ``rate`` events a second per key, in bursts of ``burst``."""

    def __init__(self, rate: float, burst: int, clock=time.monotonic,
                 max_keys: int = 100_000) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._max_keys = max_keys
        # key -> (tokens, time of last refill). Guarded by _lock.
        self._buckets: dict = {}
        self._lock = threading.Lock()

    def allow(self, key, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens from ``key``'s bucket; False if it has too few.

        ``cost=0`` only asks whether the bucket has a token left.
        """
        if self.rate <= 0:
            return True
        now = self._clock()
        with self._lock:
            tokens, then = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - then) * self.rate)
            allowed = tokens >= (cost or 1.0)
            if allowed:
                tokens -= cost
            if len(self._buckets) >= self._max_keys and key not in self._buckets:
                self._prune(now)
            self._buckets[key] = (tokens, now)
            return allowed

    def _prune(self, now: float) -> None:
        """Forget buckets that are full again; they mean nothing. Lock held."""
        full_after = self.burst / self.rate
        for key in [k for k, (_, t) in self._buckets.items() if now - t >= full_after]:
            del self._buckets[key]
