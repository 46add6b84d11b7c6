"""The writer's batches: many messages written by a few statements, nothing changed.

Each test holds the writer on a gate so that the operations it queues meanwhile
share one batch (one transaction, one ``INSERT`` of all its messages), then
checks what a user relies on: ids and seqs in the order sent, a repeated cid
stored once, membership changes between messages taking effect where they
were queued. Each runs on a real SQLite file and on the machine's PostgreSQL.
"""

import json
import threading

import pytest

from imserver import db
from imserver import models
from imserver.errors import Forbidden
from imserver.store import Committer
from imserver.store import Store

from conftest import T
from conftest import wait_until


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    """A Store and its Committer on a fresh database; yields (store, delivered)."""
    if request.param == "sqlite":
        url = "sqlite:///" + str(tmp_path / "batch.sqlite3")
    else:
        url = request.getfixturevalue("pg_url")
    database = db.init_database(url)
    delivered = []
    committer = Committer(database, batch=512, on_commit=delivered.extend)
    st = Store(database, committer)
    yield st, delivered
    committer.stop()
    database.close()
    if hasattr(database, "close_all"):
        database.close_all()  # the pooled connections the reads used
    models.database.initialize(None)


def users(st, n):
    return [st.create_user(f"u{i}", "!")["id"] for i in range(n)]


class Gate:
    """Holds the writer until opened, so that what is queued shares one batch."""

    def __init__(self, st):
        self._open = threading.Event()
        self._held = threading.Event()
        st.committer.submit(self._hold)
        assert self._held.wait(T), "the writer never took the gate"

    def _hold(self, conn):
        self._held.set()
        self._open.wait(T)
        return None, None

    def open(self):
        self._open.set()


def test_a_batch_keeps_each_senders_order_in_ids_and_seqs(store):
    """Messages of several senders in one batch: ids and seqs in the order queued."""
    st, delivered = store
    alice, bob, carol, dave = users(st, 4)
    gate = Gate(st)
    queued = []
    for i in range(30):
        sender = (alice, bob, carol)[i % 3]
        queued.append((sender, f"m{i}", st.send(sender, f"m{i}", f"c{i}", to=dave)))
    gate.open()
    stored = [p.result(T) for _, _, p in queued]
    ids = [s.message["id"] for s in stored]
    assert ids == sorted(ids) and len(set(ids)) == 30
    assert [s.message["body"] for s in stored] == [body for _, body, _ in queued]
    assert all(s.new for s in stored)
    # dave's inbox: seq 1..30 in the order sent, each entry with its message.
    assert [(u, seq) for u, seq, _ in delivered] == [(dave, i) for i in range(1, 31)]
    assert [s.entries for s in stored] == [[(dave, i)] for i in range(1, 31)]
    frames = st.entries_after(dave, 0, 100)
    assert [seq for seq, _ in frames] == list(range(1, 31))
    assert [f for _, f in frames] == [f for _, _, f in delivered]
    assert st.cursor(dave) == (0, 30)


def test_a_cid_repeated_in_one_batch_is_stored_once(store):
    """The same (sender, cid) twice in a batch, and once more later: one message."""
    st, delivered = store
    alice, bob = users(st, 2)
    gate = Gate(st)
    first = st.send(alice, "hello", "same", to=bob)
    again = st.send(alice, "hello (retry)", "same", to=bob)
    other = st.send(alice, "other", "other", to=bob)
    gate.open()
    a, b, c = first.result(T), again.result(T), other.result(T)
    assert a.new and not b.new and c.new
    assert b.message == a.message and b.message_json == a.message_json
    assert b.message["body"] == "hello"
    assert [seq for _, seq, _ in delivered] == [1, 2]
    later = st.send(alice, "hello (later)", "same", to=bob).result(T)
    assert not later.new and later.message == a.message
    assert st.cursor(bob) == (0, 2)


def test_a_batch_past_one_insert_with_repeats_inside_gets_every_id_right(store, caplog):
    """1,200 messages (three INSERTs of 500 rows at most), some repeating a cid.

    The repeats: of a message stored before the batch (3 and 700), of one
    earlier in the same INSERT (651), of one in an earlier INSERT of the
    batch (1101). Each new message gets its own id, ascending in the order
    sent, and each recipient its seqs in that order; each repeat answers
    the message first stored under its cid.
    """
    st, delivered = store
    alice, bob, carol = users(st, 3)
    earlier = {cid: st.send(alice, "early", cid, to=bob).result(T) for cid in ("c7", "c700")}
    gate = Gate(st)
    repeat_of = {3: "c7", 651: "c650", 1101: "c600"}
    pending = []
    for i in range(1200):
        # Even messages have their own cid, odd ones none (never a conflict).
        cid = repeat_of.get(i, f"c{i}" if i % 2 == 0 else None)
        to = bob if i % 3 else carol
        pending.append((to, st.send(alice, f"m{i}", cid, to=to)))
    gate.open()
    stored = [(to, p.result(T)) for to, p in pending]
    # Written as batches, not one by one after a failed batch.
    assert "committing one by one" not in caplog.text
    assert [i for i, (_, s) in enumerate(stored) if not s.new] == [3, 651, 700, 1101]
    assert stored[3][1].message == earlier["c7"].message
    assert stored[700][1].message == earlier["c700"].message
    assert stored[651][1].message == stored[650][1].message
    assert stored[1101][1].message == stored[600][1].message
    new = [(i, to, s) for i, (to, s) in enumerate(stored) if s.new]
    ids = [s.message["id"] for _, _, s in new]
    assert ids == sorted(ids) and len(set(ids)) == len(ids) == 1196
    assert all(s.message["body"] == f"m{i}" for i, _, s in new)
    # bob had seqs 1 and 2 before the batch; carol had none.
    for user, start in ((bob, 3), (carol, 1)):
        mine = [s for _, to, s in new if to == user]
        assert [s.entries for s in mine] == [[(user, start + k)] for k in range(len(mine))]
        entries = st.entries_after(user, start - 1, 2000)
        assert [seq for seq, _ in entries] == list(range(start, start + len(mine)))
        assert [json.loads(frame)["id"] for _, frame in entries] == [
            s.message["id"] for s in mine]


def test_messages_without_a_cid_keep_their_order_in_a_batch(store):
    """HTTP messages may have no cid: they never conflict and keep their order."""
    st, delivered = store
    alice, bob = users(st, 2)
    gate = Gate(st)
    pending = [st.send(alice, f"n{i}", None, to=bob) for i in range(10)]
    gate.open()
    stored = [p.result(T) for p in pending]
    assert [s.message["body"] for s in stored] == [f"n{i}" for i in range(10)]
    ids = [s.message["id"] for s in stored]
    assert ids == sorted(ids)
    assert [s.message["cid"] for s in stored] == [None] * 10
    history, _ = st.history_direct(bob, alice, None, 50)
    assert [m["body"] for m in history] == [f"n{i}" for i in range(10)]


def test_direct_and_group_messages_share_one_order_per_recipient(store):
    """A recipient gets a batch's direct and group messages in the order sent."""
    st, delivered = store
    alice, bob, carol = users(st, 3)
    group = st.create_group(alice, "g", [bob, carol], 500)["id"]
    gate = Gate(st)
    order = []
    for i in range(6):
        if i % 2:
            order.append(st.send(alice, f"g{i}", f"g{i}", group=group))
        else:
            order.append(st.send(alice, f"d{i}", f"d{i}", to=bob))
    gate.open()
    bodies = [p.result(T).message["body"] for p in order]
    bob_frames = [f for seq, f in st.entries_after(bob, 0, 100)]
    assert [f.split('"body":')[1].split(",")[0].strip('"') for f in bob_frames] == bodies
    assert st.cursor(bob)[1] == 6 and st.cursor(carol)[1] == 3
    assert [(u, s) for u, s, _ in delivered if u == carol] == [(carol, 1), (carol, 2),
                                                              (carol, 3)]


def test_membership_changes_in_a_batch_apply_where_they_were_queued(store):
    """A member added in the middle of a batch gets only what was sent after it."""
    st, delivered = store
    alice, bob, carol = users(st, 3)
    group = st.create_group(alice, "g", [bob], 500)["id"]
    gate = Gate(st)
    before = st.send(alice, "before", "b", group=group)
    adding = threading.Thread(target=st.add_member, args=(group, alice, carol, 500))
    adding.start()
    # The add is queued behind the first message (the writer is held).
    wait_until(lambda: st.committer._queue.qsize() >= 2, message="the add queued")
    after = st.send(alice, "after", "a", group=group)
    gate.open()
    adding.join(T)
    assert before.result(T).entries == [(bob, 1)]
    assert sorted(after.result(T).entries) == sorted([(bob, 2), (carol, 1)])
    # History as carol sees it: only what was sent after she joined.
    history, _ = st.history_group(group, None, 50, member=carol)
    assert [m["body"] for m in history] == ["after"]


def test_a_message_refused_in_a_batch_leaves_the_others_stored(store):
    """A send to a group by a non-member fails alone; its batch-mates are stored."""
    st, delivered = store
    alice, bob, carol = users(st, 3)
    group = st.create_group(alice, "g", [bob], 500)["id"]
    gate = Gate(st)
    good1 = st.send(alice, "one", "1", group=group)
    bad = st.send(carol, "intruder", "x", group=group)
    good2 = st.send(alice, "two", "2", to=carol)
    gate.open()
    assert isinstance(bad.exception(T), Forbidden)
    assert good1.result(T).entries == [(bob, 1)]
    assert good2.result(T).entries == [(carol, 1)]
    history, _ = st.history_group(group, None, 50)
    assert [m["body"] for m in history] == ["one"]


def test_acks_of_many_users_in_one_batch_move_each_cursor_up_only(store):
    """One statement writes every user's ack; an ack below the cursor moves nothing."""
    st, _ = store
    ids = users(st, 3)
    for n in range(3):
        st.send(ids[0], f"m{n}", f"c{n}", to=ids[1]).result(T)
        st.send(ids[0], f"g{n}", f"d{n}", to=ids[2]).result(T)
    st.ack(ids[2], 3)
    wait_until(lambda: st.cursor(ids[2]) == (3, 3))
    gate = Gate(st)
    st.ack(ids[1], 2)
    st.ack(ids[2], 1)  # below the cursor: must not lower it
    st.ack(ids[1], 1)  # a lower ack after a higher one of the same batch
    gate.open()
    st.committer.run(lambda db: (None, None))  # a barrier: the acks' batch is committed
    assert st.cursor(ids[1]) == (2, 3)
    assert st.cursor(ids[2]) == (3, 3)
    assert st.cursor(ids[0]) == (0, 0)


def _blocked_on_flock(pid: int) -> bool:
    """Tell whether a thread of ``pid`` waits for an flock (``/proc/locks``)."""
    with open("/proc/locks") as f:
        return any("->" in line and "FLOCK" in line and f" {pid} " in f" {line} "
                   for line in f)


def test_a_writer_waits_for_the_turn_another_process_holds(tmp_path):
    """Writers of several processes on one SQLite file take turns through an flock.

    Another process holds the turn; this process's writer must block on it
    (seen in ``/proc/locks``), and its transaction runs only after the other
    one let go.
    """
    import os
    import subprocess
    import sys

    path = tmp_path / "turn.sqlite3"
    database = db.init_database("sqlite:///" + str(path))
    committer = Committer(database)
    marker = tmp_path / "released"
    holder = subprocess.Popen(
        [sys.executable, "-c", (
            "import fcntl, os, sys\n"
            f"fd = os.open({str(path) + '-writer.lock'!r}, os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('held', flush=True)\n"
            "sys.stdin.readline()\n"
            f"open({str(marker)!r}, 'w').close()\n"
            "fcntl.flock(fd, fcntl.LOCK_UN)\n")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        pending = committer.submit(lambda conn: (marker.exists(), None))
        wait_until(lambda: _blocked_on_flock(os.getpid()), message="the writer waiting")
        assert not pending.done()
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert pending.result(T) is True, "the transaction ran during the other's turn"
    finally:
        holder.kill()
        holder.communicate()
        committer.stop()
        database.close()
        models.database.initialize(None)


def test_a_failing_after_commit_hook_leaves_the_batch_and_the_other_hooks_alone(store):
    """Once committed, a batch is answered once and stored once, and every
    after-commit hook runs even when one of them raises."""
    st, delivered = store
    alice, bob = users(st, 2)
    ran = []

    def boom():
        raise RuntimeError("a hook failed")

    gate = Gate(st)  # the two messages share one batch
    hooks = [boom, lambda: ran.append(1)]
    st.committer.after_commit.extend(hooks)
    try:
        first = st.send(alice, "one", None, to=bob)
        second = st.send(alice, "two", None, to=bob)
        gate.open()
        assert first.result(T).entries == [(bob, 1)]
        assert second.result(T).entries == [(bob, 2)]
        st.committer.run(lambda conn: (None, None))  # anything re-run is done by now
    finally:
        for hook in hooks:
            st.committer.after_commit.remove(hook)
    history, _ = st.history_direct(alice, bob, None, 50)
    assert sorted(m["body"] for m in history) == ["one", "two"]
    assert st.cursor(bob) == (0, 2)
    # After the gate's batch and the messages' (the barrier's may run or not
    # before the hooks are removed).
    assert len(ran) >= 2
