"""Point the models at the configured database and keep its schema current.

``DATABASE_URL`` is any peewee database URL (``sqlite:///path``,
``postgresql://user@host/db``, pooled automatically); unset, it is SQLite in
the instance folder.
SQLite runs in WAL mode with ``synchronous=NORMAL``: a commit is appended to
the WAL file before ``sent`` is answered, so a ``kill -9`` of the server
loses nothing acknowledged (only an OS crash or power cut could lose the
last commits; ``IMSERVER_DATABASE_URL=sqlite:///...?synchronous=full``
buys that too, at one fsync per commit).

Checkpoints (copying the WAL back into the database file) are not left to
the committing connection: SQLite's automatic checkpoint would run inside
the writer's ``COMMIT``, holding up every write of every worker meanwhile.
``wal_autocheckpoint`` is 0 and the app's ``Checkpointer`` thread runs a
``PASSIVE`` checkpoint on its own connection after commits (at most every
``CHECKPOINT_GAP`` seconds), which takes no write lock, so the writers go on
while it copies and syncs. ``journal_size_limit`` gives the WAL file's space
back after a burst.

Schema: ``init_schema`` creates the tables on first start and then runs the
steps of ``MIGRATIONS`` above the database's stored version, each in a
transaction, so a later change adds a step instead of losing data.

Imports: peewee, playhouse, ``imserver.models``.
"""

import logging
import os
import threading
import time

import peewee
from playhouse import db_url

from imserver import models

logger = logging.getLogger(__name__)

# version -> function(database) that moves the schema from version-1 to it.
MIGRATIONS: dict = {}


def _drop_covered_indexes(database: peewee.Database) -> None:
    """Version 2: drop the indexes that other indexes cover.

    The foreign keys' own indexes (composite ones start with those columns),
    and (sender, recipient, id): direct history reads both directions of a
    conversation through (recipient, sender, id).
    """
    for name in ("message_sender_id", "message_recipient_id", "message_group_id",
                 "message_sender_id_recipient_id_id",
                 "inbox_user_id", "inbox_message_id", "groupmember_group_id",
                 "groupmember_user_id"):
        database.execute_sql(f'DROP INDEX IF EXISTS "{name}"')


MIGRATIONS[2] = _drop_covered_indexes

SQLITE_PRAGMAS = {
    "journal_mode": "wal",
    "synchronous": "normal",
    "foreign_keys": 1,
    "busy_timeout": 10000,
    "cache_size": -16000,
    # Checkpoints run in the Checkpointer thread, not in the writer's COMMIT.
    "wal_autocheckpoint": 0,
    # Bytes of WAL file kept after a checkpoint lets it start over.
    "journal_size_limit": 64 * 1024 * 1024,
}

# Seconds between checkpoints while commits keep coming.
CHECKPOINT_GAP = 0.25

# PostgreSQL advisory lock keys (transaction-scoped): the schema's creation
# by the first worker to start, and the writers' turn (``store.Committer``).
SCHEMA_LOCK = 4242001
WRITER_LOCK = 4242002


def default_url(instance_path: str) -> str:
    """Return the URL of the default SQLite file in the instance folder."""
    os.makedirs(instance_path, exist_ok=True)
    return "sqlite:///" + os.path.join(instance_path, "imserver.sqlite3")


def open_database(url: str) -> peewee.Database:
    """Open a peewee database from a URL, SQLite with our pragmas."""
    if url.startswith("sqlite"):
        return db_url.connect(url, pragmas=dict(SQLITE_PRAGMAS), timeout=10)
    scheme, sep, rest = url.partition("://")
    if scheme in ("postgres", "postgresql"):
        # A WebSocket thread lives for hours and reads now and then: lend it
        # a pooled connection per unit of work instead of one per thread.
        return db_url.connect(f"{scheme}+pool{sep}{rest}", max_connections=32,
                              stale_timeout=300, timeout=10)
    return db_url.connect(url)


def is_sqlite(database) -> bool:
    """Tell whether ``database`` (or the database a proxy points at) is SQLite."""
    if isinstance(database, peewee.DatabaseProxy):
        database = database.obj
    return isinstance(database, peewee.SqliteDatabase)


class Checkpointer:
    """Copies SQLite's WAL into the database file, off the writer's path.

    ``wake()`` after a commit; the thread runs ``PRAGMA
    wal_checkpoint(PASSIVE)`` on its own connection, at most once every
    ``gap`` seconds. A passive checkpoint waits for no reader or writer:
    it copies what is committed and not in use, and the next write after a
    complete one starts the WAL over.
    """

    def __init__(self, database: peewee.Database, gap: float = CHECKPOINT_GAP) -> None:
        self._db = database
        self._gap = gap
        self._wake = threading.Event()
        self._stop = threading.Event()
        # How many checkpoints ran, and the last one's (busy, wal frames,
        # frames copied): for tests and logs.
        self.runs = 0
        self.last = None
        self._thread = threading.Thread(target=self._run, name="imserver-checkpoint",
                                        daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Ask for a checkpoint (called after each commit)."""
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread (closing the last connection checkpoints anyway)."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def checkpoint(self) -> tuple:
        """Run one passive checkpoint now; return (busy, wal frames, copied).

        The calling thread's connection is kept for the next one (opening
        one costs more than an idle checkpoint); a failure closes it.
        """
        try:
            self._db.connect(reuse_if_open=True)
            row = self._db.execute_sql("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except Exception:
            self._close_quietly()
            raise
        self.runs += 1
        self.last = tuple(row)
        return self.last

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            try:
                self.checkpoint()
            except Exception as exc:
                # Never fatal to the thread: the WAL only grows until the
                # next checkpoint succeeds.
                logger.warning("checkpoint failed: %r", exc)
            if self._stop.wait(self._gap):
                self._close_quietly()
                return

    def _close_quietly(self) -> None:
        try:
            self._db.close()
        except Exception:
            pass


def init_database(url: str, wait: bool = True) -> peewee.Database:
    """Open the database, bind the models to it and bring the schema up to date.

    With ``wait=False`` an unreachable database does not stop the start: the
    error is logged, the schema is set up in the background as soon as the
    database answers, and meanwhile ``/healthz`` answers 503 and every call
    that needs the database gets 503.
    """
    database = open_database(url)
    models.database.initialize(database)
    # Set once the tables are in place: until then the database may answer
    # and still serve nothing, so /healthz says 503.
    database.schema_ready = threading.Event()
    try:
        init_schema(database)
        database.schema_ready.set()
    except peewee.OperationalError as exc:
        if wait:
            raise
        logger.error("database unreachable at start (%s); retrying in the background",
                     exc)
        threading.Thread(target=_init_later, args=(database,), daemon=True,
                         name="imserver-db-init").start()
    return database


def _init_later(database: peewee.Database) -> None:
    delay = 0.5
    while True:
        time.sleep(delay)
        try:
            init_schema(database, attempts=1)
        except peewee.OperationalError as exc:
            logger.warning("database still unreachable: %s", exc)
            delay = min(delay * 2, 10.0)
        else:
            database.schema_ready.set()
            logger.info("database reachable: schema ready")
            return


def init_schema(database: peewee.Database, attempts: int = 5) -> None:
    """Create the tables if missing, then apply migrations above the stored version."""
    for attempt in range(attempts):
        try:
            with database.connection_context():
                with database.atomic():
                    if isinstance(database, peewee.PostgresqlDatabase):
                        # Several workers may start at once: one creates.
                        database.execute_sql(f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK})")
                    _create_or_migrate(database)
            return
        except peewee.OperationalError as exc:
            if attempt == attempts - 1:
                raise
            logger.warning("schema setup retried: %s", exc)
            time.sleep(0.2 * (attempt + 1))


def _create_or_migrate(database: peewee.Database) -> None:
    if not database.table_exists(models.SchemaVersion._meta.table_name):
        database.create_tables(models.MODELS, safe=True)
        models.SchemaVersion.create(version=models.SCHEMA_VERSION)
        logger.info("created schema version %s", models.SCHEMA_VERSION)
        return
    row = models.SchemaVersion.select().order_by(models.SchemaVersion.version.desc()).first()
    version = row.version if row else 0
    for step in range(version + 1, models.SCHEMA_VERSION + 1):
        logger.info("migrating schema to version %s", step)
        MIGRATIONS[step](database)
        models.SchemaVersion.create(version=step)
