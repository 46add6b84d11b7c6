"""imserver: a WebSocket instant-messaging server, after the Go ConnManager design.

``create_app`` is the application factory, for ``flask --app imserver``,
``gunicorn -k gthread 'imserver:create_app()'`` and the tests.
"""

import atexit
import concurrent.futures
import logging
import os
import re

import peewee
from flask import Flask
from flask import g
from flask import request
from flask import send_from_directory
from werkzeug.exceptions import HTTPException

from imserver.config import DEFAULTS
from imserver.errors import ImError
from imserver.errors import Unavailable

logger = logging.getLogger(__name__)

# HTTP statuses werkzeug raises itself, as contract codes.
_HTTP_CODES = {400: "invalid", 401: "unauthorized", 403: "forbidden",
               404: "not_found", 405: "invalid", 409: "conflict", 413: "too_large",
               429: "rate_limited"}


class _RedactTokens(logging.Filter):
    """Hide ``token=...`` in request lines that servers log (the /ws URL)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            record.args = tuple(_TOKEN_RE.sub(r"\1[redacted]", a) if isinstance(a, str)
                                else a for a in record.args)
        if isinstance(record.msg, str):
            record.msg = _TOKEN_RE.sub(r"\1[redacted]", record.msg)
        return True


_TOKEN_RE = re.compile(r"(token=)[^&\s\"]+")


def _redact_tokens_in_access_logs() -> None:
    for name in ("werkzeug", "gunicorn.access"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _RedactTokens) for f in log.filters):
            log.addFilter(_RedactTokens())


def create_app(test_config: dict | None = None, instance_path: str | None = None) -> Flask:
    """Create and configure an imserver app, and start its threads.

    ``instance_path`` overrides Flask's instance folder (the SQLite file and
    the generated secret key live there).
    """
    app = Flask(__name__, instance_path=instance_path, instance_relative_config=True,
                static_folder="static")
    # "//" in a path is a 404 in the JSON envelope, not an HTML 308 redirect.
    app.url_map.merge_slashes = False

    # 1. Configuration: the contract's defaults, then IMSERVER_* variables
    #    (values pass through json.loads: IMSERVER_RATE_LIMIT=20 is an int),
    #    then what a test passes in.
    app.config.from_mapping(DEFAULTS)
    app.config.from_prefixed_env("IMSERVER")
    if test_config is not None:
        app.config.from_mapping(test_config)
    os.makedirs(app.instance_path, exist_ok=True)
    if app.config["MAX_CONNECTIONS"] is None:
        app.config["MAX_CONNECTIONS"] = 10_000
    if app.config["PROXY_COUNT"]:
        # Behind reverse proxies: take the client's address from
        # X-Forwarded-For, trusting only as many hops as there are proxies.
        from werkzeug.middleware.proxy_fix import ProxyFix

        n = int(app.config["PROXY_COUNT"])
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=n, x_proto=n, x_host=n)
    _redact_tokens_in_access_logs()

    # 2. The signing key of tokens: configured, or kept in the instance folder.
    if not app.config["SECRET_KEY"]:
        from imserver.auth import load_secret_key

        app.config["SECRET_KEY"] = load_secret_key(app.instance_path)

    # 3. The database: SQLite in the instance folder unless DATABASE_URL says
    #    otherwise; tables are created (or migrated) on first start.
    from imserver import db

    url = app.config["DATABASE_URL"] or db.default_url(app.instance_path)
    database = db.init_database(url, wait=bool(app.config.get("TESTING")))

    # 4. The Hub: ConnManager, the writer, the broker, the heartbeat.
    from imserver.hub import Hub

    hub = Hub(app.config, database)
    app.extensions["imserver"] = hub
    atexit.register(hub.shutdown)

    # 5. The views: HTTP blueprints and the WebSocket.
    from imserver import accounts
    from imserver import admin
    from imserver import groups
    from imserver import messages
    from imserver import ops
    from imserver import ws

    app.register_blueprint(accounts.bp)
    app.register_blueprint(admin.bp)
    app.register_blueprint(groups.bp)
    app.register_blueprint(messages.bp)
    app.register_blueprint(ops.bp)
    ws.init_app(app)

    @app.get("/")
    def index():
        """Serve the web client."""
        return send_from_directory(app.static_folder, "index.html")

    # 6. Errors: every refusal in the contract's envelope, never HTML.
    @app.errorhandler(ImError)
    def handle_im_error(error: ImError):
        # Who and why, never the body or the query (a token may be there).
        logger.info("refused %s %s status=%s code=%s user_id=%s addr=%s",
                    request.method, request.path, error.status, error.code,
                    g.get("user_id"), request.remote_addr)
        return error.to_dict(), error.status

    @app.errorhandler(HTTPException)
    def handle_http_error(error: HTTPException):
        code = _HTTP_CODES.get(error.code, "invalid" if error.code < 500 else "internal")
        body = {"error": {"code": code, "message": error.description or error.name}}
        return body, error.code

    @app.errorhandler(peewee.OperationalError)
    @app.errorhandler(peewee.InterfaceError)
    def handle_database_down(error):
        logger.warning("database unavailable: %s", error)
        return Unavailable("the database is unavailable, try again").to_dict(), 503

    @app.errorhandler(concurrent.futures.TimeoutError)
    def handle_timeout(error):
        return Unavailable("the server is busy, try again").to_dict(), 503

    @app.errorhandler(Exception)
    def handle_crash(error: Exception):
        logger.exception("request failed")
        return {"error": {"code": "internal", "message": "internal error"}}, 500

    return app
