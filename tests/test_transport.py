"""BufferedSocket and Flusher over real connected sockets."""

import socket
import threading
import time

import pytest
from conftest import T
from conftest import wait_until

from imserver.transport import BufferedSocket
from imserver.transport import Flusher


@pytest.fixture
def flusher():
    f = Flusher()
    yield f
    f.stop()


@pytest.fixture
def pair():
    """A connected TCP pair (server side, client side) with small buffers."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    # A small send buffer makes our own buffer fill quickly. (Tiny receive
    # buffers would make the kernel's window probes, not our code, the pace.)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    yield server, client
    for s in (server, client):
        try:
            s.close()
        except OSError:
            pass


def read_exactly(sock, n, timeout=T):
    sock.settimeout(timeout)
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def test_send_never_blocks_on_a_client_that_does_not_read(pair, flusher):
    """Writes far past the kernel buffers return at once; the bytes are queued."""
    server, client = pair
    bsock = BufferedSocket(server, flusher, send_timeout=60, max_outbuf=10_000_000)
    frame = b"x" * 100_000
    started = time.monotonic()
    for _ in range(20):
        assert bsock.send(frame) == len(frame)
    assert time.monotonic() - started < T
    assert bsock.queued() > 0
    # Once the client reads, the flusher delivers everything, in order.
    assert read_exactly(client, 20 * len(frame)) == frame * 20
    wait_until(lambda: bsock.queued() == 0, message="buffer drained")


def test_frames_from_many_threads_never_interleave(pair, flusher):
    """Whole frames from concurrent writers arrive whole and each writer's in order."""
    server, client = pair
    bsock = BufferedSocket(server, flusher, send_timeout=60, max_outbuf=50_000_000)
    writers, per_writer, size = 6, 200, 997
    received = bytearray()
    reader_done = threading.Event()

    def reader():
        client.settimeout(T)
        total = writers * per_writer * size
        while len(received) < total:
            chunk = client.recv(65536)
            if not chunk:
                break
            received.extend(chunk)
        reader_done.set()

    def writer(k):
        for i in range(per_writer):
            tag = f"{k:02d}{i:05d}".encode()
            bsock.send(tag + bytes([65 + k]) * (size - len(tag)))

    reading = threading.Thread(target=reader)
    reading.start()
    threads = [threading.Thread(target=writer, args=(k,)) for k in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(T * 4)
    assert reader_done.wait(T * 4)
    reading.join(T)
    frames = [bytes(received[i:i + size]) for i in range(0, len(received), size)]
    assert len(frames) == writers * per_writer
    seen = {k: [] for k in range(writers)}
    for frame in frames:
        k, i = int(frame[:2]), int(frame[2:7])
        assert frame[7:] == bytes([65 + k]) * (size - 7), "a frame was cut by another"
        seen[k].append(i)
    assert all(seen[k] == list(range(per_writer)) for k in range(writers))


def test_stuck_client_is_aborted_after_send_timeout(pair, flusher):
    """A client that never reads is reset after send_timeout; later sends raise."""
    server, client = pair
    bsock = BufferedSocket(server, flusher, send_timeout=0.3, max_outbuf=10_000_000)
    bsock.send(b"y" * 1_000_000)
    assert bsock.queued() > 0
    wait_until(lambda: bsock.queued() == 0 and bsock._error is not None,
               message="abort after send timeout")
    with pytest.raises(ConnectionError):
        bsock.send(b"more")


def test_outgoing_buffer_is_bounded(pair, flusher):
    """Queueing past max_outbuf aborts the connection instead of growing."""
    server, client = pair
    bsock = BufferedSocket(server, flusher, send_timeout=60, max_outbuf=200_000)
    with pytest.raises(ConnectionError):
        for _ in range(100):
            bsock.send(b"z" * 50_000)
    assert bsock.queued() == 0


def test_aborted_connection_never_shows_a_cut_frame_then_a_clean_end(pair, flusher):
    """After an abort the client sees a reset, not a truncated stream ending cleanly."""
    server, client = pair
    bsock = BufferedSocket(server, flusher, send_timeout=0.2, max_outbuf=10_000_000)
    bsock.send(b"F" * 2_000_000)
    wait_until(lambda: bsock._error is not None, message="abort")
    bsock.close()
    client.settimeout(T)
    got = 0
    with pytest.raises(ConnectionResetError):
        while True:
            chunk = client.recv(65536)
            assert chunk, "clean end of stream after a cut frame"
            got += len(chunk)
    assert got < 2_000_000


def test_shutdown_after_flush_delivers_queued_bytes_then_eof(pair, flusher):
    """shutdown_after_flush writes what is queued, then ends the stream."""
    server, client = pair
    bsock = BufferedSocket(server, flusher, send_timeout=60, max_outbuf=10_000_000)
    payload = b"q" * 300_000
    bsock.send(payload)
    bsock.shutdown_after_flush()
    assert read_exactly(client, len(payload)) == payload
    client.settimeout(T)
    assert client.recv(10) == b""


def test_recv_records_activity(pair, flusher):
    """Every recv moves last_recv, for the heartbeat."""
    server, client = pair
    bsock = BufferedSocket(server, flusher, send_timeout=60, max_outbuf=1000)
    before = bsock.last_recv
    client.sendall(b"ping")
    server.settimeout(T)
    assert bsock.recv(10) == b"ping"
    assert bsock.last_recv > before


def test_wait_drained_waits_for_the_client_to_read(pair, flusher):
    """wait_drained returns once the client has read enough, False on timeout."""
    server, client = pair
    bsock = BufferedSocket(server, flusher, send_timeout=60, max_outbuf=10_000_000)
    bsock.send(b"d" * 1_000_000)
    assert bsock.wait_drained(1, 0.05) is False
    reader = threading.Thread(target=read_exactly, args=(client, 1_000_000))
    reader.start()
    assert bsock.wait_drained(1, T) is True
    reader.join(T)


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 200_000])
def test_text_frame_matches_wsproto(size):
    """text_frame builds the same bytes as wsproto for a server text frame."""
    from wsproto.frame_protocol import FrameProtocol

    from imserver.transport import text_frame

    text = "é" * (size // 2) + "a" * (size % 2)
    proto = FrameProtocol(client=False, extensions=[])
    assert text_frame(text.encode()) == proto.send_data(text, fin=True)
