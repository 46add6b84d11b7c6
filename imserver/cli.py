"""The ``imserver`` command, on Flask's click-based CLI.

``imserver serve`` runs the server under gunicorn with gthread workers;
``imserver run``/``routes``/``shell`` are Flask's own; ``imserver init-db``
creates or migrates the schema; ``imserver admin grant USER`` sets the
admin flag; ``imserver chat`` is the terminal client.
"""

import logging
import os
import sys

import click
from flask import current_app
from flask.cli import FlaskGroup

from imserver.chat_client import chat_command


def _create_app():
    from imserver import create_app

    return create_app()


@click.group(cls=FlaskGroup, create_app=_create_app)
def cli():
    """imserver: a WebSocket instant-messaging server."""


# glibc's per-thread cache of freed blocks (tcache, up to 7 blocks of each
# size up to 1 KiB) stays with the thread that freed them: a WebSocket thread
# handles its handshake, then blocks for hours holding some 28 KB of freed
# blocks nobody else can use (measured: 87 -> 59 KB RSS per idle connection).
# glibc reads its tunables only when a process starts, so ``serve`` re-executes
# itself once with the cache off; IMSERVER_MALLOC_TCACHE=1 keeps it.
_TCACHE_TUNABLE = "glibc.malloc.tcache_count"


def _reexec_without_tcache() -> None:
    """Re-execute this process with glibc's tcache off (Linux glibc only)."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if (_TCACHE_TUNABLE in tunables or os.environ.get("IMSERVER_MALLOC_TCACHE") == "1"
            or not sys.platform.startswith("linux")
            or os.confstr("CS_GNU_LIBC_VERSION") is None
            or not getattr(sys, "orig_argv", None)):
        return
    os.environ["GLIBC_TUNABLES"] = ":".join(
        t for t in (tunables, f"{_TCACHE_TUNABLE}=0") if t)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(sys.executable, sys.orig_argv)
    except OSError as exc:  # run on with the tcache, rather than not at all
        logging.getLogger(__name__).warning("re-exec without tcache failed: %r", exc)


@cli.command("serve", with_appcontext=False)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=5000, show_default=True, type=int, help="Port to bind.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64),
              help="gunicorn worker processes (more than 1 needs IMSERVER_REDIS_URL).")
@click.option("--threads", default=2000, show_default=True, type=click.IntRange(1, 30000),
              help="Threads per worker: each open WebSocket holds one.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def serve(host, port, workers, threads, log_level):
    """Run the server under gunicorn with gthread workers."""
    if workers > 1 and not os.environ.get("IMSERVER_REDIS_URL"):
        raise click.UsageError(
            "several workers need IMSERVER_REDIS_URL: each worker holds its own "
            "connections, and without Redis a message to a user connected to "
            "another worker would only arrive when that user reconnects. "
            "Set IMSERVER_REDIS_URL=redis://host:6379/0 or use --workers 1.")
    _reexec_without_tcache()
    from gunicorn.app.base import BaseApplication

    # Keep room for HTTP calls among the threads (each WebSocket holds one).
    os.environ.setdefault("IMSERVER_MAX_CONNECTIONS", str(max(1, threads - 50)))
    # Metrics of all workers, added up by whichever answers /metrics.
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        import tempfile

        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="imserver-metrics-")

    from imserver import gunicorn_conf

    class Server(BaseApplication):
        def load_config(self):
            for name in ("worker_class", "keepalive", "timeout", "graceful_timeout",
                         "backlog", "post_fork", "post_worker_init", "child_exit"):
                self.cfg.set(name, getattr(gunicorn_conf, name))
            self.cfg.set("bind", [f"{host}:{port}"])
            self.cfg.set("workers", workers)
            self.cfg.set("threads", threads)
            self.cfg.set("worker_connections", threads + 1000)
            self.cfg.set("loglevel", log_level)
            self.cfg.set("accesslog", None)
            # gunicorn >= 25.1 opens a control socket at one fixed path per
            # user (~/.gunicorn/gunicorn.ctl): several servers on a host would
            # take it from each other, and stopping one removes another's.
            if "control_socket_disable" in self.cfg.settings:
                self.cfg.set("control_socket_disable", True)

        def load(self):
            from imserver import create_app

            return create_app()

    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    Server().run()


@cli.command("init-db")
def init_db():
    """Create the tables, or migrate them to the current schema."""
    click.echo(f"database ready: {current_app.config['DATABASE_URL'] or 'instance SQLite'}")


@cli.group("admin")
def admin():
    """Administer users."""


def _set_admin(username: str, is_admin: bool, done: str) -> None:
    """Set the admin flag of ``username``; exit 1 if there is no such user."""
    if not current_app.extensions["imserver"].store.set_admin(username, is_admin):
        click.echo(f"no user {username!r}", err=True)
        sys.exit(1)
    click.echo(done)


@admin.command("grant")
@click.argument("username")
def admin_grant(username):
    """Give USERNAME the admin flag."""
    _set_admin(username, True, f"{username} is an admin")


@admin.command("revoke")
@click.argument("username")
def admin_revoke(username):
    """Take the admin flag from USERNAME."""
    _set_admin(username, False, f"{username} is no longer an admin")


cli.add_command(chat_command)


def main():
    """Entry point of the ``imserver`` console script."""
    cli()
