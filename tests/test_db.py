"""The schema: created on first start, migrated later without losing data."""

import contextlib
import logging
import sqlite3
import threading

import peewee
from playhouse import migrate

from imserver import db
from imserver import models


def test_first_start_creates_the_schema_in_wal_mode(tmp_path):
    """A new SQLite file gets every table, the schema version, and WAL mode."""
    url = "sqlite:///" + str(tmp_path / "new.sqlite3")
    database = db.init_database(url)
    database.close()
    conn = sqlite3.connect(str(tmp_path / "new.sqlite3"))
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"users", "messages", "inbox", "groups", "group_members",
                "schema_version"} <= tables
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [
            (models.SCHEMA_VERSION,)]
    finally:
        conn.close()


def test_a_later_schema_step_keeps_existing_data(tmp_path, monkeypatch):
    """A migration step above the stored version runs once and loses no row."""
    path = tmp_path / "old.sqlite3"
    url = "sqlite:///" + str(path)
    database = db.init_database(url)
    with database.connection_context():
        database.execute_sql(
            "INSERT INTO users (username, password_hash, is_admin, created_at, last_seq,"
            " acked_seq) VALUES ('keep', 'h', 0, 1, 0, 0)")
    database.close()

    def add_column(database):
        migrator = migrate.SqliteMigrator(database)
        migrate.migrate(migrator.add_column(
            "users", "nickname", peewee.CharField(null=True)))

    monkeypatch.setattr(models, "SCHEMA_VERSION", models.SCHEMA_VERSION + 1)
    monkeypatch.setitem(db.MIGRATIONS, models.SCHEMA_VERSION, add_column)
    database = db.init_database(url)
    database.close()
    # Running again finds the step applied and does nothing.
    db.init_database(url).close()
    conn = sqlite3.connect(str(path))
    try:
        assert conn.execute("SELECT username, nickname FROM users").fetchall() == [
            ("keep", None)]
        assert [r[0] for r in conn.execute(
            "SELECT version FROM schema_version ORDER BY version")] == [
            models.SCHEMA_VERSION - 1, models.SCHEMA_VERSION]
    finally:
        conn.close()


def test_the_checkpointer_copies_committed_messages_into_the_database_file(app, tmp_path):
    """Commits go to the WAL; the app's own thread copies them into the main file.

    The writer's connection never checkpoints (``wal_autocheckpoint`` is 0),
    so what reaches the main file got there through the Checkpointer, and a
    reader of the main file alone (``immutable=1`` ignores the WAL) sees it.
    """
    from conftest import T
    from conftest import wait_until

    hub = app.extensions["imserver"]
    store = hub.store
    alice = store.create_user("alice", "!")["id"]
    bob = store.create_user("bob", "!")["id"]
    for n in range(200):
        store.send(alice, f"m{n}", f"c{n}", to=bob).result(T)
    assert store.committer.run(
        lambda conn: (conn.execute_sql("PRAGMA wal_autocheckpoint").fetchone()[0], None)) == 0

    def main_file_messages():
        path = tmp_path / "im.sqlite3"
        conn = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
        try:
            return conn.execute("SELECT count(*) FROM messages").fetchone()[0]
        except sqlite3.DatabaseError:
            return None  # read while a page was being copied: look again
        finally:
            conn.close()

    checkpointer = hub.checkpointer
    wait_until(lambda: main_file_messages() == 200, message="messages in the main file")
    assert checkpointer.runs > 0
    busy, frames, copied = checkpointer.last
    assert frames > 0 and busy == 0


@contextlib.contextmanager
def traced_queries():
    """Yield a list that gets ``(sql, params, thread name)`` of every query run.

    Taken from peewee's query log (``peewee`` logger, DEBUG), in any thread.
    """
    queries = []

    class Capture(logging.Handler):
        def emit(self, record):
            if isinstance(record.msg, tuple):
                queries.append((*record.msg, record.threadName))

    handler = Capture(logging.DEBUG)
    peewee_logger = logging.getLogger("peewee")
    old_level = peewee_logger.level
    peewee_logger.addHandler(handler)
    peewee_logger.setLevel(logging.DEBUG)
    try:
        yield queries
    finally:
        peewee_logger.removeHandler(handler)
        peewee_logger.setLevel(old_level)


def _indexes(conn):
    return {r[0] for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")}


# The indexes of version 1 that version 2 drops: covered by others.
_COVERED = {"message_sender_id", "message_recipient_id", "message_group_id",
            "message_sender_id_recipient_id_id",
            "inbox_user_id", "inbox_message_id", "groupmember_group_id",
            "groupmember_user_id"}


def test_version_2_drops_the_covered_indexes_of_a_version_1_database(tmp_path):
    """An existing database loses only the redundant indexes, and no row."""
    path = tmp_path / "v1.sqlite3"
    db.init_database("sqlite:///" + str(path)).close()
    conn = sqlite3.connect(str(path))
    try:
        # Make it what version 1 created: the foreign keys' own indexes.
        for name in sorted(_COVERED):
            table = {"message": "messages", "inbox": "inbox",
                     "groupmember": "group_members"}[name.split("_")[0]]
            columns = {"message_sender_id_recipient_id_id": "sender_id, recipient_id, id"
                       }.get(name, name.split("_", 1)[1])
            conn.execute(f'CREATE INDEX "{name}" ON "{table}" ({columns})')
        conn.execute("DELETE FROM schema_version")
        conn.execute("INSERT INTO schema_version (version) VALUES (1)")
        conn.execute("INSERT INTO users (username, password_hash, is_admin, created_at,"
                     " last_seq, acked_seq) VALUES ('keep', 'h', 0, 1, 0, 0)")
        conn.commit()
        assert _COVERED <= _indexes(conn)
    finally:
        conn.close()
    db.init_database("sqlite:///" + str(path)).close()
    conn = sqlite3.connect(str(path))
    try:
        assert not _COVERED & _indexes(conn)
        assert {"message_sender_id_cid", "message_group_id_id",
                "groupmember_user_id_group_id"} <= _indexes(conn)
        assert conn.execute("SELECT username FROM users").fetchall() == [("keep",)]
        assert [r[0] for r in conn.execute(
            "SELECT version FROM schema_version ORDER BY version")] == [1, 2]
    finally:
        conn.close()


def test_every_query_of_the_message_path_reads_through_an_index(app):
    """With the version 2 indexes, no query the app runs scans a whole table.

    Every statement the store runs, in any thread, is taken from peewee's
    query log, then each one that reads rows is explained: a plan that
    reads all of messages, inbox, group_members or users would grow with
    the data.
    """
    from conftest import T

    hub = app.extensions["imserver"]
    store = hub.store
    with traced_queries() as traced:
        alice, bob, carol = (store.create_user(n, "!")["id"] for n in ("a", "b", "c"))
        group = store.create_group(alice, "g", [bob], 500)["id"]
        store.send(alice, "hi", "1", to=bob).result(T)
        store.send(alice, "hi", "1", to=bob).result(T)  # a repeated cid
        store.send(alice, "all", "2", group=group).result(T)
        # One batch in which bob gets two entries and carol one (the writer
        # is held while they are queued): seqs by a join, not by one count.
        held, release = threading.Event(), threading.Event()
        store.committer.submit(lambda conn: (held.set(), release.wait(T), (None, None))[-1])
        assert held.wait(T)
        batch = [store.send(alice, "x", f"x{i}", to=to) for i, to in enumerate((bob, bob, carol))]
        release.set()
        assert [p.result(T).entries for p in batch] == [[(bob, 3)], [(bob, 4)], [(carol, 1)]]
        store.ack(bob, 2)
        store.add_member(group, alice, carol, 500)
        store.remove_member(group, alice, carol)
        store.entries_after(bob, 0, 100)
        store.history_direct(alice, bob, None, 50)
        store.history_group(group, None, 50, member=bob)
        store.groups_of(bob)
        store.is_member(group, bob)
        store.last_seqs([alice, bob])
        store.cursor(bob)
        store.committer.run(lambda conn: (None, None))  # the acks are written
    reading = [(sql, params) for sql, params, _ in traced
               if sql.split(None, 1)[0].upper() in ("SELECT", "UPDATE", "DELETE", "WITH")]
    queried = " ".join(sql for sql, _ in reading)
    for needed in ("FROM inbox i", "m.recipient_id = ?", "m.group_id = ?",
                   "FROM group_members WHERE user_id", "acked_seq = a.seq",
                   "last_seq = last_seq + ?", "last_seq = users.last_seq + c.n"):
        assert needed in queried, f"no query with {needed!r} was traced"
    with store.db.connection_context():
        for sql, params in reading:
            plan = " | ".join(row[3] for row in store.db.execute_sql(
                "EXPLAIN QUERY PLAN " + sql, params))
            assert not any(f"SCAN {name}" in plan for name in (
                "messages", "inbox", "group_members", "users", "m", "i")), (sql, plan)


def test_a_connections_reads_run_on_the_reader_threads(live_server):
    """Connecting and replaying read the database on the store's reader threads.

    A connection's own thread lives as long as the connection and keeps the
    stack pages its deepest call touched; SQLite's calls are the deepest, so
    they run on the few ``imserver-read`` threads instead.
    """
    alice, bob = live_server.user(), live_server.user()
    a = alice.connect()
    a.send_to(bob.id, "while you were away", cid="c1")
    assert a.recv_type("sent")["cid"] == "c1"
    a.close()
    with traced_queries() as traced:
        b = bob.connect()
        assert b.recv_type("message")["body"] == "while you were away"
        b.close()
    seen = [(sql, thread) for sql, _, thread in traced if sql.startswith("SELECT")]
    assert any("acked_seq" in sql for sql, _ in seen), seen  # the cursor
    assert any("FROM inbox" in sql for sql, _ in seen), seen  # the replay
    assert all(thread.startswith("imserver-read") for _, thread in seen), seen


def test_a_reader_whose_connection_broke_opens_a_new_one(pg_url):
    """The readers keep their PostgreSQL connections; when the server drops
    them, each reader answers one read with ``Unavailable`` and the next
    reads work again on a new connection."""
    import psycopg

    from imserver.errors import Unavailable
    from imserver.store import Committer
    from imserver.store import Store

    database = db.init_database(pg_url)
    committer = Committer(database)
    store = Store(database, committer, readers=2)
    try:
        alice = store.create_user("alice", "!")["id"]
        assert store.cursor(alice) == (0, 0)
        name = pg_url.rpartition("/")[2]
        with psycopg.connect(pg_url, autocommit=True) as conn:
            killed = conn.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()", (name,)).fetchone()[0]
        assert killed >= 1
        failures = 0
        for _ in range(3):  # each of the 2 readers may fail once
            try:
                store.cursor(alice)
            except Unavailable:
                failures += 1
        assert failures <= 2
        for _ in range(5):
            assert store.cursor(alice) == (0, 0)
    finally:
        store.close()
        committer.stop()
        database.close()
        if hasattr(database, "close_all"):
            database.close_all()
        models.database.initialize(None)
