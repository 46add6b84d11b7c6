"""Point the models at the configured database and keep its schema current.

``DATABASE_URL`` is any peewee database URL (``sqlite:///path``,
``postgresql://user@host/db``, pooled automatically); unset, it is SQLite in
the instance folder.
SQLite runs in WAL mode with ``synchronous=NORMAL``: a commit is appended to
the WAL file before ``sent`` is answered, so a ``kill -9`` of the server
loses nothing acknowledged (only an OS crash or power cut could lose the
last commits; ``IMSERVER_DATABASE_URL=sqlite:///...?synchronous=full``
buys that too, at one fsync per commit).

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

SQLITE_PRAGMAS = {
    "journal_mode": "wal",
    "synchronous": "normal",
    "foreign_keys": 1,
    "busy_timeout": 10000,
    "cache_size": -16000,
}


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
                        database.execute_sql("SELECT pg_advisory_xact_lock(4242001)")
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
