"""The heartbeat: ping every connection, drop the silent ones.

The Go article: "客户端与服务端之间还需设置心跳机制，若客户端一段时间内无心跳，
服务端也需要删除该连接信息" (a client silent for a while is removed). One
thread per process, not one per connection: every ``tick`` it walks the
``ConnManager``'s snapshot, sends a WebSocket ping to each connection not
pinged for ``ping_interval``, and closes and removes each connection from
which nothing (a pong included) arrived for ``idle_timeout``. It also asks
for a catch-up from the database for a connection whose live entries have a
gap that did not fill by itself (``on_gap``).

A connection here needs ``idle_for()`` (seconds since the client last sent
anything) and ``ping()``.

Imports: stdlib and ``imserver.conn_manager`` only.
"""

import logging
import random
import threading
import time

from imserver.conn_manager import ConnManager

logger = logging.getLogger(__name__)

CLOSE_IDLE = 1008  # policy violation: the client stopped answering
GAP_WAIT = 1.0  # seconds a gap in live entries may last before a catch-up


class Heartbeat:
    """Ping, reap idle connections and repair gaps, from one thread."""

    def __init__(self, conns: ConnManager, ping_interval: float, idle_timeout: float,
                 on_gap=None, on_tick=None) -> None:
        self.conns = conns
        # Called once a round, for the app's periodic work.
        self.on_tick = on_tick
        self.ping_interval = ping_interval
        self.idle_timeout = idle_timeout
        self.on_gap = on_gap
        self.tick = max(0.05, min(1.0, ping_interval / 2, idle_timeout / 4))
        # ConnWrapper -> monotonic time of its last ping; only this thread uses it.
        self._last_ping: dict = {}
        # Its own generator for ping phases: the global one belongs to the
        # host process (an embedding app, seeded tests), and is left alone.
        self._random = random.Random()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="imserver-heartbeat",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread."""
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.tick):
            try:
                self.beat()
            except Exception:
                logger.exception("heartbeat failed")

    def beat(self) -> None:
        """Run one round over every connection."""
        now = time.monotonic()
        wrappers = self.conns.wrappers()
        for wrapper in wrappers:
            if wrapper.conn.idle_for() >= self.idle_timeout:
                logger.info("closing idle connection user_id=%s", wrapper.user_id)
                self.conns.close_and_delete_conn(wrapper.user_id, CLOSE_IDLE,
                                                 "idle timeout", expected=wrapper)
                continue
            # A new connection is first pinged within one interval of being
            # seen, at a random phase: connections that came together are
            # pinged spread over the interval, not all at once. (Each pong
            # wakes a thread; ten thousand at once is the GIL convoy the
            # idle burst measures.)
            last = self._last_ping.get(wrapper)
            if last is None:
                last = self._last_ping[wrapper] = now - self._random.uniform(
                    0, self.ping_interval)
            if now - last >= self.ping_interval:
                self._ping(wrapper)
                self._last_ping[wrapper] = now
            if self.on_gap is not None and wrapper.needs_catch_up(GAP_WAIT):
                self.on_gap(wrapper)
        if self.on_tick is not None:
            self.on_tick()
        if len(self._last_ping) > len(wrappers):
            alive = set(wrappers)
            for wrapper in [w for w in self._last_ping if w not in alive]:
                del self._last_ping[wrapper]

    def _ping(self, wrapper) -> None:
        try:
            with wrapper.lock:
                if not wrapper.closed:
                    wrapper.conn.ping()
        except Exception as exc:
            logger.info("ping failed user_id=%s error=%s", wrapper.user_id,
                        exc.__class__.__name__)
            self.conns.close_and_delete_conn(wrapper.user_id, 1011, "ping failed",
                                             expected=wrapper)
