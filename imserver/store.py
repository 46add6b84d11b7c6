"""Store-first operations on the database, and the one writer that runs them.

Every write of a process goes through one ``Committer`` thread that takes
whatever operations are waiting (up to ``COMMIT_BATCH``) and runs them in one
transaction: a group commit, as the Go server behind our measurements does.
One writer means no two threads of a process ever fight for SQLite's write
lock, and one commit (one WAL append) serves many messages. The caller gets a
``concurrent.futures.Future`` resolved only after the commit: that is the
contract's "store first: ``sent`` only after the commit". What the commit
makes deliverable (inbox entries) is handed, in commit order, to the
``on_commit`` callback given by the app.

Reads run in the caller's thread on its own connection.

Imports: peewee, stdlib, ``imserver.models``, ``imserver.errors``,
``imserver.protocol`` (frame encoding). Never Flask.
"""

import concurrent.futures
import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass
from dataclasses import field

import peewee

from imserver import models
from imserver.errors import BadFrame
from imserver.errors import Forbidden
from imserver.errors import GroupFull
from imserver.errors import ImError
from imserver.errors import Invalid
from imserver.errors import NotFound
from imserver.errors import Unavailable
from imserver.errors import UsernameTaken
from imserver.protocol import encode_entry
from imserver.protocol import encode_message_body
from imserver.protocol import is_text

logger = logging.getLogger(__name__)

_STOP = object()


def now_ms() -> int:
    """Return the time in integer milliseconds since the epoch (``ts``)."""
    return time.time_ns() // 1_000_000


@dataclass
class Stored:
    """A message committed (or found again by its cid)."""

    message: dict
    # JSON of the message, encoded once for every recipient's frame.
    message_json: str
    # False when the cid was seen before: nothing is delivered again.
    new: bool = True
    # (user_id, seq) of every inbox entry the message made.
    entries: list = field(default_factory=list)


class Committer:
    """The process's one writer: group commit of queued operations.

    An operation is a function ``op(conn)`` run inside the batch's
    transaction; it returns ``(result, deliveries)`` where ``deliveries`` is
    a list of ``(user_id, seq, frame)``. It must raise ``ImError`` before it
    writes anything (then only its own future fails); any other exception
    rolls the whole batch back and fails every future in it (the clients
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
        self.batch_started = None
        self.before_commit = None
        # Called with (seconds, ops) after each commit, for metrics.
        self._observe = observe
        # Operations waiting for the writer: (op, future).
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="imserver-committer",
                                        daemon=True)
        self._thread.start()

    def submit(self, op) -> concurrent.futures.Future:
        """Queue ``op`` for the next transaction; its future resolves after commit."""
        future = concurrent.futures.Future()
        self._queue.put((op, future))
        return future

    def run(self, op, timeout: float = 30.0):
        """Run ``op`` in the writer and wait for its committed result."""
        return self.submit(op).result(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Commit everything queued, then stop the thread."""
        self._queue.put((_STOP, None))
        self._thread.join(timeout)

    def _run(self) -> None:
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
        for _, future in batch:
            if not future.done():
                future.set_exception(error)

    def _commit_once(self, batch: list) -> None:
        started = time.monotonic()
        results = []
        deliveries = []
        if self.batch_started is not None:
            self.batch_started()
        if self._db.is_closed():
            self._db.connect()
        with self._db.atomic(*_write_lock(self._db)):
            for op, future in batch:
                if future.cancelled():
                    continue
                try:
                    result, delivered = op(self._db)
                except ImError as exc:
                    results.append((future, None, exc))
                    continue
                results.append((future, result, None))
                if delivered:
                    deliveries.extend(delivered)
            if self.before_commit is not None:
                self.before_commit()
        if self._observe is not None:
            self._observe(time.monotonic() - started, len(batch))
        # Store first: only now, after the commit, answer and deliver.
        for future, result, error in results:
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)
        if deliveries and self._on_commit is not None:
            try:
                self._on_commit(deliveries)
            except Exception:
                logger.exception("delivery after commit failed")


def _write_lock(db) -> tuple:
    """Return ``atomic()`` arguments: SQLite takes its write lock at BEGIN.

    BEGIN IMMEDIATE avoids the deadlock of two processes both upgrading a
    read transaction to a write one on one SQLite file.
    """
    if isinstance(db.obj if isinstance(db, peewee.DatabaseProxy) else db,
                  peewee.SqliteDatabase):
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


class Store:
    """The operations of the contract on the database.

    Reads run in the calling thread; writes are queued to the ``Committer``.
    Users are never deleted, so the ids known to exist are cached.
    """

    def __init__(self, db: peewee.Database, committer: Committer) -> None:
        self.db = db
        self.committer = committer
        # Inbox rows of the batch being written (only the committer touches it).
        self._pending_inbox: list[tuple[int, int, int]] = []
        committer.batch_started = self._pending_inbox.clear
        committer.before_commit = self._write_pending_inbox
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

        Foreign exceptions are translated once, here, so that no caller (the
        WebSocket handler least of all) ever sees a peewee error.
        """
        try:
            with self.db.connection_context():
                yield
        except (peewee.OperationalError, peewee.InterfaceError) as exc:
            logger.warning("database read failed: %s", exc)
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

    def find_user(self, username: str):
        """Return ``(id, username, password_hash, is_admin)`` or None."""
        with self._reading():
            return self._execute(
                "SELECT id, username, password_hash, is_admin FROM users"
                " WHERE username = ?", (username,)).fetchone()

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
        with self._known_lock:
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
             group: int | None = None) -> concurrent.futures.Future:
        """Queue a message for storing; the future gives a ``Stored``.

        Raises at once (before queueing) what can be known without the
        writer: a message to oneself, an unknown user.
        """
        if to is not None:
            if to == sender:
                raise BadFrame("a message to oneself is not allowed")
            if not self.user_exists(to):
                raise NotFound(f"no user {to}")
        return self.committer.submit(
            lambda db: self._store_message(sender, body, cid, to, group))

    def _store_message(self, sender, body, cid, to, group):
        """Run in the committer: store once, one inbox entry per recipient."""
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
        ts = now_ms()
        row = self._execute(
            "INSERT INTO messages (sender_id, recipient_id, group_id, body, ts, cid)"
            " VALUES (?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (sender_id, cid) DO NOTHING RETURNING id",
            (sender, to, group, body, ts, cid),
        ).fetchone()
        if row is None:
            # Idempotent cid: answer the message stored the first time.
            old = self._execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages m"
                " WHERE m.sender_id = ? AND m.cid = ?", (sender, cid)).fetchone()
            message = message_dict(old)
            return Stored(message, encode_message_body(message), new=False), None
        message = message_dict((row[0], sender, to, group, body, ts, cid))
        message_json = encode_message_body(message)
        stored = Stored(message, message_json)
        if not recipients:
            return stored, None
        placeholders = ", ".join("?" * len(recipients))
        seqs = self._execute(
            f"UPDATE users SET last_seq = last_seq + 1 WHERE id IN ({placeholders})"
            " RETURNING id, last_seq", recipients).fetchall()
        # Written once for the whole batch, before the commit.
        self._pending_inbox.extend((user_id, seq, row[0]) for user_id, seq in seqs)
        stored.entries = seqs
        deliveries = [(user_id, seq, encode_entry(seq, message_json))
                      for user_id, seq in seqs]
        return stored, deliveries

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

    def _write_pending_inbox(self) -> None:
        """Run in the committer before each commit: insert the batch's inbox rows."""
        rows = list(self._pending_inbox)
        self._pending_inbox.clear()
        if rows:
            self.db.cursor().executemany(
                self._sql("INSERT INTO inbox (user_id, seq, message_id) VALUES (?, ?, ?)"),
                rows)

    def _write_acks(self, db):
        """Run in the committer: write every gathered ack."""
        with self._acks_lock:
            acks, self._acks = self._acks, {}
        if acks:
            self.db.cursor().executemany(
                self._sql("UPDATE users SET acked_seq = ? WHERE id = ? AND acked_seq < ?"),
                [(seq, user_id, seq) for user_id, seq in acks.items()])
        return None, None

    def cursor(self, user_id: int) -> tuple[int, int]:
        """Return ``(acked_seq, last_seq)`` of ``user_id``."""
        with self._reading():
            row = self._execute("SELECT acked_seq, last_seq FROM users WHERE id = ?",
                                (user_id,)).fetchone()
        return (row[0], row[1]) if row else (0, 0)

    def last_seqs(self, user_ids: list[int]) -> list[tuple[int, int]]:
        """Return ``(user_id, last_seq)`` for each of ``user_ids``."""
        if not user_ids:
            return []
        placeholders = ", ".join("?" * len(user_ids))
        with self._reading():
            return self._execute(
                f"SELECT id, last_seq FROM users WHERE id IN ({placeholders})",
                user_ids).fetchall()

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
        return [(row[0], encode_entry(row[0], encode_message_body(message_dict(row[1:]))))
                for row in rows]

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
        """Return the highest message id stored so far (in the writer)."""
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

    def is_member(self, group_id: int, user_id: int) -> bool | None:
        """Tell whether ``user_id`` is in the group; None if no such group."""
        with self._reading():
            if self._execute("SELECT 1 FROM groups WHERE id = ?",
                             (group_id,)).fetchone() is None:
                return None
            return self._execute(
                "SELECT 1 FROM group_members WHERE group_id = ? AND user_id = ?",
                (group_id, user_id)).fetchone() is not None

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
