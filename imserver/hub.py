"""The Hub: everything one app instance runs, wired together.

``create_app`` builds one ``Hub`` and keeps it in
``app.extensions["imserver"]``; views reach it with ``current_hub()``. It
owns the process's threads: the committer (the one writer), the flusher
(queued socket writes) and the heartbeat, and it stops them in
``shutdown``.

The way of a message: ws.py or the HTTP view calls ``delivery.submit``; the
``Store`` queues it to the ``Committer``; after the commit the committer
hands the new inbox entries to ``Hub._on_commit``, which gives them to the
broker, which writes them to the receivers' connections through the
``ConnManager``.
"""

import logging
import threading

from flask import current_app

from imserver.broker import LocalBroker
from imserver.conn_manager import ConnManager
from imserver.heartbeat import Heartbeat
from imserver.metrics import Metrics
from imserver.ratelimit import RateLimiter
from imserver.store import Committer
from imserver.store import Store
from imserver.transport import Flusher

logger = logging.getLogger(__name__)

# Entries read from the database per query while replaying an inbox.
REPLAY_PAGE = 1000


class Hub:
    """Per-app state: connections, writer, broker, limiter, metrics."""

    def __init__(self, config: dict, database) -> None:
        self.config = config
        self.conns = ConnManager()
        self.metrics = Metrics(self.conns.count)
        self.flusher = Flusher()
        self.committer = Committer(database, batch=config["COMMIT_BATCH"],
                                   on_commit=self._on_commit,
                                   observe=self.metrics.observe_commit)
        self.store = Store(database, self.committer)
        self.broker = LocalBroker(self.deliver_local, self.conns.is_online)
        self.limiter = RateLimiter(config["RATE_LIMIT"], config["RATE_BURST"])
        self.heartbeat = Heartbeat(self.conns, config["PING_INTERVAL"],
                                   config["IDLE_TIMEOUT"], on_gap=self.catch_up)
        self._stopped = threading.Event()

    def _on_commit(self, entries: list) -> None:
        """Hand committed entries to the broker (runs in the committer thread)."""
        self.broker.publish(entries)

    def deliver_local(self, entries: list) -> set[int]:
        """Write entries to the connections of this process; count them."""
        connected = self.conns.send_entries(entries)
        if connected:
            self.metrics.deliveries.inc(sum(1 for e in entries if e[0] in connected))
        return connected

    def catch_up(self, wrapper) -> int:
        """Write every inbox entry above the wrapper's last seq, from the database.

        Used on connect (the replay of everything above the acked cursor) and
        when live entries showed a gap. Returns how many entries were read.
        Between pages it waits for the client to read what was queued, so a
        long inbox never grows the outgoing buffer past its bound.
        """
        total = 0
        conn = wrapper.conn
        drained_below = max(1, self.config["MAX_OUTBUF_BYTES"] // 4)
        while not wrapper.closed:
            entries = self.store.entries_after(wrapper.user_id, wrapper.last_seq,
                                               REPLAY_PAGE)
            for seq, frame in entries:
                wrapper.send_entry(seq, frame)
            total += len(entries)
            if len(entries) < REPLAY_PAGE and (not entries or not wrapper.has_gap()):
                break
            if not conn.wait_drained(drained_below, self.config["SEND_TIMEOUT"]):
                raise ConnectionError("client did not read its replay")
        self.metrics.replayed.inc(total)
        return total

    def shutdown(self) -> None:
        """Close every connection with 1001, commit what is queued, stop threads.

        Idempotent. Nothing acknowledged is lost: ``sent`` was only ever
        answered after a commit, and the queue is committed before stopping.
        """
        if self._stopped.is_set():
            return
        self._stopped.set()
        closed = self.conns.close_all(1001, "server shutting down")
        logger.info("shutdown: closed %d connections", closed)
        self.heartbeat.stop()
        self.committer.stop()
        self.broker.close()
        self.flusher.stop()


def current_hub() -> Hub:
    """Return the Hub of the current app."""
    return current_app.extensions["imserver"]
