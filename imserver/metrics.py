"""Counters and histograms, exposed at ``/metrics`` in Prometheus text.

One ``Metrics`` object per app, on its own ``CollectorRegistry`` (so that
several apps in one test process do not collide). The names are the
contract's (``imserver_connections``, ``imserver_messages_total``,
``imserver_deliveries_total``) plus a few for operators.

Across gunicorn workers: with ``PROMETHEUS_MULTIPROC_DIR`` set (``imserver
serve`` sets it), every worker writes its values to files there and any
worker answering ``/metrics`` adds them all up (prometheus-client's
multiprocess mode); the connections gauge sums the live workers only.

Imports: stdlib and prometheus_client only.
"""

import bisect
import os

from prometheus_client import CollectorRegistry
from prometheus_client import Counter
from prometheus_client import Gauge
from prometheus_client import Histogram
from prometheus_client import generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class Metrics:
    """The process's metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        r = self.registry
        self.connections = Gauge("imserver_connections", "Open WebSocket connections",
                                 registry=r, multiprocess_mode="livesum")
        self.messages = Counter("imserver_messages_total", "Messages stored", registry=r)
        self.deliveries = Counter("imserver_deliveries_total",
                                  "Inbox entries written to a live connection", registry=r)
        self.replayed = Counter("imserver_replayed_total",
                                "Inbox entries replayed from the database", registry=r)
        self.refused = Counter("imserver_refused_frames_total",
                               "Frames refused with an error", ["code"], registry=r)
        self.rate_limited = Counter("imserver_rate_limited_total",
                                    "Frames refused with rate_limited", registry=r)
        self.slow_closed = Counter("imserver_slow_receivers_closed_total",
                                   "Connections closed because they did not read",
                                   registry=r)
        self.closed = Counter("imserver_connections_closed_total",
                              "Connections closed", registry=r)
        self.publish_failures = Counter("imserver_redis_publish_failures_total",
                                        "Publishes to Redis that failed", registry=r)
        self.send_latency = Histogram("imserver_send_to_sent_seconds",
                                      "From a send frame to its sent answer",
                                      buckets=LATENCY_BUCKETS, registry=r)
        # Send latencies of the batch being answered, written once per batch.
        self.send_latencies = BatchedObservations(self.send_latency)
        self.commit_latency = Histogram("imserver_commit_seconds",
                                        "One group commit", buckets=LATENCY_BUCKETS,
                                        registry=r)
        self.commit_batch = Histogram("imserver_commit_batch_ops",
                                      "Operations in one group commit",
                                      buckets=(1, 2, 5, 10, 20, 50, 100, 200, 512),
                                      registry=r)

    def observe_commit(self, seconds: float, ops: int) -> None:
        """Record one group commit."""
        self.commit_latency.observe(seconds)
        self.commit_batch.observe(ops)

    def batch_done(self) -> None:
        """Write what the writer gathered while answering one batch."""
        self.send_latencies.flush()

    def render(self) -> bytes:
        """Return the Prometheus text exposition (of every worker, if several)."""
        if self.multiprocess:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


class BatchedObservations:
    """Observations of one histogram gathered, then written once per batch.

    In multiprocess mode every ``observe`` writes two values to a memory-mapped
    file (and checks the pid first): at thousands of messages a second that was
    a tenth of the writer's time. The writer adds each ``sent`` latency here
    and ``flush`` adds each bucket's count and the sum in one write each. Only
    one thread (the writer) may call ``add`` and ``flush``.
    """

    def __init__(self, histogram: Histogram) -> None:
        self._histogram = histogram
        self._values: list[float] = []
        # prometheus-client's own fields, if this version has them.
        self._bounds = getattr(histogram, "_upper_bounds", None)
        self._buckets = getattr(histogram, "_buckets", None)
        self._sum = getattr(histogram, "_sum", None)

    def add(self, value: float) -> None:
        self._values.append(value)

    def flush(self) -> None:
        values, self._values = self._values, []
        if not values:
            return
        if self._bounds is None or self._buckets is None or self._sum is None:
            for value in values:
                self._histogram.observe(value)
            return
        counts = [0] * len(self._bounds)
        for value in values:
            # The first bucket whose bound is >= value, as ``observe`` does;
            # the last bound is +Inf.
            counts[bisect.bisect_left(self._bounds, value)] += 1
        self._sum.inc(sum(values))
        for bucket, count in zip(self._buckets, counts):
            if count:
                bucket.inc(count)
