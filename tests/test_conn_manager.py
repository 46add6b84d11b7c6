"""ConnManager on its own: fake connections that record frames, real threads."""

import threading

import pytest

from imserver.conn_manager import ConnManager
from imserver.conn_manager import ConnWrapper


class FakeConn:
    """A connection that records frames and detects overlapping writes."""

    def __init__(self, fail=False):
        self.frames = []
        self.closed = None
        self.fail = fail
        self._writing = False
        self.overlaps = 0
        self.pings = 0

    def send(self, data):
        if self.fail:
            raise ConnectionError("broken pipe")
        if self._writing:
            self.overlaps += 1
        self._writing = True
        # Give another thread every chance to enter while "writing".
        for _ in range(50):
            pass
        self.frames.append(data)
        self._writing = False

    def close(self, code, reason):
        self.closed = (code, reason)


def test_set_conn_registers_and_count_counts():
    """set_conn makes a user online and count counts users."""
    conns = ConnManager()
    assert conns.count() == 0
    conns.set_conn(1, FakeConn())
    conns.set_conn(2, FakeConn())
    assert conns.count() == 2
    assert conns.is_online(1) and not conns.is_online(3)


def test_send_message_tells_not_connected_apart_from_write_failed():
    """send_message answers (False, None) offline, (True, error) on a failed write."""
    conns = ConnManager()
    good, bad = FakeConn(), FakeConn(fail=True)
    conns.set_conn(1, good)
    conns.set_conn(2, bad)
    assert conns.send_message(3, "x") == (False, None)
    assert conns.send_message(1, "hello") == (True, None)
    assert good.frames == ["hello"]
    connected, error = conns.send_message(2, "x")
    assert connected is True and isinstance(error, ConnectionError)
    # A connection whose write failed is closed and forgotten.
    assert not conns.is_online(2)
    assert bad.closed == (1011, "write failed")


def test_close_and_delete_conn_sends_close_then_forgets():
    """close_and_delete_conn closes with the code given and removes the user."""
    conns = ConnManager()
    conn = FakeConn()
    conns.set_conn(1, conn)
    assert conns.close_and_delete_conn(1) is True
    assert conn.closed == (1000, "")
    assert conns.count() == 0
    assert conns.close_and_delete_conn(1) is False
    assert conns.send_message(1, "x") == (False, None)


def test_new_connection_replaces_old_with_4001():
    """A second connection for a user closes the first with 4001 replaced."""
    conns = ConnManager()
    old, new = FakeConn(), FakeConn()
    conns.set_conn(1, old)
    conns.set_conn(1, new)
    assert old.closed == (4001, "replaced")
    assert new.closed is None
    assert conns.count() == 1
    conns.send_message(1, "to new")
    assert new.frames == ["to new"] and old.frames == []


def test_old_handler_cleanup_leaves_new_connection_alone():
    """The replaced handler's close_and_delete_conn(expected=old) keeps the new one."""
    conns = ConnManager()
    old_wrapper = conns.set_conn(1, FakeConn())
    new_conn = FakeConn()
    conns.set_conn(1, new_conn)
    assert conns.close_and_delete_conn(1, expected=old_wrapper) is False
    assert conns.is_online(1)
    assert new_conn.closed is None
    assert conns.send_message(1, "still here") == (True, None)


def test_replace_racing_cleanup_never_loses_the_newest():
    """Many connections replacing each other while old handlers clean up keep the last."""
    conns = ConnManager()
    rounds = 200
    wrappers = []
    lock = threading.Lock()
    start = threading.Barrier(2)

    def connect():
        start.wait()
        for _ in range(rounds):
            w = conns.set_conn(7, FakeConn())
            with lock:
                wrappers.append(w)

    def cleanup():
        start.wait()
        done = 0
        while done < rounds:
            with lock:
                batch = wrappers[done:]
            for w in batch[:-1] if len(batch) > 1 else []:
                conns.close_and_delete_conn(7, expected=w)
                done += 1
            if len(batch) <= 1 and done >= rounds - 1:
                break

    threads = [threading.Thread(target=connect), threading.Thread(target=cleanup)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    last = wrappers[-1]
    # The newest connection is the one registered and it was never closed.
    assert conns._get_wrapper(7) is last
    assert last.conn.closed is None
    # Every older one was closed (replaced or cleaned up).
    assert all(w.conn.closed is not None for w in wrappers[:-1])


def test_many_threads_sending_to_one_connection_never_overlap():
    """Writes to one connection from many threads are serialized by its lock."""
    conns = ConnManager()
    conn = FakeConn()
    conns.set_conn(1, conn)
    threads_n, per_thread = 16, 200
    start = threading.Barrier(threads_n)

    def sender(k):
        start.wait()
        for i in range(per_thread):
            assert conns.send_message(1, f"{k}:{i}") == (True, None)

    threads = [threading.Thread(target=sender, args=(k,)) for k in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert conn.overlaps == 0
    assert len(conn.frames) == threads_n * per_thread
    # Each thread's own frames stay in the order it sent them.
    for k in range(threads_n):
        mine = [f for f in conn.frames if f.startswith(f"{k}:")]
        assert mine == [f"{k}:{i}" for i in range(per_thread)]


def test_send_entry_writes_in_seq_order_and_drops_repeats():
    """Entries ahead of a gap are held, written once the gap fills, repeats dropped."""
    conns = ConnManager()
    conn = FakeConn()
    wrapper = conns.set_conn(1, conn, last_seq=3)
    conns.send_entry(1, 3, "three")  # at the cursor: already acknowledged
    conns.send_entry(1, 6, "six")
    conns.send_entry(1, 5, "five")
    assert conn.frames == [] and wrapper.has_gap()
    conns.send_entry(1, 4, "four")
    assert conn.frames == ["four", "five", "six"]
    assert wrapper.last_seq == 6 and not wrapper.has_gap()
    conns.send_entry(1, 5, "five again")
    conns.send_entry(1, 7, "seven")
    assert conn.frames == ["four", "five", "six", "seven"]


def test_many_threads_delivering_entries_keep_seq_order():
    """Entries delivered from many threads in any order arrive dense and in order."""
    conns = ConnManager()
    conn = FakeConn()
    conns.set_conn(1, conn)
    total, threads_n = 2000, 8
    start = threading.Barrier(threads_n)

    def deliver(k):
        start.wait()
        for seq in range(total - k, 0, -threads_n):
            conns.send_entry(1, seq, str(seq))

    threads = [threading.Thread(target=deliver, args=(k,)) for k in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert conn.frames == [str(s) for s in range(1, total + 1)]


def test_send_many_reaches_connected_users_past_a_broken_one():
    """send_many skips offline users, survives a broken member and says who was connected."""
    conns = ConnManager()
    a, broken, c = FakeConn(), FakeConn(fail=True), FakeConn()
    conns.set_conn(1, a)
    conns.set_conn(2, broken)
    conns.set_conn(3, c)
    connected = conns.send_many([1, 2, 3, 4], "hello all")
    assert connected == {1, 2, 3}
    assert a.frames == ["hello all"] and c.frames == ["hello all"]
    assert not conns.is_online(2) and conns.is_online(1) and conns.is_online(3)


def test_send_entries_gives_each_member_its_own_seq():
    """send_entries writes each member's own entry and reports who was online."""
    conns = ConnManager()
    a, b = FakeConn(), FakeConn()
    conns.set_conn(1, a, last_seq=4)
    conns.set_conn(2, b)
    connected = conns.send_entries([(1, 5, "m@5"), (2, 1, "m@1"), (3, 9, "m@9")])
    assert connected == {1, 2}
    assert a.frames == ["m@5"] and b.frames == ["m@1"]


def test_close_all_closes_every_connection_with_1001():
    """close_all empties the map and closes each connection with the code given."""
    conns = ConnManager()
    fakes = [FakeConn() for _ in range(5)]
    for i, conn in enumerate(fakes, 1):
        conns.set_conn(i, conn)
    assert conns.close_all(1001, "server shutting down") == 5
    assert conns.count() == 0
    assert all(conn.closed == (1001, "server shutting down") for conn in fakes)


def test_closed_wrapper_refuses_writes():
    """A wrapper closed by another thread raises on send instead of writing."""
    conns = ConnManager()
    conn = FakeConn()
    wrapper = conns.set_conn(1, conn)
    conns.close_and_delete_conn(1)
    with pytest.raises(ConnectionError):
        wrapper.send("late")
    assert conn.frames == []


def test_close_is_written_once():
    """Closing a connection twice writes one close."""
    calls = []

    class Counting(FakeConn):
        def close(self, code, reason):
            calls.append(code)

    wrapper = ConnWrapper(1, Counting())
    ConnManager._close_wrapper(wrapper, 1000, "")
    ConnManager._close_wrapper(wrapper, 4001, "replaced")
    assert calls == [1000]
