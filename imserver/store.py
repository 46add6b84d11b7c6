"""Store-first operations on the database, and the one writer that runs them.

Every write of a process goes through one ``Committer`` thread that takes
whatever operations are waiting (up to ``COMMIT_BATCH``) and runs them in one
transaction: a group commit, as the Go server behind our measurements does.
One writer means no two threads of a process ever fight for SQLite's write
lock, and one commit (one WAL append) serves many messages. The caller gets a
``Pending`` resolved only after the commit, or has its callback called then:
that is the contract's "store first: ``sent`` only after the commit". What the commit
makes deliverable (inbox entries) is handed, in commit order, to the
``on_commit`` callback given by the app.

Reads run in the caller's thread on its own connection.

Imports: peewee, stdlib, ``imserver.db`` (``is_sqlite``),
``imserver.errors``, ``imserver.protocol`` (frame encoding). Never Flask.
"""

import collections
import concurrent.futures
import contextlib
import fcntl
import functools
import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from dataclasses import field

import peewee

from imserver.db import WRITER_LOCK
from imserver.db import is_sqlite
from imserver.errors import BadFrame
from imserver.errors import Forbidden
from imserver.errors import GroupFull
from imserver.errors import ImError
from imserver.errors import Invalid
from imserver.errors import NotFound
from imserver.errors import Unavailable
from imserver.errors import UsernameTaken
from imserver.protocol import encode_entry
from imserver.protocol import encode_message
from imserver.protocol import is_text

logger = logging.getLogger(__name__)

_STOP = object()


def now_ms() -> int:
    """Return the time in integer milliseconds since the epoch (``ts``)."""
    return time.time_ns() // 1_000_000


@dataclass
class Stored:
    """A message committed (or found again by its cid).

    Made empty when the message is queued in the writer and filled in just
    after the commit of the batch that wrote it.
    """

    message: dict | None = None
    # JSON of the message, encoded once for every recipient's frame.
    message_json: str = ""
    # False when the cid was seen before: nothing is delivered again.
    new: bool = True
    # (user_id, seq) of every inbox entry the message made.
    entries: list = field(default_factory=list)


class Pending:
    """The outcome of one writer operation, known once its batch is committed.

    The part of ``concurrent.futures.Future`` the writer needs, for a
    fraction of its cost: a Future builds a ``Condition`` (two locks) and
    takes it three times, once per message in the hottest path. A
    ``Pending`` given a ``callback`` has no lock at all: the callback is
    called, in the writer thread, right after the commit. Without one, it
    has an ``Event`` to wait on (``result``), for callers that block (HTTP
    views, administration, tests).
    """

    __slots__ = ("_callback", "_event", "_result", "_error", "_done")

    def __init__(self, callback=None) -> None:
        self._callback = callback
        self._event = threading.Event() if callback is None else None
        self._result = None
        self._error: BaseException | None = None
        self._done = False

    def done(self) -> bool:
        """Tell whether the operation was committed or refused."""
        return self._done

    def result(self, timeout: float | None = None):
        """Wait for the committed result; raise the operation's error."""
        self._wait(timeout)
        if self._error is not None:
            raise self._error
        return self._result

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Wait, then return the operation's error, or None once committed."""
        self._wait(timeout)
        return self._error

    def _wait(self, timeout: float | None) -> None:
        if self._done:
            return
        if self._event is None:
            raise RuntimeError("this operation reports through its callback")
        if not self._event.wait(timeout):
            raise TimeoutError("the writer did not answer in time")

    def _finish(self, result, error: BaseException | None) -> None:
        """Record the outcome (in the writer), then wake or call back."""
        if self._done:
            return
        self._result, self._error = result, error
        self._done = True
        if self._event is not None:
            self._event.set()
        if self._callback is not None:
            try:
                self._callback(self)
            except Exception:
                logger.exception("writer callback failed")


class Committer:
    """The process's one writer: group commit of queued operations.

    An operation is a function ``op(conn)`` run inside the batch's
    transaction; it returns ``(result, deliveries)`` where ``deliveries`` is
    a list of ``(user_id, seq, frame)``. It must raise ``ImError`` before it
    writes anything (then only its own operation fails); any other exception
    rolls the whole batch back and fails every operation in it (the clients
    retry with the same cid, which is idempotent).
    """

    def __init__(self, db: peewee.Database, batch: int = 512, on_commit=None,
                 observe=None) -> None:
        self._db = db
        self._batch = batch
        self._on_commit = on_commit
        # Called at the start of each attempt at a batch, and inside its
        # transaction after its operations: for writes the operations gather
        # to do once per batch (a failed attempt's are dropped).
        # ``before_commit`` returns more deliveries, or None.
        self.batch_started = None
        self.before_commit = None
        # Called right after the commit, before the answers: for the work
        # that need not hold the write lock (building the frames). Returns
        # more deliveries, or None.
        self.committed = None
        # Called after each batch is committed, answered and delivered.
        self.after_commit: list = []
        # A context manager around the answers and deliveries of a batch
        # (the flusher's ``corked``: every frame of a connection in one write).
        self.cork = contextlib.nullcontext
        # Called with (seconds, ops) after each commit, for metrics.
        self._observe = observe
        # Taken around each transaction: whose turn it is among processes.
        self._turn = writer_turn(db)
        # Run first in each transaction: the PostgreSQL writers' turn.
        self._turn_sql = _writer_turn_sql(db)
        # Operations waiting for the writer: (op, pending).
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="imserver-committer",
                                        daemon=True)
        self._thread.start()

    def submit(self, op, callback=None) -> Pending:
        """Queue ``op`` for the next transaction; it is answered after the commit.

        ``callback(pending)``, if given, is called in the writer thread then;
        otherwise wait on the returned ``Pending``.
        """
        pending = Pending(callback)
        self._queue.put((op, pending))
        return pending

    def run(self, op, timeout: float = 30.0):
        """Run ``op`` in the writer and wait for its committed result."""
        return self.submit(op).result(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Commit everything queued, then stop the thread."""
        self._queue.put((_STOP, None))
        self._thread.join(timeout)

    def _run(self) -> None:
        _read_inline()
        stopping = False
        while not stopping:
            first = self._queue.get()
            batch = []
            if first[0] is _STOP:
                stopping = True
            else:
                batch.append(first)
            while len(batch) < self._batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item[0] is _STOP:
                    stopping = True
                    continue
                batch.append(item)
            if batch:
                try:
                    self._commit(batch)
                except Exception:
                    logger.exception("committer batch failed")
        try:
            self._db.close()
        except Exception:
            pass
        if isinstance(self._turn, WriterTurn):
            self._turn.close()

    def _commit(self, batch: list, attempts: int = 3) -> None:
        error = None
        for attempt in range(1, attempts + 1):
            try:
                self._commit_once(batch)
                return
            except (peewee.OperationalError, peewee.InternalError) as exc:
                # A deadlock between processes, a serialization failure or a
                # lost connection: everything was rolled back, so the batch
                # can run again as it is.
                logger.warning("commit attempt %d failed: %r", attempt, exc)
                error = exc
                self._close_quietly()
                if attempt < attempts:
                    time.sleep(0.05 * attempt)
            except Exception as exc:
                # Not transient: one operation's input may be at fault.
                error = exc
                self._close_quietly()
                break
        if len(batch) > 1 and self._database_answers():
            # The database works, so one operation's input is at fault: run
            # each alone, so that only that one fails and the others of the
            # batch are stored.
            logger.warning("batch of %d failed (%r); committing one by one",
                           len(batch), error)
            for item in batch:
                self._commit([item], attempts=1)
        else:
            self._fail(batch, error)

    def _database_answers(self) -> bool:
        try:
            if self._db.is_closed():
                self._db.connect()
            self._db.execute_sql("SELECT 1").fetchone()
            return True
        except Exception:
            self._close_quietly()
            return False

    def _close_quietly(self) -> None:
        try:
            self._db.close()
        except Exception:
            pass

    def _fail(self, batch: list, exc: Exception) -> None:
        """Refuse every operation of a batch that could not be committed."""
        logger.error("commit failed, %d operations refused: %r", len(batch), exc)
        self._close_quietly()
        error = Unavailable("the database is unavailable, try again")
        for _, pending in batch:
            pending._finish(None, error)

    def _commit_once(self, batch: list) -> None:
        started = time.monotonic()
        results = []
        deliveries = []
        if self.batch_started is not None:
            self.batch_started()
        if self._db.is_closed():
            self._db.connect()
        with self._turn, self._db.atomic(*_write_lock(self._db)):
            if self._turn_sql is not None:
                self._db.execute_sql(self._turn_sql)
            for op, pending in batch:
                if pending._done:
                    continue
                try:
                    result, delivered = op(self._db)
                except ImError as exc:
                    results.append((pending, None, exc))
                    continue
                results.append((pending, result, None))
                if delivered:
                    deliveries.extend(delivered)
            if self.before_commit is not None:
                deliveries.extend(self.before_commit() or ())
        if self.committed is not None:
            # Committed: from here on nothing may make the batch run again.
            try:
                deliveries.extend(self.committed() or ())
            except Exception:
                logger.exception("work after the commit failed")
        if self._observe is not None:
            try:
                self._observe(time.monotonic() - started, len(batch))
            except Exception:
                logger.exception("commit metrics failed")
        # Store first: only now, after the commit, answer and deliver; every
        # frame a connection gets from this batch goes out in one write.
        with self.cork():
            for pending, result, error in results:
                pending._finish(result, error)
            if deliveries and self._on_commit is not None:
                try:
                    self._on_commit(deliveries)
                except Exception:
                    logger.exception("delivery after commit failed")
        for hook in self.after_commit:
            try:
                hook()
            except Exception:
                logger.exception("after-commit hook failed")


class WriterTurn:
    """Orders the writers of the processes sharing one SQLite file.

    SQLite's own lock makes a second writer sleep and retry (1, 2, 5, 10
    ms...), so it wakes late, and the writer that just committed often
    takes the lock again first: one worker's batches starve. An ``flock``
    on a file next to the database wakes the waiting writer the moment the
    other one commits. SQLite's lock still guards the data (and any other
    program writing the file); this only decides whose turn it is. The lock
    file is opened in the writer thread, after gunicorn forked, so each
    process has its own lock.
    """

    def __init__(self, path: str) -> None:
        self.path = path + "-writer.lock"
        self._fd = None
        self._pid = None

    def __enter__(self):
        if self._pid != os.getpid():
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            self._pid = os.getpid()
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = self._pid = None


def writer_turn(db) -> contextlib.AbstractContextManager:
    """Return the ``WriterTurn`` of an SQLite file, else a no-op context."""
    db = db.obj if isinstance(db, peewee.DatabaseProxy) else db
    path = getattr(db, "database", None)
    if (is_sqlite(db) and isinstance(path, str)
            and path and path != ":memory:" and not path.startswith("file:")):
        return WriterTurn(path)
    return contextlib.nullcontext()


def _writer_turn_sql(db) -> str | None:
    """Return the statement that takes the PostgreSQL writers' turn, else None.

    A batch locks the ``users`` rows of its senders' acks and of its
    recipients' seqs, in the order its operations come. Two processes whose
    batches lock the same rows in another order deadlock: PostgreSQL finds
    it only after ``deadlock_timeout`` (1 s), rolls one back, and the
    writer runs it again. Between two workers exchanging messages that
    happened every second (886 messages a second, p50 1 s, with two
    workers of the bench's ``workers`` scenario). So the writers of every
    process take one transaction-scoped advisory lock first, as SQLite's
    take its write lock: each batch waits for the batch before it, never
    for a cycle. The lock ends with the transaction, committed or rolled
    back, and a writer whose connection is lost loses it with it.
    """
    if is_sqlite(db):
        return None
    return f"SELECT pg_advisory_xact_lock({WRITER_LOCK})"


def _write_lock(db) -> tuple:
    """Return ``atomic()`` arguments: SQLite takes its write lock at BEGIN.

    BEGIN IMMEDIATE avoids the deadlock of two processes both upgrading a
    read transaction to a write one on one SQLite file.
    """
    if is_sqlite(db):
        return ("IMMEDIATE",)
    return ()


def message_dict(row) -> dict:
    """Build the contract's message object from a row tuple.

    ``row`` is ``(id, sender, recipient, group, body, ts, cid)``.
    """
    message_id, sender, recipient, group, body, ts, cid = row
    message = {"id": message_id, "from": sender}
    if group is not None:
        message["group"] = group
    else:
        message["to"] = recipient
    message["body"] = body
    message["ts"] = ts
    message["cid"] = cid
    return message


_MESSAGE_COLUMNS = "m.id, m.sender_id, m.recipient_id, m.group_id, m.body, m.ts, m.cid"

# Rows per INSERT of messages or inbox entries, ids per UPDATE of seqs or
# acks: well under SQLite's and PostgreSQL's limits on parameters in one
# statement. One statement for many rows, not ``executemany``: the writer
# holds the write lock meanwhile, and ``executemany`` gives the GIL away
# and waits for it again for every row.
_INSERT_ROWS = 500
_UPDATE_IDS = 500


@dataclass(slots=True)
class _Queued:
    """A message checked by the writer, to be written before the commit."""

    sender: int
    to: int | None
    group: int | None
    body: str
    ts: int
    cid: str | None
    recipients: list
    stored: Stored


# Marks the threads that run the Store's reads themselves: its readers and
# the writer (whose reads belong to its transaction); the readers also keep
# their connection open between reads.
_inline = threading.local()


def _read_inline() -> None:
    _inline.reads = True


def _start_reader() -> None:
    _inline.reads = True
    _inline.keeps_connection = True


def _read(method):
    """Run a read of the ``Store`` on its reader threads, and wait for it.

    SQLite's parser and virtual machine (and the drivers under them) run
    deep C stacks, and a thread keeps every stack page it has touched for
    as long as it lives. A connection's thread lives for hours and mostly
    waits, so its reads (the token's user, the cursor, the replay) run on a
    few reader threads instead: its stack stays at three touched pages,
    8 KB less per idle connection. It also bounds how many reads run at
    once, and each reader keeps its connection: opening an SQLite
    connection with our pragmas costs about 450 µs, a read on an open one
    7 µs. A reader thread, the writer, or a Store without readers reads
    inline.
    """

    @functools.wraps(method)
    def read(self, *args, **kwargs):
        readers = self._readers
        if readers is None or getattr(_inline, "reads", False):
            return method(self, *args, **kwargs)
        try:
            future = readers.submit(method, self, *args, **kwargs)
        except RuntimeError:
            # Shut down (the app is stopping): read here.
            return method(self, *args, **kwargs)
        return future.result()

    return read


class Store:
    """The operations of the contract on the database.

    Reads run on the store's reader threads (``readers`` of them; inline
    when 0); writes are queued to the ``Committer``. Users are never
    deleted, so the ids known to exist are cached.
    """

    def __init__(self, db: peewee.Database, committer: Committer,
                 on_new_messages=None, readers: int = 0) -> None:
        self.db = db
        self.committer = committer
        self._readers = None
        if readers:
            self._readers = concurrent.futures.ThreadPoolExecutor(
                max_workers=readers, thread_name_prefix="imserver-read",
                initializer=_start_reader)
        # Called after each commit with how many new messages it stored.
        self._on_new_messages = on_new_messages
        self._batch_new = 0
        # What the batch being written gathers (only the committer touches
        # these): its messages, not yet inserted; its inbox rows; the
        # messages written, whose frames are built after the commit, as
        # (stored, row of the message, [(user_id, seq), ...] or None for a
        # repeated cid).
        self._pending_messages: list[_Queued] = []
        self._pending_inbox: list[tuple[int, int, int]] = []
        self._written: list = []
        self._sqlite = is_sqlite(db)
        committer.batch_started = self._start_batch
        committer.before_commit = self._write_pending
        committer.committed = self._build_written
        committer.after_commit.append(self._count_batch)
        # Highest ack per user not yet written, and its lock.
        self._acks: dict[int, int] = {}
        self._acks_lock = threading.Lock()
        # Ids of users known to exist (users are never deleted).
        self._known_users: set[int] = set()
        # Guards _known_users.
        self._known_lock = threading.Lock()

    @contextlib.contextmanager
    def _reading(self):
        """Lend this thread a connection; a database failure becomes ``Unavailable``.

        A reader thread keeps its connection open; any other thread opens
        one for the read and closes it.

        Foreign exceptions are translated once, here, so that no caller (the
        WebSocket handler least of all) ever sees a peewee error.
        """
        keep = getattr(_inline, "keeps_connection", False)
        try:
            if keep:
                # A reader thread: its connection stays open for the next read.
                self.db.connect(reuse_if_open=True)
                yield
            else:
                with self.db.connection_context():
                    yield
        except (peewee.OperationalError, peewee.InterfaceError) as exc:
            logger.warning("database read failed: %s", exc)
            if keep:
                # The connection may be the broken part: the next read opens
                # a new one.
                try:
                    self.db.close()
                except Exception:
                    pass
            raise Unavailable("the database is unavailable, try again") from exc

    def _sql(self, query: str) -> str:
        """Turn ``?`` placeholders into the database's own."""
        param = self.db.param
        return query if param == "?" else query.replace("?", param)

    def _execute(self, query: str, params=()):
        return self.db.execute_sql(self._sql(query), params)

    # -- users ------------------------------------------------------------

    def create_user(self, username: str, password_hash: str) -> dict:
        """Create an account; raise ``UsernameTaken`` if the name is used."""

        def op(db):
            row = self._execute(
                "INSERT INTO users (username, password_hash, is_admin, created_at,"
                " last_seq, acked_seq) VALUES (?, ?, ?, ?, 0, 0)"
                " ON CONFLICT (username) DO NOTHING RETURNING id",
                (username, password_hash, False, now_ms()),
            ).fetchone()
            if row is None:
                raise UsernameTaken()
            return {"id": row[0], "username": username}, None

        user = self.committer.run(op)
        with self._known_lock:
            self._known_users.add(user["id"])
        return user

    @_read
    def find_user(self, username: str):
        """Return ``(id, username, password_hash, is_admin)`` or None."""
        with self._reading():
            return self._execute(
                "SELECT id, username, password_hash, is_admin FROM users"
                " WHERE username = ?", (username,)).fetchone()

    @_read
    def get_user(self, user_id: int):
        """Return ``{"id", "username", "is_admin"}`` or None."""
        with self._reading():
            row = self._execute(
                "SELECT id, username, is_admin FROM users WHERE id = ?",
                (user_id,)).fetchone()
        if row is None:
            return None
        return {"id": row[0], "username": row[1], "is_admin": bool(row[2])}

    def user_exists(self, user_id: int) -> bool:
        """Tell whether the user exists, from the cache when possible."""
        # A set lookup is atomic; only additions take the lock.
        if user_id in self._known_users:
            return True
        if self.get_user(user_id) is None:
            return False
        with self._known_lock:
            self._known_users.add(user_id)
        return True

    def set_admin(self, username: str, is_admin: bool = True) -> bool:
        """Grant or revoke the admin flag; return False for an unknown user."""

        def op(db):
            count = self._execute("UPDATE users SET is_admin = ? WHERE username = ?",
                                  (is_admin, username)).rowcount
            return count > 0, None

        return self.committer.run(op)

    # -- messages ---------------------------------------------------------

    def send(self, sender: int, body: str, cid: str | None, to: int | None = None,
             group: int | None = None, callback=None) -> Pending:
        """Queue a message for storing; the ``Pending`` gives a ``Stored``.

        ``callback(pending)`` is called in the writer right after the commit.
        Raises at once (before queueing) what can be known without the
        writer: a message to oneself, an unknown user.
        """
        if to is not None:
            if to == sender:
                raise BadFrame("a message to oneself is not allowed")
            if not self.user_exists(to):
                raise NotFound(f"no user {to}")
        return self.committer.submit(
            lambda db: self._store_message(sender, body, cid, to, group), callback)

    def _store_message(self, sender, body, cid, to, group):
        """Run in the committer: check the target, queue the message's rows.

        Nothing is written here: the messages of a batch are written
        together just before its commit (``_write_messages``).
        """
        if group is not None:
            if self._execute("SELECT 1 FROM groups WHERE id = ?", (group,)).fetchone() is None:
                raise NotFound(f"no group {group}")
            members = [r[0] for r in self._execute(
                "SELECT user_id FROM group_members WHERE group_id = ?", (group,))]
            if sender not in members:
                raise Forbidden("you are not a member of this group")
            recipients = [m for m in members if m != sender]
        else:
            recipients = [to]
        stored = Stored()
        self._pending_messages.append(
            _Queued(sender, to, group, body, now_ms(), cid, recipients, stored))
        return stored, None

    def _write_messages(self) -> None:
        """Write the batch's queued messages: a few statements for all of them.

        One ``INSERT`` of every message (a cid seen before inserts nothing
        and answers the message stored the first time), one ``UPDATE`` of
        the recipients' ``last_seq`` (``_take_seqs``), then each
        recipient's seqs are given out in queue order, so
        that one sender's messages keep their order in every inbox. The
        inbox rows are inserted with the batch's others before the commit;
        the frames are built after it (``_build_written``), so that the
        write lock is not held meanwhile.
        """
        queued = self._pending_messages
        if not queued:
            return
        self._pending_messages = []
        ids = self._insert_messages(queued)
        counts: dict[int, int] = {}
        new = []
        for item, message_id in zip(queued, ids):
            if message_id is None:
                # Idempotent cid: answer the message stored the first time
                # (in an earlier batch, or earlier in this one).
                old = self._execute(
                    f"SELECT {_MESSAGE_COLUMNS} FROM messages m"
                    " WHERE m.sender_id = ? AND m.cid = ?", (item.sender, item.cid)).fetchone()
                self._written.append((item.stored, old, None))
                continue
            self._batch_new += 1
            for user_id in item.recipients:
                counts[user_id] = counts.get(user_id, 0) + 1
            entries = []
            self._written.append((item.stored, (message_id, item.sender, item.to, item.group,
                                                item.body, item.ts, item.cid), entries))
            new.append((message_id, item.recipients, entries))
        next_seq = self._take_seqs(counts)
        for message_id, recipients, entries in new:
            for user_id in recipients:
                seq = next_seq.get(user_id)
                if seq is None:
                    continue  # no such user: the message is stored, for no one
                next_seq[user_id] = seq + 1
                self._pending_inbox.append((user_id, seq, message_id))
                entries.append((user_id, seq))

    def _build_written(self) -> list:
        """Run in the committer after the commit: fill in each ``Stored``, build frames.

        Returns the deliveries ``(user_id, seq, frame)`` of the new messages.
        """
        written, self._written = self._written, []
        deliveries = []
        for stored, row, entries in written:
            stored.message = message_dict(row)
            stored.message_json = message_json = encode_message(*row)
            if entries is None:
                stored.new = False
                continue
            stored.entries = entries
            for user_id, seq in entries:
                deliveries.append((user_id, seq, encode_entry(seq, message_json)))
        return deliveries

    def _insert_messages(self, queued: list) -> list:
        """Insert the queued messages at once; return each one's new id, or None.

        None where ``(sender, cid)`` was already stored. The new rows are
        matched to the queue by ``(sender, cid)``; messages without a cid
        never conflict and get their sender's ids in ascending order, the
        order of the rows. On SQLite nothing is read back when every row of
        an ``INSERT`` is new: each new row takes the largest rowid so far
        plus one, so under the write lock the statement's rows have the ids
        up to ``lastrowid``, consecutive and in the order of the rows. When
        a cid repeats, the rows that were inserted (still consecutive) are
        read back as one JSON value rather than by ``RETURNING``, whose
        every row costs the writer a hand-off of the GIL while it holds the
        write lock.
        """
        rows: list = []
        for start in range(0, len(queued), _INSERT_ROWS):
            chunk = queued[start:start + _INSERT_ROWS]
            params = []
            for item in chunk:
                params += (item.sender, item.to, item.group, item.body, item.ts, item.cid)
            query = ("INSERT INTO messages (sender_id, recipient_id, group_id, body, ts, cid)"
                     " VALUES " + ", ".join(["(?, ?, ?, ?, ?, ?)"] * len(chunk))
                     + " ON CONFLICT (sender_id, cid) DO NOTHING")
            if not self._sqlite:
                rows += self._execute(query + " RETURNING id, sender_id, cid",
                                      params).fetchall()
                continue
            cursor = self._execute(query, params)
            inserted, last = cursor.rowcount, cursor.lastrowid
            if inserted == len(chunk):
                first = last - inserted + 1
                rows += [(first + i, item.sender, item.cid) for i, item in enumerate(chunk)]
            elif inserted > 0:
                rows += map(tuple, json.loads(self._execute(
                    "SELECT json_group_array(json_array(id, sender_id, cid)) FROM messages"
                    " WHERE id BETWEEN ? AND ?", (last - inserted + 1, last)).fetchone()[0]))
        rows.sort()
        by_cid = {}
        without_cid = collections.defaultdict(collections.deque)
        for message_id, sender, cid in rows:
            if cid is None:
                without_cid[sender].append(message_id)
            else:
                by_cid[(sender, cid)] = message_id
        ids: list = []
        for item in queued:
            if item.cid is None:
                ids.append(without_cid[item.sender].popleft())
            else:
                # pop: a second message with the same cid in this batch is a
                # repeat of the first.
                ids.append(by_cid.pop((item.sender, item.cid), None))
        return ids

    def _take_seqs(self, counts: dict[int, int]) -> dict[int, int]:
        """Reserve ``counts[user]`` seqs per user; return each one's first.

        One ``UPDATE`` for every user of the batch (per 500 users), under
        the row lock (PostgreSQL) or the write lock (SQLite): the seqs stay
        dense and unique across processes. When every user gets as many
        entries (a group message, a batch of one message each) it adds one
        number to the rows ``IN`` a list; otherwise it joins a ``VALUES``
        list of ``(id, count)``, which costs SQLite more a row but saves a
        statement per distinct count. The new values come back by
        ``RETURNING`` on PostgreSQL, as one JSON value on SQLite (see
        ``_insert_messages``).
        """
        first = {}
        items = list(counts.items())
        same = len(set(counts.values())) == 1
        for start in range(0, len(items), _UPDATE_IDS):
            chunk = items[start:start + _UPDATE_IDS]
            ids = [user_id for user_id, _ in chunk]
            in_ids = " WHERE id IN (" + ", ".join("?" * len(chunk)) + ")"
            if same:
                update = "UPDATE users SET last_seq = last_seq + ?" + in_ids
                params = [chunk[0][1], *ids]
            else:
                update = ("WITH c (id, n) AS (VALUES " + ", ".join(["(?, ?)"] * len(chunk))
                          + ") UPDATE users SET last_seq = users.last_seq + c.n FROM c"
                          " WHERE users.id = c.id")
                params = [value for item in chunk for value in item]
            if self._sqlite:
                self._execute(update, params)
                rows = json.loads(self._execute(
                    "SELECT json_group_array(json_array(id, last_seq)) FROM users" + in_ids,
                    ids).fetchone()[0])
            else:
                rows = self._execute(update + " RETURNING users.id, users.last_seq",
                                     params).fetchall()
            for user_id, last_seq in rows:
                first[user_id] = last_seq - counts[user_id] + 1
        return first

    def ack(self, user_id: int, seq: int) -> None:
        """Move the acked cursor of ``user_id`` up to ``seq`` (never down).

        Acks are cumulative, so only the highest per user matters: they are
        gathered here and written by one writer operation for all users
        (one UPDATE per batch, not one per ack frame). Nothing waits for it:
        an ack lost in a crash only means entries are sent once more.
        """
        with self._acks_lock:
            first = not self._acks
            if seq > self._acks.get(user_id, -1):
                self._acks[user_id] = seq
        if first:
            self.committer.submit(self._write_acks)

    def _start_batch(self) -> None:
        """Run in the committer before each attempt at a batch."""
        self._pending_messages = []
        self._pending_inbox.clear()
        self._written = []
        self._batch_new = 0

    def _write_pending(self) -> None:
        """Run in the committer before each commit: write the batch's messages."""
        self._write_messages()
        self._write_pending_inbox()

    def _count_batch(self) -> None:
        """Run in the committer after each commit: count the new messages."""
        if self._batch_new and self._on_new_messages is not None:
            self._on_new_messages(self._batch_new)
        self._batch_new = 0

    def _write_pending_inbox(self) -> None:
        """Run in the committer before each commit: insert the batch's inbox rows."""
        rows = list(self._pending_inbox)
        self._pending_inbox.clear()
        for start in range(0, len(rows), _INSERT_ROWS):
            chunk = rows[start:start + _INSERT_ROWS]
            self._execute("INSERT INTO inbox (user_id, seq, message_id) VALUES "
                          + ", ".join(["(?, ?, ?)"] * len(chunk)),
                          [value for row in chunk for value in row])

    def _write_acks(self, db):
        """Run in the committer: write every gathered ack, one statement per 500 users."""
        with self._acks_lock:
            acks, self._acks = self._acks, {}
        items = list(acks.items())
        for start in range(0, len(items), _UPDATE_IDS):
            chunk = items[start:start + _UPDATE_IDS]
            self._execute(
                "WITH a (id, seq) AS (VALUES " + ", ".join(["(?, ?)"] * len(chunk))
                + ") UPDATE users SET acked_seq = a.seq FROM a"
                " WHERE users.id = a.id AND users.acked_seq < a.seq",
                [value for item in chunk for value in item])
        return None, None

    @_read
    def cursor(self, user_id: int) -> tuple[int, int]:
        """Return ``(acked_seq, last_seq)`` of ``user_id``."""
        with self._reading():
            row = self._execute("SELECT acked_seq, last_seq FROM users WHERE id = ?",
                                (user_id,)).fetchone()
        return (row[0], row[1]) if row else (0, 0)

    @_read
    def last_seqs(self, user_ids: list[int]) -> list[tuple[int, int]]:
        """Return ``(user_id, last_seq)`` for each of ``user_ids``."""
        if not user_ids:
            return []
        placeholders = ", ".join("?" * len(user_ids))
        with self._reading():
            return self._execute(
                f"SELECT id, last_seq FROM users WHERE id IN ({placeholders})",
                user_ids).fetchall()

    @_read
    def entries_after(self, user_id: int, after_seq: int, limit: int) -> list:
        """Return up to ``limit`` inbox entries above ``after_seq`` as frames.

        Each item is ``(seq, frame)``, in seq order.
        """
        with self._reading():
            rows = self._execute(
                f"SELECT i.seq, {_MESSAGE_COLUMNS} FROM inbox i"
                " JOIN messages m ON m.id = i.message_id"
                " WHERE i.user_id = ? AND i.seq > ? ORDER BY i.seq LIMIT ?",
                (user_id, after_seq, limit)).fetchall()
        return [(row[0], encode_entry(row[0], encode_message(*row[1:]))) for row in rows]

    @_read
    def history_direct(self, user_id: int, other: int, before: int | None,
                       limit: int) -> tuple[list, bool]:
        """Return the newest messages between two users below ``before``."""
        before = before if before is not None else 2**63 - 1
        with self._reading():
            rows = self._execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages m"
                " WHERE ((m.sender_id = ? AND m.recipient_id = ?)"
                " OR (m.sender_id = ? AND m.recipient_id = ?)) AND m.id < ?"
                " ORDER BY m.id DESC LIMIT ?",
                (user_id, other, other, user_id, before, limit + 1)).fetchall()
        return _page(rows, limit)

    @_read
    def history_group(self, group_id: int, before: int | None,
                      limit: int, member: int | None = None) -> tuple[list, bool]:
        """Return the newest messages of a group below ``before``.

        With ``member``, only the messages sent after that member joined: a
        member added later sees nothing from before, as in its inbox.
        """
        before = before if before is not None else 2**63 - 1
        query = (f"SELECT {_MESSAGE_COLUMNS} FROM messages m"
                 " WHERE m.group_id = ? AND m.id < ?")
        params = [group_id, before]
        if member is not None:
            query += (" AND m.id > (SELECT since_id FROM group_members"
                      " WHERE group_id = ? AND user_id = ?)")
            params += [group_id, member]
        query += " ORDER BY m.id DESC LIMIT ?"
        params.append(limit + 1)
        with self._reading():
            rows = self._execute(query, params).fetchall()
        return _page(rows, limit)

    # -- groups -------------------------------------------------------------

    @_read
    def get_group(self, group_id: int) -> dict | None:
        """Return the contract's group object, or None."""
        with self._reading():
            return self._read_group(group_id)

    def _read_group(self, group_id: int) -> dict | None:
        row = self._execute("SELECT id, name, owner_id FROM groups WHERE id = ?",
                            (group_id,)).fetchone()
        if row is None:
            return None
        members = [r[0] for r in self._execute(
            "SELECT user_id FROM group_members WHERE group_id = ? ORDER BY user_id",
            (group_id,))]
        return {"id": row[0], "name": row[1], "owner": row[2], "members": members}

    @_read
    def groups_of(self, user_id: int) -> list[dict]:
        """Return every group ``user_id`` is a member of, by id."""
        with self._reading():
            ids = [r[0] for r in self._execute(
                "SELECT group_id FROM group_members WHERE user_id = ? ORDER BY group_id",
                (user_id,))]
            return [self._read_group(gid) for gid in ids]

    def create_group(self, owner: int, name: str, members: list[int],
                     max_members: int) -> dict:
        """Create a group owned by ``owner``, who is always a member."""
        wanted = sorted(set(members) | {owner})
        for user_id in wanted:
            if not self.user_exists(user_id):
                raise NotFound(f"no user {user_id}")
        if len(wanted) > max_members:
            raise GroupFull(f"a group has at most {max_members} members")

        def op(db):
            ts = now_ms()
            group_id = self._execute(
                "INSERT INTO groups (name, owner_id, created_at) VALUES (?, ?, ?)"
                " RETURNING id", (name, owner, ts)).fetchone()[0]
            since = self._newest_message_id()
            self.db.cursor().executemany(
                self._sql("INSERT INTO group_members (group_id, user_id, joined_at,"
                          " since_id) VALUES (?, ?, ?, ?)"),
                [(group_id, user_id, ts, since) for user_id in wanted])
            return {"id": group_id, "name": name, "owner": owner, "members": wanted}, None

        return self.committer.run(op)

    def add_member(self, group_id: int, caller: int, user_id: int,
                   max_members: int) -> None:
        """Add ``user_id`` to a group; only its owner may."""
        if not self.user_exists(user_id):
            raise NotFound(f"no user {user_id}")

        def op(db):
            group = self._group_of_member(group_id, caller)
            if group["owner"] != caller:
                raise Forbidden("only the owner adds members")
            if user_id in group["members"]:
                return None, None
            if len(group["members"]) >= max_members:
                raise GroupFull(f"a group has at most {max_members} members")
            self._execute("INSERT INTO group_members (group_id, user_id, joined_at,"
                          " since_id) VALUES (?, ?, ?, ?)",
                          (group_id, user_id, now_ms(), self._newest_message_id()))
            return None, None

        self.committer.run(op)

    def _group_of_member(self, group_id: int, caller: int) -> dict:
        """Return the group if ``caller`` is a member, else raise 404 or 403."""
        group = self._read_group(group_id)
        if group is None:
            raise NotFound(f"no group {group_id}")
        if caller not in group["members"]:
            raise Forbidden("you are not a member of this group")
        return group

    def _newest_message_id(self) -> int:
        """Return the highest message id stored so far (in the writer).

        The batch's messages queued before this operation are written first:
        they come before it.
        """
        self._write_messages()
        return self._execute("SELECT COALESCE(MAX(id), 0) FROM messages").fetchone()[0]

    def remove_member(self, group_id: int, caller: int, user_id: int) -> None:
        """Remove ``user_id``: the owner removes anyone, a member itself.

        When the owner leaves, the member with the lowest id becomes the
        owner; a group left with no member stays, with its history, and no
        one can read or join it again.
        """

        def op(db):
            group = self._group_of_member(group_id, caller)
            if caller != user_id and caller != group["owner"]:
                raise Forbidden("only the owner removes other members")
            if user_id not in group["members"]:
                raise NotFound(f"user {user_id} is not a member")
            self._execute("DELETE FROM group_members WHERE group_id = ? AND user_id = ?",
                          (group_id, user_id))
            rest = [m for m in group["members"] if m != user_id]
            if user_id == group["owner"]:
                if rest:
                    self._execute("UPDATE groups SET owner_id = ? WHERE id = ?",
                                  (rest[0], group_id))
            return None, None

        self.committer.run(op)

    @_read
    def is_member(self, group_id: int, user_id: int) -> bool | None:
        """Tell whether ``user_id`` is in the group; None if no such group."""
        with self._reading():
            if self._execute("SELECT 1 FROM groups WHERE id = ?",
                             (group_id,)).fetchone() is None:
                return None
            return self._execute(
                "SELECT 1 FROM group_members WHERE group_id = ? AND user_id = ?",
                (group_id, user_id)).fetchone() is not None

    def close(self) -> None:
        """Stop the reader threads once the reads running finish."""
        if self._readers is not None:
            self._readers.shutdown(wait=True)

    @_read
    def ping(self) -> None:
        """Run a trivial query, for the health check."""
        with self._reading():
            self._execute("SELECT 1").fetchone()


def _page(rows: list, limit: int) -> tuple[list, bool]:
    """Turn newest-first rows (one extra) into an ascending page and has_more."""
    has_more = len(rows) > limit
    rows = rows[:limit]
    rows.reverse()
    return [message_dict(row) for row in rows], has_more


def check_name(name) -> str:
    """Return a valid group name: 1 to 64 characters of text."""
    if not isinstance(name, str) or not 1 <= len(name.strip()) <= 64 or not is_text(name):
        raise Invalid("'name' must be a string of 1 to 64 characters")
    return name.strip()
