"""ConnManager: the map of online users, a port of the Go article's design.

The Go article keeps every online user's WebSocket in a ``sync.Map`` from
user id to a ``connWrapper`` that binds the connection to a ``sync.Mutex``,
because only one goroutine may write a WebSocket at a time. ``ConnManager``
wraps the map and owns the operations: ``SetConn``, ``getWrapper``,
``SendMessage``, ``CloseAndDeleteConn`` and ``Count``. This module is that
design in Python, method for method:

=========================  ==========================================
Go                         Python
=========================  ==========================================
``connWrapper``            ``ConnWrapper``
``connWrapper.mu``         ``ConnWrapper.lock`` (``threading.Lock``)
``ConnManager.connMap``    ``ConnManager._conns`` (dict + ``_lock``)
``SetConn``                ``set_conn``
``getWrapper``             ``_get_wrapper``
``SendMessage``            ``send_message`` (``send_entry`` for seqs)
``CloseAndDeleteConn``     ``close_and_delete_conn``
``Count``                  ``count``
the article's fan-out      ``send_many``, ``send_entries``
=========================  ==========================================

A connection is any object with ``send(text)`` and ``close(code, reason)``;
the WebSocket handler passes its session, unit tests pass fakes. Any
exception from ``send`` means the connection is dead.

What the Go sample leaves out, and this port adds:

- **Replacing a connection.** ``SetConn`` overwrites the map entry and leaks
  the older connection. ``set_conn`` closes it with 4001 ``replaced``.
- **The cleanup race.** When the old connection's goroutine ends, its
  ``CloseAndDeleteConn(userId)`` closes and deletes whatever is in the map
  under that id, which by then is the *new* connection. Here the handler
  passes its own wrapper (``expected=``), and only that one is removed.
- **Inbox order.** An inbox entry carries its ``seq``; the wrapper remembers
  the last seq written and writes entries strictly in order: a live entry
  that arrives ahead of older ones (still being replayed from the database
  on connect, or reordered between processes) is held until they are
  written, and one written already is dropped.

Imports: stdlib only (no Flask, no peewee, no simple_websocket).
"""

import logging
import threading
import time

logger = logging.getLogger(__name__)

# Close codes used by the manager.
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_REPLACED = 4001

# Live entries held back while a connection replays its inbox, at most; past
# it they are dropped and read back from the database instead (the database,
# not this buffer, is the truth).
MAX_HELD = 10_000


class ConnWrapper:
    """One user's connection bound to its write lock.

    Go: connWrapper. The Go struct has ``conn`` and ``mu``; this one also
    keeps the connection's place in its user's inbox, guarded by the same
    lock, because "write entry n" and "n is now the last one written" must
    happen together.
    """

    __slots__ = ("user_id", "conn", "lock", "last_seq", "held", "gap_since", "closed")

    def __init__(self, user_id: int, conn, last_seq: int = 0) -> None:
        self.user_id = user_id
        self.conn = conn
        # Go: mu. Serializes every write to ``conn`` and guards ``last_seq``,
        # ``held``, ``gap_since`` and ``closed``.
        self.lock = threading.Lock()
        # Seq of the last inbox entry written to this connection (at first
        # the user's acked cursor: the handler replays from there).
        self.last_seq = last_seq
        # Entries that arrived ahead of a gap, by seq, until the gap is filled.
        self.held: dict[int, str] = {}
        # Since when (monotonic) entries are missing after ``last_seq``.
        self.gap_since: float | None = None
        self.closed = False

    def send(self, data: str) -> None:
        """Write one frame under the write lock; raise if the connection is dead."""
        with self.lock:
            if self.closed:
                raise ConnectionError("connection closed")
            self.conn.send(data)

    def send_entry(self, seq: int, data: str) -> None:
        """Write inbox entry ``seq`` in order, or hold it until it fits.

        An entry at or below ``last_seq`` was written already (replayed, or
        delivered twice) and is dropped; one that leaves a gap is held until
        the entries before it arrive or are read back from the database.
        """
        with self.lock:
            if self.closed:
                raise ConnectionError("connection closed")
            if seq <= self.last_seq:
                return
            if seq == self.last_seq + 1:
                # Moved first: the client may ack this entry before send()
                # returns, and an ack is checked against last_seq.
                self.last_seq = seq
                self.conn.send(data)
                if self.held:
                    self._flush_held()
                return
            if self.gap_since is None:
                self.gap_since = time.monotonic()
            if len(self.held) >= MAX_HELD:
                # Too far behind to buffer: forget what is held, the
                # catch-up reads it all back from the database.
                self.held.clear()
            self.held[seq] = data

    def _flush_held(self) -> None:
        """Write held entries that now follow ``last_seq``; lock held."""
        assert self.lock.locked()
        held = self.held
        while True:
            data = held.pop(self.last_seq + 1, None)
            if data is None:
                break
            self.last_seq += 1
            self.conn.send(data)
        for seq in [s for s in held if s <= self.last_seq]:
            del held[seq]
        if not held:
            self.gap_since = None

    def has_gap(self) -> bool:
        """Tell whether entries are known to be missing after ``last_seq``."""
        return self.gap_since is not None

    def needs_catch_up(self, after: float) -> bool:
        """Tell whether a gap in the live entries has lasted ``after`` seconds."""
        gap_since = self.gap_since
        return gap_since is not None and time.monotonic() - gap_since >= after


class ConnManager:
    """The map of online users: user id -> ``ConnWrapper``.

    Go: ConnManager. Go's ``sync.Map`` is a map many goroutines may use at
    once; here that is a dict and one ``threading.Lock`` held only to read or
    change the dict, never while writing to a socket (a slow socket must not
    stop everyone else from looking up their peers).
    """

    def __init__(self) -> None:
        # Go: connMap. user id -> ConnWrapper of the user's live connection.
        self._conns: dict[int, ConnWrapper] = {}
        # Guards ``_conns``: held for dict reads and writes only.
        self._lock = threading.Lock()

    def set_conn(self, user_id: int, conn, last_seq: int = 0,
                 first_frame: str | None = None) -> ConnWrapper:
        """Register ``conn`` as the live connection of ``user_id``.

        Go: ConnManager.SetConn. Go overwrites the entry and leaks the older
        connection; this closes it with 4001 ``replaced`` (one live
        connection per user) after the new one is in the map. Returns the new
        wrapper: the handler writes its own frames through it, so that a
        replaced handler can never write to its successor. ``last_seq`` is
        where inbox entries continue on this connection (the acked cursor).
        ``first_frame`` is written before the connection is in the map, so
        no other thread can write anything to the client before it.
        """
        wrapper = ConnWrapper(user_id, conn, last_seq)
        if first_frame is not None:
            wrapper.send(first_frame)
        with self._lock:
            old = self._conns.get(user_id)
            self._conns[user_id] = wrapper
        if old is not None:
            logger.info("replacing connection user_id=%s", user_id)
            self._close_wrapper(old, CLOSE_REPLACED, "replaced")
        return wrapper

    def _get_wrapper(self, user_id: int) -> ConnWrapper | None:
        """Return the wrapper of ``user_id``, or None when not connected.

        Go: ConnManager.getWrapper (Go returns ``(wrapper, ok)``).
        """
        with self._lock:
            return self._conns.get(user_id)

    def send_message(self, user_id: int, data: str) -> tuple[bool, Exception | None]:
        """Send one text frame to ``user_id``.

        Go: ConnManager.SendMessage, with the same two answers: the first
        value is False when the user has no connection here (the caller
        decides, e.g. the message waits in the inbox); the second is the
        write error, if any. Unlike Go, a connection whose write failed is
        closed and forgotten here, so no caller can forget to.
        """
        wrapper = self._get_wrapper(user_id)
        if wrapper is None:
            return False, None
        try:
            wrapper.send(data)
        except Exception as exc:
            self._drop_failed(wrapper, exc)
            return True, exc
        return True, None

    def send_entry(self, user_id: int, seq: int, data: str) -> tuple[bool, Exception | None]:
        """Send inbox entry ``seq`` of ``user_id``, in seq order.

        Like ``send_message``, for the frames that carry an inbox ``seq``:
        the wrapper writes them strictly in order and never twice.
        """
        wrapper = self._get_wrapper(user_id)
        if wrapper is None:
            return False, None
        try:
            wrapper.send_entry(seq, data)
        except Exception as exc:
            self._drop_failed(wrapper, exc)
            return True, exc
        return True, None

    def send_many(self, user_ids, data: str) -> set[int]:
        """Send one frame to many users; return those who were connected.

        The article's "群发" (fan-out). Every write only queues bytes (a
        connection never blocks its writer), so a slow or broken member
        holds up no one: its failure closes that member alone.
        """
        connected = set()
        for user_id in user_ids:
            ok, _ = self.send_message(user_id, data)
            if ok:
                connected.add(user_id)
        return connected

    def send_entries(self, entries) -> set[int]:
        """Send inbox entries, each to its own user; return who was connected.

        The fan-out of a group message: ``entries`` is an iterable of
        ``(user_id, seq, data)`` (each member has its own seq). As in
        ``send_many``, no member holds up another.
        """
        connected = set()
        for user_id, seq, data in entries:
            ok, _ = self.send_entry(user_id, seq, data)
            if ok:
                connected.add(user_id)
        return connected

    def close_and_delete_conn(
        self,
        user_id: int,
        code: int = CLOSE_NORMAL,
        reason: str = "",
        expected: ConnWrapper | None = None,
    ) -> bool:
        """Close the connection of ``user_id`` with a close frame and forget it.

        Go: ConnManager.CloseAndDeleteConn: write a close frame, close, then
        delete from the map. With ``expected``, only that wrapper is closed
        and deleted: a handler cleaning up after itself passes its own, so it
        can never remove the newer connection that replaced it (the race in
        the Go sample). Returns whether a connection was removed.
        """
        with self._lock:
            wrapper = self._conns.get(user_id)
            if wrapper is None or (expected is not None and wrapper is not expected):
                wrapper = None
            else:
                del self._conns[user_id]
        if wrapper is None:
            if expected is not None:
                # Already replaced or removed: still make sure it is closed.
                self._close_wrapper(expected, code, reason)
            return False
        self._close_wrapper(wrapper, code, reason)
        return True

    def count(self) -> int:
        """Return the number of online users. Go: ConnManager.Count."""
        with self._lock:
            return len(self._conns)

    def wrappers(self) -> list[ConnWrapper]:
        """Return a snapshot of every wrapper (heartbeat, shutdown, stats)."""
        with self._lock:
            return list(self._conns.values())

    def is_online(self, user_id: int) -> bool:
        """Tell whether ``user_id`` has a connection here."""
        with self._lock:
            return user_id in self._conns

    def close_all(self, code: int = CLOSE_GOING_AWAY, reason: str = "") -> int:
        """Close and forget every connection (shutdown); return how many.

        The dict is emptied under the lock, the connections are closed
        outside it, as websockets' server shutdown does.
        """
        with self._lock:
            wrappers = list(self._conns.values())
            self._conns.clear()
        for wrapper in wrappers:
            self._close_wrapper(wrapper, code, reason)
        return len(wrappers)

    def _drop_failed(self, wrapper: ConnWrapper, exc: Exception) -> None:
        """Forget a connection whose write failed: it is its user's problem."""
        logger.warning(
            "write failed, dropping connection user_id=%s error=%s",
            wrapper.user_id,
            exc.__class__.__name__,
        )
        self.close_and_delete_conn(wrapper.user_id, 1011, "write failed", expected=wrapper)

    @staticmethod
    def _close_wrapper(wrapper: ConnWrapper, code: int, reason: str) -> None:
        """Write the close frame and close, under the write lock, once."""
        with wrapper.lock:
            if wrapper.closed:
                return
            wrapper.closed = True
            wrapper.held.clear()
            try:
                wrapper.conn.close(code, reason)
            except Exception as exc:
                # The connection is gone either way; closing is best effort.
                logger.debug("close failed user_id=%s error=%r", wrapper.user_id, exc)
