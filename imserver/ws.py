"""The WebSocket endpoint ``/ws``: one thread per connection.

The Go article runs one goroutine per connection that reads the client's
frames; flask-sock runs our handler in one server thread per connection
(gunicorn's gthread pool, or werkzeug's thread). simple-websocket would add
a second thread per connection, its reader, and hand every frame from it to
the handler: two threads per connection and a thread switch per frame, the
wall that thread-per-connection servers hit with thousands of clients. So
``InlineReader`` (simple-websocket's ``thread_class`` option) never starts
that thread, and the handler reads its own socket, like the goroutine:
``_frames`` feeds the bytes to simple-websocket's protocol code and yields
each complete text or binary frame, while pings, pongs and close frames are
answered there as before.

The life of a connection:

1. ``before_request`` (before the upgrade): check the token, else answer 401
   and never upgrade; put a ``BufferedSocket`` in place of the raw socket so
   that every write (of any thread, simple-websocket's pongs and close
   replies included) is queued whole, in order, and never blocks.
2. The handler sends ``ready``, registers the connection in the
   ``ConnManager`` at the user's acked cursor (a previous connection of the
   user is closed with 4001 ``replaced``), and replays every inbox entry
   above the cursor from the database. Live entries committed meanwhile are
   held by the connection's wrapper and written right after the replayed
   ones: no gap, no reordering, nothing twice.
3. It reads frames from its socket: ``send`` is queued to the writer and
   answered ``sent`` after the commit; ``ack`` moves the cursor; ``ping`` is
   answered ``pong``; anything else gets an ``error`` frame, and the
   connection stays open.
4. However it ends, the handler removes its own wrapper from the
   ``ConnManager``, never a newer connection of the same user.

This is the only module that imports flask_sock or simple_websocket.
"""

import logging
import time

from flask import Blueprint
from flask import g
from flask import request
from flask_sock import Sock
from simple_websocket import ConnectionClosed
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection

from imserver import delivery
from imserver.auth import authenticate
from imserver.errors import BadFrame
from imserver.errors import ImError
from imserver.errors import Unavailable
from imserver.hub import current_hub
from imserver.protocol import PONG
from imserver.protocol import Ack
from imserver.protocol import Ping
from imserver.protocol import Send
from imserver.protocol import encode_error
from imserver.protocol import encode_ready
from imserver.protocol import encode_sent
from imserver.protocol import parse_frame
from imserver.transport import BufferedSocket
from imserver.transport import SlowReceiver
from imserver.transport import PING_FRAME
from imserver.transport import close_frame
from imserver.transport import text_frame

logger = logging.getLogger(__name__)

bp = Blueprint("ws", __name__)
sock = Sock()

# The error codes the contract allows on the socket; any other failure is
# answered ``internal``.
SOCKET_CODES = frozenset({"bad_json", "bad_frame", "unknown_type", "not_found",
                          "forbidden", "body_too_long", "rate_limited", "internal"})

# Bytes read from the socket at once at most (``BufferedSocket.recv`` blocks
# on a small read, so idle connections do not hold a buffer this size).
RECEIVE_BYTES = 8192

# The WSGI environ keys under which servers hand over the client's socket.
_SOCKET_KEYS = ("gunicorn.socket", "werkzeug.socket")


class InlineReader:
    """A ``thread_class`` for simple-websocket that starts no thread.

    simple-websocket builds ``thread_class(target=...)`` and starts it to
    read the socket; our handler thread reads it instead (``_frames``).
    """

    def __init__(self, target=None, **kwargs) -> None:
        self.name = "imserver-inline-reader"

    def start(self) -> None:
        """Start nothing: the handler thread is the reader."""


class NoEvent:
    """simple-websocket's ``event_class``: a ``threading.Event`` nobody waits on.

    simple-websocket sets its event for ``receive()``; our handler reads its
    own socket and never calls ``receive()``, so each connection would hold
    an Event (a Condition, a lock, a deque: ~1 KB) for nothing.
    """

    __slots__ = ()

    def set(self) -> None:
        pass

    def clear(self) -> None:
        pass

    def is_set(self) -> bool:
        return False

    def wait(self, timeout=None) -> bool:
        return False


def _drop_handshake_state(ws) -> None:
    """Free what wsproto keeps of the HTTP handshake once the upgrade is done.

    ``WSConnection.handshake`` keeps its h11 connection, the upgrade request
    and a deque for as long as the WebSocket lives; only ``events()`` still
    reads the (empty) event queue.
    """
    handshake = getattr(ws.ws, "handshake", None)
    if ws.ws.connection is None or handshake is None or getattr(handshake, "_events", None):
        return
    for name, empty in (("_h11_connection", None), ("_initiating_request", None),
                        ("_events", ())):
        if hasattr(handshake, name):
            setattr(handshake, name, empty)


class FrameSplitter:
    """Decode the client's common frame here; pass everything else to wsproto.

    Nearly every frame a chat client sends is one whole text message in one
    frame: final, masked, no extension bits. wsproto spends about ten times
    as long on such a frame as it takes to unmask and decode it (50 against
    4 µs, measured here), on every ``send``, ``ack`` and ``ping``. So
    ``feed`` walks the frame headers of what was read and returns, in
    order, a ``str`` for each such frame, and ``bytes`` for everything else
    (control frames, fragments, binary, anything malformed, frames above
    ``max_bytes``), which the caller hands to wsproto byte for byte: wsproto
    sees whole frames of its own only, so it is always between frames when
    the next simple one comes, and it still checks, answers and closes
    everything it sees as before.

    What it holds between reads is bounded: a partial header, or a partial
    simple frame of at most ``max_bytes``; a larger frame is passed on as
    it arrives (``_left`` counts what is still to come).
    """

    __slots__ = ("max_bytes", "_held", "_left", "_fragmented")

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        # The start of a frame not decided yet (not given to wsproto): b"" or
        # a bytearray.
        self._held = b""
        self._left = 0  # bytes of the current frame still to pass to wsproto
        self._fragmented = False  # a fragmented message is open (in wsproto)

    def feed(self, data: bytes) -> list:
        """Return the ``str`` and ``bytes`` segments of ``data``, in order.

        A frame that comes a few bytes at a time is appended to, never
        copied whole again on each read (no quadratic work for a trickle).
        """
        if self._held:
            self._held += data
            buf = self._held
        else:
            buf = data
        out = []
        end = len(buf)
        i = 0
        while i < end:
            if self._left:
                take = min(self._left, end - i)
                _pass(out, bytes(buf[i:i + take]))
                self._left -= take
                i += take
                continue
            if end - i < 2:
                break
            b0, b1 = buf[i], buf[i + 1]
            length = b1 & 0x7F
            head = 2
            minimal = True
            if length == 126:
                if end - i < 4:
                    break
                length = int.from_bytes(buf[i + 2:i + 4], "big")
                head, minimal = 4, length >= 126
            elif length == 127:
                if end - i < 10:
                    break
                length = int.from_bytes(buf[i + 2:i + 10], "big")
                head, minimal = 10, 65536 <= length < 1 << 63
            masked = b1 & 0x80
            if masked:
                head += 4
            if end - i < head:
                break
            total = head + length
            if (b0 == 0x81 and masked and minimal and not self._fragmented
                    and length <= self.max_bytes):
                if end - i < total:
                    break  # a simple frame, not all here yet: hold it
                text = _unmask_text(buf[i + head - 4:i + head], buf[i + head:i + total])
                if text is not None:
                    out.append(text)
                    i += total
                    continue
            # Anything else is wsproto's, whole.
            opcode = b0 & 0x0F
            if opcode in (0x1, 0x2) and not b0 & 0x80:
                self._fragmented = True
            elif opcode == 0x0 and b0 & 0x80:
                self._fragmented = False
            self._left = total
        if i == end:
            self._held = b""
        elif i or buf is not self._held:
            self._held = bytearray(buf[i:])
        return out


def _pass(out: list, data: bytes) -> None:
    """Append ``data`` for wsproto, merged with the segment before if bytes."""
    if out and isinstance(out[-1], bytes):
        out[-1] += data
    else:
        out.append(data)


def _unmask_text(mask: bytes, payload: bytes):
    """Unmask ``payload`` (RFC 6455 5.3) and decode it; None if not UTF-8."""
    n = len(payload)
    if n:
        key = int.from_bytes((mask * (n // 4 + 1))[:n], "little")
        payload = (int.from_bytes(payload, "little") ^ key).to_bytes(n, "little")
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError:
        return None  # wsproto fails the connection with 1007


# wsproto's states in which the server closed and the client has not: the
# handler waits for the client's close reply (``_await_close_reply``).
_WE_CLOSED = (ConnectionState.OPEN, ConnectionState.LOCAL_CLOSING)


def _frames(ws, bsock: "BufferedSocket", splitter: FrameSplitter | None = None):
    """Yield each text or binary frame the client sends, in the calling thread.

    ``splitter`` decodes the common frames here (see ``FrameSplitter``);
    whatever else arrives goes to simple-websocket's protocol code
    (``_handle_events``), which answers pings and close frames and enforces
    ``max_message_size`` (1009); the messages it completes land in
    ``input_buffer``, which this drains, in order with the others. Ends when
    the connection closes, from either side. A close by another thread
    (replace, kick, heartbeat, shutdown) writes the close frame and ends the
    sending side; the frames still read are dropped, and after the loop
    ``_await_close_reply`` reads on until the client answers it. wsproto
    never saw a close of ours written directly (its state stays ``OPEN``)
    and has sent one when it is ``LOCAL_CLOSING`` (1009); after the client's
    own close it is ``REMOTE_CLOSING`` or ``CLOSED``: nothing to wait for.
    """
    rest = ()
    while ws.connected:
        try:
            data = bsock.recv(RECEIVE_BYTES)
        except OSError:
            data = b""
        if not data:
            ws.connected = False
            return
        segments = splitter.feed(data) if splitter is not None else (data,)
        for i, segment in enumerate(segments):
            if not ws.connected:
                rest = segments[i:]  # after our close only the reply counts
                break
            if isinstance(segment, str):
                yield segment
                continue
            ws.ws.receive_data(segment)
            keep_going = ws._handle_events()
            # Another thread may have closed the connection meanwhile: keep that.
            ws.connected = keep_going and ws.connected
            while ws.input_buffer:
                yield ws.input_buffer.pop(0)
    if ws.ws.state in _WE_CLOSED:
        # Our close (another thread's, or simple-websocket's 1009): the
        # closing handshake, bounded by the flusher.
        bsock.shutdown_after_flush()
        _await_close_reply(ws, bsock, splitter, rest)


def _await_close_reply(ws, bsock: "BufferedSocket", splitter: FrameSplitter | None,
                       segments=()) -> None:
    """After the server's close frame: drop what comes until the client's reply.

    The closing handshake (RFC 6455 7.1): the client answers a close frame
    with its own, and the server ends the connection after that. Reading
    until then keeps the kernel from answering a frame still on its way
    with a reset (then the client could miss the close frame and its
    code). Ends at the reply, at the end of the stream, on any error, or
    when the flusher shuts the reading side (``transport.CLOSE_WAIT``).
    ``segments`` are those of the last read that came after the close.
    """
    while True:
        for segment in segments:
            if isinstance(segment, str):
                continue  # a message sent before the client saw the close
            try:
                ws.ws.receive_data(segment)
                for event in ws.ws.events():
                    if isinstance(event, CloseConnection):
                        return
            except Exception:
                return  # wsproto refuses the stream: no reply to wait for
        try:
            data = bsock.recv(RECEIVE_BYTES)
        except OSError:
            return
        if not data:
            return
        segments = splitter.feed(data) if splitter is not None else (data,)


class Session:
    """One WebSocket as the ``ConnManager`` sees it: ``send``, ``close``, ``ping``.

    The ``ConnManager`` wrapper's lock serializes calls to ``send``,
    ``close`` and ``ping``; the handler thread writes its pongs and close
    replies through the same ``BufferedSocket``, which keeps every frame
    whole. Frames written by other threads are built here, never by wsproto,
    whose state only the handler thread touches.
    """

    __slots__ = ("ws", "bsock", "_frame_directly", "token")

    def __init__(self, ws, bsock: BufferedSocket, token: str,
                 extensions: bool = False) -> None:
        self.ws = ws
        self.bsock = bsock
        # Without extensions (permessage-deflate), frames are built here
        # directly instead of by wsproto: the same bytes, a fraction of the work.
        self._frame_directly = not extensions
        # Names this connection across processes (presence, replace).
        self.token = token

    def send(self, text: str) -> None:
        """Queue one text frame; raise ``ConnectionClosed`` once closed."""
        if not self._frame_directly:
            self.ws.send(text)
            return
        if not self.ws.connected:
            raise ConnectionClosed(self.ws.close_reason, self.ws.close_message)
        self.bsock.send(text_frame(text.encode()))

    def ping(self) -> None:
        """Queue a WebSocket ping; the client's pong counts as activity."""
        if not self.ws.connected:
            raise ConnectionClosed(self.ws.close_reason, self.ws.close_message)
        self.bsock.send(PING_FRAME)

    def close(self, code: int, reason: str) -> None:
        """Write a close frame, then shut the socket down once it is written.

        Go: ``WriteMessage(CloseMessage, ...)`` then ``conn.Close()``. The
        handler thread, reading, sees the end of the stream and finishes.
        """
        if self.ws.connected:
            self.ws.connected = False
            try:
                self.bsock.send(close_frame(code, reason))
            except OSError:
                pass
        self.bsock.shutdown_after_flush()

    def idle_for(self) -> float:
        """Return seconds since the client last sent anything."""
        return time.monotonic() - self.bsock.last_recv

    def wait_drained(self, below: int, timeout: float) -> bool:
        """Wait until the client has read all but ``below`` queued bytes."""
        return self.bsock.wait_drained(below, timeout)


@bp.before_request
def check_token_before_upgrade():
    """Refuse a bad token with 401, or a full server with 503, before the upgrade."""
    user_id = authenticate()
    hub = current_hub()
    if hub.open_connections >= hub.config["MAX_CONNECTIONS"]:
        logger.warning("refused connection user_id=%s: %d open", user_id,
                       hub.open_connections)
        raise Unavailable("too many connections, try again later")
    # Counted from here until the request ends (teardown below), upgrade or not.
    hub.connection_opened()
    g.counted = True
    environ = request.environ
    if not hub.config["WS_COMPRESSION"]:
        # simple-websocket accepts permessage-deflate whenever it is offered;
        # without the offer in the handshake it is not negotiated.
        environ.pop("HTTP_SEC_WEBSOCKET_EXTENSIONS", None)
    for key in _SOCKET_KEYS:
        raw = environ.get(key)
        if raw is not None:
            bsock = BufferedSocket(raw, hub.flusher, hub.config["SEND_TIMEOUT"],
                                   hub.config["MAX_OUTBUF_BYTES"])
            if hub.config["SOCKET_SEND_BUFFER"]:
                bsock.set_send_buffer(hub.config["SOCKET_SEND_BUFFER"])
            environ[key] = bsock
            g.bsock = bsock
            break
    g.user_id = user_id


@sock.route("/ws", bp=bp)
def websocket(ws):
    """Serve one user's WebSocket until it closes."""
    _serve(current_hub(), ws, g.user_id)


@bp.teardown_request
def uncount_connection(exc):
    """Release the connection's place, however the request ended."""
    if g.pop("counted", False):
        current_hub().connection_closed()


def _serve(hub, ws, user_id: int) -> None:
    """Run one connection: ready, register, replay, then answer frames."""
    _drop_handshake_state(ws)
    session = Session(ws, g.bsock, hub.new_token(),
                      extensions=bool(hub.config["WS_COMPRESSION"]))
    logger.info("connected user_id=%s peer=%s", user_id, g.bsock.peer)
    acked, _ = hub.store.cursor(user_id)
    # Present in other workers first (and replace the user's connection
    # there); what they publish before the line below is replayed anyway.
    hub.broker.register(user_id, session.token)
    # Present here, with ``ready`` written before anything else can be: the
    # first frame the client gets. A connection of this user here is closed
    # with 4001 replaced.
    try:
        wrapper = hub.conns.set_conn(user_id, session, last_seq=acked,
                                     first_frame=encode_ready(user_id))
    except ConnectionError as exc:
        # The client left before its first frame: nothing was registered.
        hub.broker.unregister(user_id, session.token)
        session.bsock.close()
        logger.info("disconnected user_id=%s reason=gone before ready (%s)", user_id,
                    exc.__class__.__name__)
        return
    reason = "closed by client"
    try:
        # Offline: everything above the cursor, then the held live entries.
        hub.catch_up(wrapper)
        max_body = hub.config["MAX_BODY_CHARS"]
        # Go: the goroutine's read loop. A client sending faster than this
        # loop serves it is simply not read meanwhile (TCP backpressure).
        # With permessage-deflate allowed, every frame is wsproto's.
        splitter = None if hub.config["WS_COMPRESSION"] else FrameSplitter(
            hub.config["MAX_FRAME_BYTES"] or 65536)
        for text in _frames(ws, session.bsock, splitter):
            _handle(hub, wrapper, user_id, text, max_body)
        reason = f"closed code={ws.close_reason}"
    except ConnectionClosed:
        reason = f"closed code={ws.close_reason}"
    except ConnectionError as exc:
        reason = f"connection lost ({exc.__class__.__name__}: {exc})"
    except Exception:
        logger.exception("connection handler failed user_id=%s", user_id)
        reason = "handler failed"
        hub.conns.close_and_delete_conn(user_id, 1011, "internal error", expected=wrapper)
    finally:
        # Removes this connection only: never the one that replaced it.
        hub.conns.close_and_delete_conn(user_id, expected=wrapper)
        hub.broker.unregister(user_id, session.token)
        # Let the close frame go out and the socket shut down before the
        # server takes the socket back (werkzeug writes a response on it).
        session.wait_drained(1, hub.config["SEND_TIMEOUT"])
        session.bsock.close()
        hub.metrics.closed.inc()
        if isinstance(session.bsock.error, SlowReceiver):
            logger.warning("closed slow receiver user_id=%s reason=%s", user_id,
                           session.bsock.error)
        else:
            logger.info("disconnected user_id=%s reason=%s", user_id, reason)


def _handle(hub, wrapper, user_id: int, text, max_body: int) -> None:
    """Answer one frame from the client."""
    try:
        frame = parse_frame(text, max_body)
        if isinstance(frame, Send):
            _send(hub, wrapper, user_id, frame)
        elif isinstance(frame, Ack):
            if frame.seq > wrapper.last_seq:
                error = BadFrame(f"ack of seq {frame.seq} beyond the last entry sent")
                error.cid = frame.cid  # the contract: cid where the frame had one
                raise error
            hub.store.ack(user_id, frame.seq)
        elif isinstance(frame, Ping):
            wrapper.send(PONG)
    except ImError as error:
        # Only the contract's socket codes go on the wire; anything else (the
        # database unavailable) is "internal", and the connection stays open.
        code = error.code if error.code in SOCKET_CODES else "internal"
        hub.metrics.refused.labels(code).inc()
        logger.info("refused frame user_id=%s code=%s", user_id, error.code)
        wrapper.send(encode_error(code, error.message, getattr(error, "cid", None)))


def _send(hub, wrapper, user_id: int, frame: Send) -> None:
    """Queue a message; ``sent`` (or ``error``) follows after the commit."""
    started = time.monotonic()
    cid = frame.cid

    def answer(pending):
        # Runs in the writer thread right after the commit.
        try:
            error = pending.exception()
            if error is None:
                message = pending.result().message
                wrapper.send(encode_sent(cid, message["id"], message["ts"]))
                hub.metrics.send_latencies.add(time.monotonic() - started)
            elif isinstance(error, ImError) and error.code in SOCKET_CODES:
                wrapper.send(encode_error(error.code, error.message, cid))
            else:
                # The store failed (e.g. the database is unreachable): nothing
                # was stored; the client may retry with the same cid.
                wrapper.send(encode_error("internal", "not stored, try again", cid))
        except Exception as exc:
            # The sender's connection is gone; the message is stored anyway.
            logger.debug("answer not sent user_id=%s: %r", user_id, exc)

    try:
        delivery.submit(hub, user_id, frame.body, cid, to=frame.to, group=frame.group,
                        callback=answer)
    except ImError as error:
        error.cid = cid
        raise


def init_app(app) -> None:
    """Register the WebSocket blueprint and flask-sock's options."""
    app.config.setdefault("SOCK_SERVER_OPTIONS", {})
    # simple-websocket closes with 1009 past this size itself.
    app.config["SOCK_SERVER_OPTIONS"]["max_message_size"] = app.config["MAX_FRAME_BYTES"]
    # The handler thread reads its own socket: no second thread per connection.
    app.config["SOCK_SERVER_OPTIONS"]["thread_class"] = InlineReader
    # ... and never waits in ``receive()``: no Event per connection.
    app.config["SOCK_SERVER_OPTIONS"]["event_class"] = NoEvent
    sock.init_app(app)
    app.register_blueprint(bp)
