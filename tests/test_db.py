"""The schema: created on first start, migrated later without losing data."""

import sqlite3

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
