"""The Hub: everything one app instance runs, wired together.

``create_app`` builds one ``Hub`` and keeps it in
``app.extensions["imserver"]``; views reach it with ``current_hub()``. It
owns the process's threads: the committer (the one writer), the store's
readers, the flusher (queued socket writes), the heartbeat and, on SQLite,
the checkpointer, and it stops them in ``shutdown``.

The way of a message: ws.py or the HTTP view calls ``delivery.submit``; the
``Store`` queues it to the ``Committer``; after the commit the committer
hands the new inbox entries to ``Hub._on_commit``, which gives them to the
broker, which writes them to the receivers' connections through the
``ConnManager``.
"""

import concurrent.futures
import itertools
import logging
import threading
import time

from flask import current_app

from imserver.broker import LocalBroker
from imserver.broker import RedisBroker
from imserver.conn_manager import ConnManager
from imserver.db import Checkpointer
from imserver.db import is_sqlite
from imserver.heartbeat import Heartbeat
from imserver.metrics import Metrics
from imserver.ratelimit import RateLimiter
from imserver.store import Committer
from imserver.store import Store
from imserver.transport import CLOSE_WAIT
from imserver.transport import Flusher

logger = logging.getLogger(__name__)

# Entries read from the database per query while replaying an inbox.
REPLAY_PAGE = 1000
# Seconds between sweeps comparing live connections with their inboxes in
# the database, to repair notifications that Redis dropped.
SWEEP_INTERVAL = 10.0


class Hub:
    """Per-app state: connections, writer, broker, limiter, metrics."""

    def __init__(self, config: dict, database) -> None:
        self.config = config
        self.conns = ConnManager()
        self.metrics = Metrics()
        self.flusher = Flusher(on_slow_receiver=self.metrics.slow_closed.inc)
        self.committer = Committer(database, batch=config["COMMIT_BATCH"],
                                   on_commit=self._on_commit,
                                   observe=self.metrics.observe_commit)
        self.store = Store(database, self.committer,
                           on_new_messages=self.metrics.messages.inc,
                           readers=config["READ_THREADS"])
        self.committer.cork = self.flusher.corked
        self.committer.after_commit.append(self.metrics.batch_done)
        # SQLite: the WAL is copied back by a thread of its own, not in the
        # writer's COMMIT (see imserver.db).
        self.checkpointer = None
        if is_sqlite(database):
            self.checkpointer = Checkpointer(database)
            self.committer.after_commit.append(self.checkpointer.wake)
        # Connection tokens: "<node>/<n>", unique per connection.
        self._tokens = itertools.count(1)
        if config["REDIS_URL"]:
            # Several processes: deliver across them through Redis.
            self.broker = RedisBroker(
                config["REDIS_URL"], config["REDIS_PREFIX"], self.deliver_local,
                self.conns.is_online, self.conns.count, on_kick=self._on_kick,
                on_reconnect=self._on_broker_reconnect,
                on_publish_error=self.metrics.publish_failures.inc)
            self.node_id = self.broker.node_id
        else:
            # The Go article's single-machine mode.
            self.broker = LocalBroker(self.deliver_local, self.conns.is_online,
                                      self.conns.count, self._on_kick)
            self.node_id = "local"
        self.limiter = RateLimiter(config["RATE_LIMIT"], config["RATE_BURST"])
        # Registration and login attempts per client address.
        self.auth_limiter = RateLimiter(config["AUTH_RATE_LIMIT"],
                                        config["AUTH_RATE_BURST"])
        # Failed logins per username.
        self.login_failures = RateLimiter(config["LOGIN_FAILURES_PER_MINUTE"] / 60,
                                          config["LOGIN_FAILURES_PER_MINUTE"])
        self._next_sweep = time.monotonic() + SWEEP_INTERVAL
        # Catch-ups started by the heartbeat, the sweep or a reconnect run
        # here, never in the heartbeat thread: one may wait SEND_TIMEOUT for
        # a slow client, and pings must go on meanwhile.
        self._catch_up_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=2, thread_name_prefix="imserver-catch-up")
        # Wrappers with a catch-up queued or running (no two at once).
        self._catching_up: set = set()
        self._catching_lock = threading.Lock()
        self.heartbeat = Heartbeat(self.conns, config["PING_INTERVAL"],
                                   config["IDLE_TIMEOUT"], on_gap=self.schedule_catch_up,
                                   on_tick=self._on_tick)
        self._stopped = threading.Event()
        # WebSocket handlers running, including those still replaying.
        self.open_connections = 0
        self._open_lock = threading.Lock()
        # Notified when the last handler ends (shutdown waits for it).
        self._all_closed = threading.Condition(self._open_lock)

    def connection_opened(self) -> None:
        with self._open_lock:
            self.open_connections += 1
        self.metrics.connections.inc()

    def connection_closed(self) -> None:
        with self._open_lock:
            self.open_connections -= 1
            if self.open_connections == 0:
                self._all_closed.notify_all()
        self.metrics.connections.dec()

    def new_token(self) -> str:
        """Return a token naming one connection of this process."""
        return f"{self.node_id}/{next(self._tokens)}"

    def _on_kick(self, user_id: int, keep: str | None, code: int, reason: str) -> None:
        """Close this process's connection of ``user_id`` unless it is ``keep``."""
        wrapper = self.conns._get_wrapper(user_id)
        if wrapper is not None and (keep is None or wrapper.conn.token != keep):
            logger.info("closing connection user_id=%s code=%s reason=%s", user_id, code,
                        reason)
            self.conns.close_and_delete_conn(user_id, code, reason, expected=wrapper)

    def _on_broker_reconnect(self) -> None:
        """After the subscriber (re)connects: re-register users, catch them up.

        Runs the catch-up in its own thread so that the subscriber goes back
        to listening at once.
        """
        wrappers = self.conns.wrappers()
        if not wrappers:
            return
        for wrapper in wrappers:
            if not self.broker.restore(wrapper.user_id, wrapper.conn.token):
                self._on_kick(wrapper.user_id, None, 4001, "replaced")
        for wrapper in wrappers:
            self.schedule_catch_up(wrapper)

    def _on_tick(self) -> None:
        """Every SWEEP_INTERVAL with Redis: repair deliveries pub/sub dropped."""
        if not self.config["REDIS_URL"] or time.monotonic() < self._next_sweep:
            return
        self._next_sweep = time.monotonic() + SWEEP_INTERVAL
        self.sweep()

    def sweep(self) -> int:
        """Catch up every local connection that is behind its inbox; return how many."""
        wrappers = {w.user_id: w for w in self.conns.wrappers()}
        behind = 0
        ids = list(wrappers)
        for start in range(0, len(ids), 500):
            for user_id, last_seq in self.store.last_seqs(ids[start:start + 500]):
                wrapper = wrappers[user_id]
                if last_seq > wrapper.last_seq and not wrapper.closed:
                    behind += 1
                    self.schedule_catch_up(wrapper)
        if behind:
            logger.warning("sweep caught up %d connections behind their inbox", behind)
        return behind

    def schedule_catch_up(self, wrapper) -> None:
        """Run ``catch_up`` for ``wrapper`` in the background, once at a time."""
        with self._catching_lock:
            if wrapper in self._catching_up or self._stopped.is_set():
                return
            self._catching_up.add(wrapper)
        try:
            self._catch_up_pool.submit(self._catch_up_quietly, wrapper)
        except RuntimeError:
            # The pool is shut down: we are stopping.
            with self._catching_lock:
                self._catching_up.discard(wrapper)

    def _catch_up_quietly(self, wrapper) -> None:
        try:
            self.catch_up(wrapper)
        except Exception as exc:
            logger.info("catch-up failed user_id=%s: %r", wrapper.user_id, exc)
        finally:
            with self._catching_lock:
                self._catching_up.discard(wrapper)

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
        Before each entry it waits for the client to read what was queued, so
        a long inbox never grows the outgoing buffer past its bound (one page
        of large messages can be far more than ``MAX_OUTBUF_BYTES``).
        """
        total = 0
        conn = wrapper.conn
        drained_below = max(1, self.config["MAX_OUTBUF_BYTES"] // 4)
        while not wrapper.closed:
            entries = self.store.entries_after(wrapper.user_id, wrapper.last_seq,
                                               REPLAY_PAGE)
            for seq, frame in entries:
                if not conn.wait_drained(drained_below, self.config["SEND_TIMEOUT"]):
                    raise ConnectionError("client did not read its replay")
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
        self._catch_up_pool.shutdown(wait=False, cancel_futures=True)
        self.committer.stop()
        self.store.close()
        if self.checkpointer is not None:
            self.checkpointer.stop()
        self.broker.close()
        # The clients answer the close frames meanwhile; the handlers end
        # at their reply, or when the flusher stops reading (CLOSE_WAIT).
        with self._all_closed:
            self._all_closed.wait_for(lambda: self.open_connections <= 0,
                                      timeout=CLOSE_WAIT + 1)
        self.flusher.stop()


def current_hub() -> Hub:
    """Return the Hub of the current app."""
    return current_app.extensions["imserver"]
