"""Socket writes that never block the writer and never interleave frames.

Many threads write one client's socket: its handler (``pong``, ``error``,
and simple-websocket's answers to pings and close frames), the writer
(``sent`` and inbox entries), the heartbeat (pings), whoever closes it.
simple-websocket writes with a bare ``sock.send``, ignores short writes
(simple-websocket issue #45), and blocks forever on a client that stopped
reading. ``BufferedSocket`` is put in place of the raw socket, so every
write of every thread goes through it:

- each ``send(data)`` appends ``data`` whole to one ordered outgoing buffer
  under a lock, so frames from different threads never interleave;
- it writes at once what the kernel takes (``MSG_DONTWAIT``) and leaves the
  rest to the ``Flusher``, one thread per process that writes every
  connection's leftovers when its socket becomes writable; the caller never
  waits for the client;
- inside ``Flusher.corked()`` (the writer, while it answers and delivers
  one committed batch) writes are only queued, and each connection touched
  is written once at the end: several frames in one system call;
- a connection whose oldest unsent byte waited ``send_timeout`` seconds, or
  whose buffer passed ``max_outbuf`` bytes, is *aborted*: its buffer is
  dropped and the connection reset, so a client never receives part of a
  frame followed by anything else. The memory one client can make us hold
  is bounded by ``max_outbuf``.

It also records when the client last sent anything (``last_recv``), pongs
included, for the heartbeat.

Imports: stdlib only.
"""

import collections
import contextlib
import errno
import logging
import selectors
import socket
import struct
import threading
import time

logger = logging.getLogger(__name__)


def text_frame(payload: bytes) -> bytes:
    """Frame ``payload`` as one unmasked, final WebSocket text frame (RFC 6455).

    What wsproto builds for a server without extensions, without its
    per-frame machinery: this runs once per frame written, the hottest path.
    """
    n = len(payload)
    if n < 126:
        header = bytes((0x81, n))
    elif n < 65536:
        header = struct.pack("!BBH", 0x81, 126, n)
    else:
        header = struct.pack("!BBQ", 0x81, 127, n)
    return header + payload


# A WebSocket ping with no payload, as the server sends it.
PING_FRAME = b"\x89\x00"


def close_frame(code: int, reason: str) -> bytes:
    """Frame a WebSocket close with ``code`` and ``reason`` (at most 123 bytes)."""
    payload = struct.pack("!H", code) + reason.encode()[:123]
    return bytes((0x88, len(payload))) + payload


# Per thread: the list of sockets written while corked, or no attribute.
_corked = threading.local()

# Bytes of the blocking read of ``BufferedSocket.recv``.
FIRST_READ = 1024

# Queued bytes past which a corked socket is written at once anyway: large
# frames keep flowing while a big batch is delivered.
CORK_BYTES = 64 * 1024

# Seconds the server waits for the client's close reply after its own close
# frame, reading meanwhile, before it stops reading (``shutdown_after_flush``).
CLOSE_WAIT = 2.0


class SlowReceiver(ConnectionError):
    """The client did not read its frames in time; the connection is aborted."""


class BufferedSocket:
    """A connected socket whose writes are queued, ordered and bounded.

    Presents the part of the socket interface simple-websocket uses:
    ``send``, ``recv``, ``close``, ``fileno``.
    """

    # One per connection: slots, not a dict per instance.
    __slots__ = ("_sock", "_flusher", "send_timeout", "max_outbuf", "_lock", "_out",
                 "_since", "_error", "_closing", "_close_when_flushed", "_shut",
                 "_half_closed", "_corked", "_drained", "last_recv", "peer")

    def __init__(self, sock: socket.socket, flusher: "Flusher", send_timeout: float,
                 max_outbuf: int) -> None:
        self._sock = sock
        self._flusher = flusher
        self.send_timeout = send_timeout
        self.max_outbuf = max_outbuf
        # Guards _out, _since, _error, _closing and every write to _sock.
        self._lock = threading.Lock()
        # Bytes accepted but not yet taken by the kernel, in order.
        self._out = bytearray()
        # Monotonic time since which _out has been non-empty.
        self._since: float | None = None
        # Set once the connection failed; every later send raises it.
        self._error: Exception | None = None
        # Shut the socket down once _out is empty (after a close frame), and
        # close it too when the reader asked for that meanwhile.
        self._closing = False
        self._close_when_flushed = False
        # The socket was shut down (FIN or RST sent, reader woken).
        self._shut = False
        # Only the sending side was shut (FIN after the server's close
        # frame); the handler reads on until the client's close reply.
        self._half_closed = False
        # In a corked thread's list: written when that thread uncorks.
        self._corked = False
        # Signalled whenever _out shrinks, made by the first wait_drained
        # (a Condition is ~1 KB, and most connections never wait).
        self._drained: threading.Condition | None = None
        self.last_recv = time.monotonic()
        self.peer = _peer(sock)

    # -- the socket interface ---------------------------------------------

    def fileno(self) -> int:
        return self._sock.fileno()

    def recv(self, size: int) -> bytes:
        """Receive up to ``size`` bytes; note the time, for the heartbeat.

        A blocked ``recv(n)`` holds an ``n``-byte buffer for as long as it
        waits, and an idle WebSocket waits for hours: so the blocking read
        asks for ``FIRST_READ`` bytes only (a chat frame fits), and only
        when that much came is the rest taken at once, without blocking.
        """
        data = self._sock.recv(min(size, FIRST_READ))
        if len(data) == FIRST_READ and size > FIRST_READ:
            try:
                data += self._sock.recv(size - FIRST_READ, socket.MSG_DONTWAIT)
            except OSError:
                pass  # nothing more now; a failure shows on the next read
        self.last_recv = time.monotonic()
        return data

    def send(self, data: bytes) -> int:
        """Queue ``data`` whole, write what fits now, never block.

        Returns ``len(data)``: the bytes are the connection's from here on.
        Raises the connection's error once it has failed.
        """
        corked = getattr(_corked, "sockets", None)
        with self._lock:
            if self._error is not None:
                raise self._error
            if self._out or corked is not None:
                # Older bytes wait (append after them to keep the order), or
                # this thread is corked (written once when it uncorks).
                if len(self._out) + len(data) > self.max_outbuf:
                    raise self._overflow()
                if not self._out:
                    self._since = time.monotonic()
                    self._corked = True
                    corked.append(self)
                self._out += data
                if self._corked and len(self._out) >= CORK_BYTES:
                    self._write_queued()
                return len(data)
            try:
                sent = self._sock.send(data, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._abort(exc)
                raise
            if sent < len(data):
                if len(data) - sent > self.max_outbuf:
                    raise self._overflow()
                self._out += memoryview(data)[sent:]
                self._since = time.monotonic()
                self._flusher.watch(self)
            return len(data)

    def close(self) -> None:
        """Close the socket once what is queued is written.

        The handler calls this last, often right after a close frame was
        queued (a reply, or 1009): that frame still goes out first.
        """
        with self._lock:
            if self._out and self._error is None:
                self._closing = self._close_when_flushed = True
                return
            self._shutdown()
            self._notify_drained()
        self._flusher.forget(self)
        self._close_socket()

    def _close_socket(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass

    # -- what imserver adds -------------------------------------------------

    def set_send_buffer(self, size: int) -> None:
        """Cap the kernel's send buffer, so a stuck client is noticed early."""
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
        except OSError as exc:
            logger.debug("SO_SNDBUF not set: %r", exc)

    def shutdown_after_flush(self) -> None:
        """End the sending side once every queued byte is written.

        Go's ``conn.Close()`` after the close frame, as a closing handshake:
        the close frame may still wait in the buffer, so this waits for it
        (at most ``send_timeout``, then the connection is aborted); then
        FIN, and the reading side stays open for the client's close reply
        (``_half_closed``). Shutting the reading side at once would make the
        kernel answer any frame still on its way from the client with a
        reset, and a client whose next send fails on it reports 1006, not
        the server's code. The reading side is shut after ``CLOSE_WAIT``
        seconds (by the flusher), so a silent client's handler ends too.
        """
        with self._lock:
            if self._out and self._error is None:
                self._closing = True
                return
            self._half_close()

    def abort(self, reason: str = "aborted") -> None:
        """Drop what is queued and reset the connection now."""
        with self._lock:
            if self._error is None:
                self._abort(ConnectionError(reason))

    def wait_drained(self, below: int, timeout: float) -> bool:
        """Block until fewer than ``below`` bytes are queued; False on timeout.

        Only a connection's own handler calls this (while replaying a long
        inbox, so that the buffer does not grow past ``max_outbuf``).
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            if self._drained is None:
                self._drained = threading.Condition(self._lock)
            while len(self._out) >= below and self._error is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._drained.wait(remaining)
            return self._error is None

    @property
    def error(self) -> Exception | None:
        """Why the connection failed, or None while it works."""
        return self._error

    def queued(self) -> int:
        """Return the number of bytes waiting to be written."""
        return len(self._out)

    # -- called by the Flusher ----------------------------------------------

    def _uncork(self) -> None:
        """Write what was queued while corked; leave the rest to the flusher."""
        self._corked = False
        if not self._flush():
            self._flusher.watch(self)

    def _write_queued(self) -> bool:
        """Write once what the kernel takes now, without blocking; lock held.

        Returns whether it took anything; a failed write aborts the
        connection and raises.
        """
        try:
            sent = self._sock.send(self._out, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            self._abort(exc)
            raise
        if sent:
            del self._out[:sent]
            self._since = time.monotonic()
            self._notify_drained()
        return sent > 0

    def _flush(self) -> bool:
        """Write what the kernel takes now; return True when nothing is left."""
        done = self._flush_locked()
        if done and self._close_when_flushed:
            self._close_socket()
        return done

    def _flush_locked(self) -> bool:
        with self._lock:
            if self._error is not None:
                return True
            while self._out:
                try:
                    if not self._write_queued():
                        break
                except OSError:
                    return True  # aborted
            self._notify_drained()
            if self._out:
                return False
            self._since = None
            if self._closing:
                if self._close_when_flushed:
                    self._shutdown()
                else:
                    self._half_close()
            return True

    def _expired(self, now: float) -> bool:
        """Abort if the oldest queued byte waited past ``send_timeout``."""
        with self._lock:
            if self._since is not None and now - self._since >= self.send_timeout:
                logger.warning("slow receiver aborted peer=%s queued=%d", self.peer,
                               len(self._out))
                self._abort(SlowReceiver("send timeout"))
                self._flusher.slow_receiver(self)
                expired = True
            else:
                expired = self._error is not None
        if expired and self._close_when_flushed:
            self._close_socket()
        return expired

    # -- internals (lock held) ----------------------------------------------

    def _overflow(self) -> Exception:
        """Abort: the buffer would pass ``max_outbuf``; lock held. Return the error."""
        self._abort(SlowReceiver("outgoing buffer full"))
        self._flusher.slow_receiver(self)
        return self._error

    def _notify_drained(self) -> None:
        """Wake a wait_drained, if one ever waited; lock held."""
        if self._drained is not None:
            self._drained.notify_all()

    def _shutdown(self) -> None:
        """Send FIN after what the kernel holds and wake the reader; lock held.

        Idempotent. After it every send raises, and whatever the server
        writes on the raw socket later (werkzeug's response after the
        handler) fails instead of reaching the client.
        """
        assert self._lock.locked()
        if self._error is None:
            self._error = ConnectionError("closed")
        if not self._shut:
            self._shut = True
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _half_close(self) -> None:
        """Send FIN after what the kernel holds, keep reading; lock held.

        After it every send raises; the flusher shuts the reading side too
        after ``CLOSE_WAIT`` seconds, waking a reader still waiting.
        """
        assert self._lock.locked()
        if self._error is None:
            self._error = ConnectionError("closed")
        if self._shut or self._half_closed:
            return
        self._half_closed = True
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self._flusher.shut_read_later(self, time.monotonic() + CLOSE_WAIT)

    def _shut_read(self) -> None:
        """Shut the socket down (the flusher, ``CLOSE_WAIT`` after a half close)."""
        with self._lock:
            self._shutdown()

    def _abort(self, exc: Exception) -> None:
        """Fail the connection: drop the buffer, reset, wake the reader; lock held.

        SO_LINGER 0 makes the final close send RST and discard what the
        kernel still holds, so the client never sees a cut frame followed by
        a clean end of stream.
        """
        assert self._lock.locked()
        self._error = exc
        self._out.clear()
        self._since = None
        self._notify_drained()
        self._shut = True
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                  struct.pack("ii", 1, 0))
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _peer(sock: socket.socket) -> str:
    """Return ``host:port`` of the client, for logs."""
    try:
        host, port = sock.getpeername()[:2]
    except (OSError, ValueError):
        return "?"
    return f"{host}:{port}"


class Flusher:
    """One thread per process writing every connection's queued bytes.

    Connections are added by ``watch`` when a write leaves bytes behind and
    leave once their buffer is empty, so an idle or fast connection costs
    this thread nothing. It also aborts connections whose buffer waited past
    their ``send_timeout`` (slow receivers).
    """

    def __init__(self, on_slow_receiver=None) -> None:
        # Called (from any thread) each time a slow receiver is aborted.
        self.on_slow_receiver = on_slow_receiver
        self._selector = selectors.DefaultSelector()
        # Guards _watched and _pending (touched by writers and the thread).
        self._lock = threading.Lock()
        # Every BufferedSocket with bytes queued: registered or about to be.
        self._watched: set[BufferedSocket] = set()
        # Sockets to register with the selector (only the thread does).
        self._pending: list[BufferedSocket] = []
        # Half-closed sockets whose reading side is shut at a deadline, in
        # the order they came (one CLOSE_WAIT each): (deadline, socket).
        self._reads_to_shut: collections.deque = collections.deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="imserver-flusher",
                                        daemon=True)
        self._thread.start()

    def watch(self, bsock: BufferedSocket) -> None:
        """Have the thread write ``bsock``'s queued bytes when it can."""
        with self._lock:
            if bsock in self._watched:
                return
            self._watched.add(bsock)
            self._pending.append(bsock)
        self._wake()

    @contextlib.contextmanager
    def corked(self):
        """Queue this thread's writes, then write each socket once.

        The writer answers and delivers a whole committed batch inside this:
        a sender with ten messages in the batch gets its ten ``sent`` frames
        in one ``send`` call, a receiver its entries likewise. Frames keep
        their order: another thread writing the same socket meanwhile finds
        bytes queued and appends after them.
        """
        if getattr(_corked, "sockets", None) is not None:
            yield  # already corked: the outer block writes
            return
        sockets: list[BufferedSocket] = []
        _corked.sockets = sockets
        try:
            yield
        finally:
            _corked.sockets = None
            for bsock in sockets:
                try:
                    bsock._uncork()
                except Exception:
                    logger.exception("write after cork failed")

    def slow_receiver(self, bsock: BufferedSocket) -> None:
        """Count a slow receiver that was aborted."""
        if self.on_slow_receiver is not None:
            try:
                self.on_slow_receiver()
            except Exception:
                logger.exception("slow receiver callback failed")

    def forget(self, bsock: BufferedSocket) -> None:
        """Stop watching a socket that is being closed."""
        with self._lock:
            self._watched.discard(bsock)
        # A writer may have queued bytes between the last flush and the
        # discard above, and seen the socket still watched: look again.
        if bsock.queued() and bsock._error is None:
            self.watch(bsock)
        self._wake()

    def shut_read_later(self, bsock: BufferedSocket, deadline: float) -> None:
        """Shut ``bsock``'s reading side at ``deadline`` (monotonic), if still open."""
        with self._lock:
            self._reads_to_shut.append((deadline, bsock))

    def stop(self) -> None:
        """Stop the thread; shut every reading side still waiting for a reply."""
        if self._stopped:
            return
        self._stopped = True
        self._wake()
        self._thread.join(timeout=5)
        self._shut_reads(float("inf"))

    def _shut_reads(self, now: float) -> None:
        """Shut the reading sides whose deadline came."""
        # Read without the lock first: most steps have none waiting.
        while self._reads_to_shut:
            with self._lock:
                if not self._reads_to_shut or self._reads_to_shut[0][0] > now:
                    return
                _, bsock = self._reads_to_shut.popleft()
            bsock._shut_read()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # a wake-up byte is already pending, or we are stopping

    def _run(self) -> None:
        registered: dict[BufferedSocket, int] = {}
        while not self._stopped:
            try:
                self._step(registered)
            except Exception:
                logger.exception("flusher step failed")
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def _step(self, registered: dict) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
            watched = set(self._watched)
        # Forget closed sockets first: a new socket may reuse their fd.
        for bsock in [b for b in registered if b not in watched]:
            self._done(bsock, registered)
        for bsock in pending:
            if bsock in registered or bsock not in watched:
                continue
            try:
                fd = bsock.fileno()
                self._selector.register(fd, selectors.EVENT_WRITE, bsock)
                registered[bsock] = fd
            except (ValueError, OSError, KeyError):
                self._done(bsock, registered)
        events = self._selector.select(timeout=0.5)
        for key, _ in events:
            if key.data is None:
                try:
                    while self._wake_r.recv(4096):
                        pass
                except (BlockingIOError, OSError) as exc:
                    if getattr(exc, "errno", None) not in (None, errno.EAGAIN):
                        logger.debug("wake pipe: %r", exc)
                continue
            if key.data._flush():
                self._done(key.data, registered)
        now = time.monotonic()
        for bsock in list(registered):
            if bsock._expired(now):
                self._done(bsock, registered)
        self._shut_reads(now)

    def _done(self, bsock: BufferedSocket, registered: dict) -> None:
        fd = registered.pop(bsock, None)
        if fd is not None:
            try:
                self._selector.unregister(fd)
            except (KeyError, ValueError, OSError):
                pass
        with self._lock:
            self._watched.discard(bsock)
        # A writer may have queued bytes between the last flush and the
        # discard above, and seen the socket still watched: look again.
        if bsock.queued() and bsock._error is None:
            self.watch(bsock)
