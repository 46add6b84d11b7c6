"""Fixtures: an app on a SQLite file, a live server, real WebSocket clients.

Everything runs for real: ``live_server`` serves the app on 127.0.0.1 with
werkzeug's threaded server (already listening when it returns), clients are
``websockets.sync.client`` over real sockets, and the database is a SQLite
file under ``tmp_path``. Tests synchronise on what a client observes (a
frame, a close code) or poll with one deadline (``wait_until``), never on
sleeps. ``T`` is the one time unit, scaled by ``TESTS_TIMEOUT_FACTOR``.
"""

import itertools
import json
import os
import threading
import time
import urllib.error
import urllib.request

import pytest
from websockets.sync.client import connect as ws_connect
from werkzeug.serving import make_server

from imserver import create_app

T = 5.0 * float(os.environ.get("TESTS_TIMEOUT_FACTOR", "1"))

_names = itertools.count(1)


def wait_until(predicate, timeout: float = T, message: str = "condition"):
    """Poll ``predicate`` until it is true, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {message}")
        time.sleep(0.01)


def base_config(tmp_path, **overrides) -> dict:
    """Return a test configuration on a SQLite file under ``tmp_path``."""
    config = {
        "TESTING": True,
        "SECRET_KEY": "test-secret",
        "DATABASE_URL": "sqlite:///" + str(tmp_path / "im.sqlite3"),
        "RATE_LIMIT": 1000,
        "RATE_BURST": 1000,
        "AUTH_RATE_LIMIT": 10000,
        "AUTH_RATE_BURST": 10000,
    }
    config.update(overrides)
    return config


@pytest.fixture
def config_overrides():
    """Settings a test module overrides (redefine this fixture)."""
    return {}


@pytest.fixture
def app(tmp_path, config_overrides):
    app = create_app(base_config(tmp_path, **config_overrides),
                     instance_path=str(tmp_path / "instance"))
    yield app
    app.extensions["imserver"].shutdown()


@pytest.fixture
def client(app):
    return app.test_client()


class LiveServer:
    """A live app on 127.0.0.1 and helpers that speak the contract to it."""

    def __init__(self, app):
        self.app = app
        self.hub = app.extensions["imserver"]
        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.port = self.server.server_port
        self.url = f"http://127.0.0.1:{self.port}"
        # A short poll interval makes shutdown() (teardown) quick.
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.thread.join(T)

    # -- HTTP -----------------------------------------------------------------

    def request(self, method, path, body=None, token=None, raw=None, headers=None):
        """Return ``(status, decoded JSON or None)`` of one HTTP call."""
        data = raw if raw is not None else (
            json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        for key, value in (headers or {}).items():
            req.add_header(key, value)
        try:
            with urllib.request.urlopen(req, timeout=T) as resp:
                payload = resp.read()
                status = resp.status
        except urllib.error.HTTPError as exc:
            payload = exc.read()
            status = exc.code
        return status, (json.loads(payload) if payload else None)

    def user(self, name=None, password="password123"):
        """Register a user and log in; return ``User(id, name, token)``."""
        name = name or f"user{next(_names)}"
        status, body = self.request("POST", "/api/users",
                                    {"username": name, "password": password})
        assert status == 201, body
        status, tok = self.request("POST", "/api/tokens",
                                   {"username": name, "password": password})
        assert status == 200, tok
        return User(body["id"], name, tok["token"], self)

    # -- WebSocket --------------------------------------------------------------

    def ws_url(self, token):
        return f"ws://127.0.0.1:{self.port}/ws?token={token}"


class User:
    """A registered user of a live server."""

    def __init__(self, id, name, token, server):
        self.id, self.name, self.token, self.server = id, name, token, server

    def connect(self, ready=True, **kwargs):
        """Open a WebSocket; by default wait for and check ``ready``."""
        kwargs.setdefault("open_timeout", T)
        kwargs.setdefault("close_timeout", T)
        kwargs.setdefault("compression", None)
        kwargs.setdefault("legacy", True)
        ws = Client(ws_connect(self.server.ws_url(self.token), **kwargs))
        if ready:
            assert ws.recv() == {"type": "ready", "user_id": self.id}
        return ws


class Client:
    """A WebSocket client that sends and receives JSON frames."""

    def __init__(self, ws):
        self.ws = ws
        self._cids = itertools.count(1)

    def send(self, frame):
        self.ws.send(frame if isinstance(frame, (str, bytes)) else json.dumps(frame))

    def recv(self, timeout=T):
        return json.loads(self.ws.recv(timeout=timeout))

    def send_to(self, to=None, body="hi", cid=None, group=None):
        """Send a message frame; return its cid."""
        cid = cid or f"c{next(self._cids)}"
        frame = {"type": "send", "cid": cid, "body": body}
        if group is not None:
            frame["group"] = group
        else:
            frame["to"] = to
        self.send(frame)
        return cid

    def recv_type(self, kind, timeout=T):
        """Receive frames until one of ``kind``; fail on anything else."""
        frame = self.recv(timeout)
        assert frame["type"] == kind, frame
        return frame

    def close(self):
        self.ws.close()

    def __getattr__(self, name):
        return getattr(self.ws, name)


@pytest.fixture
def live_server(app):
    server = LiveServer(app)
    yield server
    server.stop()


class RawClient:
    """A WebSocket client on a bare socket that never answers pings.

    It does the opening handshake by hand and then only does what the test
    tells it: the silent or broken client real servers meet.
    """

    def __init__(self, port, token, timeout=T, rcvbuf=None):
        import base64
        import socket

        self.sock = socket.socket()
        self.sock.settimeout(timeout)
        if rcvbuf:
            # Before connecting, so that the TCP window never grows past it.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (f"GET /ws?token={token} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
             "Upgrade: websocket\r\nConnection: Upgrade\r\n"
             f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                break
            self.buf += chunk
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        self.status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        self.status = int(head.split()[1]) if head else 0

    def _need(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("connection closed")
            self.buf += chunk

    def read_frame(self):
        """Return ``(opcode, payload)`` of the next frame."""
        self._need(2)
        assert not self.buf[1] & 0x80, "a server frame must not be masked"
        opcode, length = self.buf[0] & 0x0F, self.buf[1] & 0x7F
        offset = 2
        if length == 126:
            self._need(4)
            length, offset = int.from_bytes(self.buf[2:4], "big"), 4
        elif length == 127:
            self._need(10)
            length, offset = int.from_bytes(self.buf[2:10], "big"), 10
        self._need(offset + length)
        payload = self.buf[offset:offset + length]
        self.buf = self.buf[offset + length:]
        return opcode, payload

    def send_frame(self, payload: bytes, opcode=0x1):
        """Send one masked frame (clients must mask)."""
        self.sock.sendall(self.frame(payload, opcode))

    @staticmethod
    def frame(payload: bytes, opcode=0x1) -> bytes:
        """Return one masked frame, to send several in one write."""
        mask = os.urandom(4)
        header = bytes([0x80 | opcode])
        n = len(payload)
        if n < 126:
            header += bytes([0x80 | n])
        elif n < 65536:
            header += bytes([0x80 | 126]) + n.to_bytes(2, "big")
        else:
            header += bytes([0x80 | 127]) + n.to_bytes(8, "big")
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return header + mask + masked

    def read_until_closed(self):
        """Read frames until the server ends the connection; return the opcodes."""
        opcodes = []
        try:
            while True:
                opcode, _ = self.read_frame()
                opcodes.append(opcode)
        except (EOFError, ConnectionResetError):
            return opcodes

    def close(self):
        self.sock.close()


# -- services: PostgreSQL and Redis -------------------------------------------------

PG_ADMIN_URL = os.environ.get("IMSERVER_TEST_PG_URL",
                              "postgresql://postgres@127.0.0.1:5432/test")
REDIS_TEST_URL = os.environ.get("IMSERVER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def service_missing(name: str, error: Exception):
    """Skip with the reason, or fail where services are required (CI)."""
    reason = f"{name} is not reachable ({error.__class__.__name__}: {error})"
    if os.environ.get("IMSERVER_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason}; IMSERVER_REQUIRE_SERVICES=1 requires it")
    pytest.skip(f"{reason}; start it or set IMSERVER_TEST_PG_URL / IMSERVER_TEST_REDIS_URL")


@pytest.fixture
def pg_url():
    """A fresh PostgreSQL database of our own for one test, dropped after it."""
    try:
        import psycopg

        admin = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5)
    except Exception as exc:
        service_missing("PostgreSQL", exc)
    name = "imserver_test_" + os.urandom(6).hex()
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = PG_ADMIN_URL.rpartition("/")
    yield f"{base}/{name}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def redis_url():
    """``(url, prefix)``: the shared Redis with a key prefix of our own, cleaned after."""
    try:
        import redis

        client = redis.Redis.from_url(REDIS_TEST_URL, socket_connect_timeout=5)
        client.ping()
    except Exception as exc:
        service_missing("Redis", exc)
    prefix = "imserver-test-" + os.urandom(6).hex() + ":"
    yield REDIS_TEST_URL, prefix
    keys = list(client.scan_iter(match=prefix + "*"))
    if keys:
        client.delete(*keys)
    client.close()


class OwnRedis:
    """A private redis-server on a free port, for tests that stop and restart it."""

    def __init__(self, tmp_path):
        import shutil
        import socket
        import subprocess

        binary = shutil.which("redis-server")
        if binary is None:
            service_missing("redis-server", FileNotFoundError("redis-server"))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1",
                      "--save", "", "--appendonly", "no", "--dir", str(tmp_path)]
        self._subprocess = subprocess
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = None
        self.start()

    def start(self):
        import redis

        self.proc = self._subprocess.Popen(self._argv, stdout=self._subprocess.DEVNULL,
                                           stderr=self._subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)

        def answers():
            try:
                return client.ping()
            except redis.RedisError:
                return False

        wait_until(answers, message="own redis-server up")
        client.close()

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(T)
        self.proc = None


@pytest.fixture
def own_redis(tmp_path):
    server = OwnRedis(tmp_path)
    yield server
    server.stop()
