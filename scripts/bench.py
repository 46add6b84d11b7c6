"""Benchmark of imserver (issue 6): a load generator and its report.

Runs as its own process. It starts the servers itself on 127.0.0.1 (imserver
with ``imserver serve`` on a fresh SQLite file in a temporary folder, and the
baseline ``scripts/bare_relay.py`` under gunicorn), pins each server to core
0 with ``taskset -c 0`` and itself to core 1 (``os.sched_setaffinity``, before
any thread starts), registers its users, opens real WebSockets (many
connections in one asyncio event loop, no compression; see ``--client``
below) and speaks the contract (``docs/protocol.md``). Every scenario runs
against the bare relay first and imserver next, each on a fresh server, so
each imserver figure is also printed as a ratio to the bare transport of
the same run. The bench prints its own CPU use (``getrusage``), the
servers' CPU use (``/proc/<pid>/stat`` of the server's processes) and how
busy each core was (``/proc/stat``: every process of the machine) for every
measured phase, so a saturated generator is visible (near 100 % of its core
means the figure is the generator's, not the server's), and so is a machine
shared with other work (the server's core busy well beyond the server's own
share). ``--quiet-wait S`` waits up to S seconds for idle cores before each
measurement. The servers are stopped by the pid the bench started (SIGTERM,
then SIGKILL of their own process group), never by name.

Scenarios (each bounded in time):

- ``pairs``: P sender/receiver pairs, each sender with at most W ``send``
  frames waiting for their ``sent`` (each ``sent`` releases the next
  ``send``); the receivers ack cumulatively (every 10 messages or 50 ms).
  Messages received a second within the measured window (``--duration``,
  after ``--warmup``): on imserver a message is stored before it is
  delivered, and each is acked by its receiver. End-to-end latency (receive
  time minus the send time carried in the body) p50/p99, and
  send-to-``sent``; dense seqs, losses and error frames are checked.
- ``fanout``: one group of G members plus the sender, all online; the sender
  sends M messages (at most W waiting for ``sent``); deliveries a second and
  p50/p99 of the time until the last member has each message.
- ``idle``: C idle connections held for ``--idle-hold`` seconds with the
  server's heartbeat running (``IMSERVER_PING_INTERVAL=--idle-ping-interval``;
  the client answers pings); how many stayed up, server RSS per connection
  (sum of VmRSS of the server's processes, before and after opening the
  connections), server threads; then a burst: every connection sends
  ``ping`` at once, and the time until all have their ``pong``.
- ``offline``: K messages to an offline user, then it connects: the time
  until all K are replayed (from the start of the connect, and from
  ``ready``). The bare relay keeps such entries in a list in memory and
  writes them after ``ready``: its figure is the transport's.
- ``workers``: ``pairs`` against ``imserver serve --workers 1`` and
  ``--workers 2`` (Redis at ``--redis-url``, a unique key prefix, cleaned
  after), nothing pinned; its baseline is the bare relay (one worker, it
  cannot deliver across workers), unpinned too.

Client (``--client``): ``fast`` (default) is a minimal RFC 6455 client on an
asyncio Protocol (handshake by hand, frames parsed in ``data_received``, the
mask applied by websockets' C speedup, the frames answered within one read
written at once); ``websockets`` is the websockets asyncio client (no
compression, no keepalive of its own). Both run every connection in one
event loop; the fast one needs about half the CPU per message, so that one
core of generator stays below a server near 15,000 messages a second.

Users: on the bare relay every user is registered over HTTP. On imserver,
registering and logging in costs two scrypt hashes (0.2 to 0.6 s of the
pinned server's core per user), so by default (``--register auto``) the
first ``--http-users`` users (4) of each scenario are registered over HTTP
(``POST /api/users`` then ``POST /api/tokens``) and the others are inserted
into the server's database with the first user's password hash, their
tokens signed with the ``IMSERVER_SECRET_KEY`` the bench gave the server
(checked with ``GET /api/me``). ``--register http`` registers every user
over HTTP, ``--register direct`` all but one directly. Registration is
setup, never measured.

Database: each imserver server gets a fresh SQLite file in a temporary
folder; with ``--postgres URL`` (a database on a PostgreSQL server where the
bench may create databases) it gets a database of its own there instead,
``imbench_<pid>_<port>``, dropped when the server stops. The bare relay has
no database.

Output: a table on stdout (each figure, the bare relay's, the ratio, the
target and met/missed), ``<out>/results.json`` (every figure, the table, the
percentiles of each latency distribution, the commit measured),
``<out>/latency.png`` (CDFs of the latency distributions; needs matplotlib,
skipped with a message without it) and the servers' logs in ``<out>/logs/``
(scanned for errors, worker timeouts and restarts, which the table reports).
Figures vary by 20-30 % from run to run: compare within one run.

Limits of one machine: an imserver connection holds one server thread (the
bare relay's two: flask-sock's handler and simple-websocket's reader), and
``kernel.pid_max`` (32768 here) caps the threads of the machine; the
server's ``--threads`` is set above C. The bench raises its own
RLIMIT_NOFILE to the hard limit (the servers inherit it).

Usage::

    .venv/bin/python scripts/bench.py --quick            # smoke test, < 60 s
    .venv/bin/python scripts/bench.py                    # every scenario, default sizes
    .venv/bin/python scripts/bench.py --scenarios pairs,fanout,offline,workers
    .venv/bin/python scripts/bench.py --scenarios idle --connections 2000 --idle-hold 20
    .venv/bin/python scripts/bench.py --scenarios idle --servers imserver \\
        --server-env IMSERVER_FUTEX_HASH_SLOTS=16   # a setting of imserver, compared
    .venv/bin/python scripts/bench.py --scenarios workers --servers imserver \\
        --postgres postgresql://postgres@127.0.0.1:5432/test   # imserver on PostgreSQL
    .venv/bin/python scripts/bench.py --pairs 50 --window 10 --duration 10 \\
        --group-size 200 --group-messages 200 --offline-messages 10000 --out bench-out

Targets (server pinned to one core, the generator to the other; P=50, W=10,
G=200, M=200, C=10,000, K=10,000): pairs >= 9,000 msg/s and >= 0.9x bare,
p99 <= 150 ms; fanout >= 45,000 deliveries/s and >= 0.9x bare, p99 <= 150
ms; idle 10,000 connections, none dropped, <= 40 KB RSS each, burst
answered within 2 s; offline 10,000 replayed in <= 0.5 s; workers: 2
workers >= 1.6x 1 worker.
"""

import argparse
import asyncio
import base64
import collections
import concurrent.futures
import gc
import json
import os
import platform
import random
import resource
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from websockets.asyncio.client import connect as ws_connect

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CLK_TCK = os.sysconf("SC_CLK_TCK")
SCENARIOS = ("pairs", "fanout", "idle", "offline", "workers")
SERVER_CORE = 0
BENCH_CORE = 1
PASSWORD = "bench-password"
# A generator using more than this share of its core is the bottleneck.
SATURATED = 0.90
# Codes of the error frames received in the current run: code -> count.
ERROR_CODES: dict = {}
# Frames whose handling failed in the bench itself (a bug of the bench).
CLIENT_ERRORS: list = []
# The WebSocket client: "fast" or "websockets" (--client).
CLIENT = "fast"

# HTTP without any proxy from the environment: only 127.0.0.1 is spoken to.
_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# -- processes -------------------------------------------------------------------


def free_port() -> int:
    """Return a TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _stat(pid: int):
    """Return ``(state, pgrp, cpu_ticks, system_ticks)`` of a process, or None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return fields[0], int(fields[2]), int(fields[11]) + int(fields[12]), int(fields[12])


def _status(pid: int) -> dict:
    """Return VmRSS (KB) and Threads of a process, from /proc/<pid>/status."""
    out = {"rss_kb": 0, "threads": 0}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    out["rss_kb"] = int(line.split()[1])
                elif line.startswith("Threads:"):
                    out["threads"] = int(line.split()[1])
    except OSError:
        pass
    return out


def cpu_seconds_self() -> float:
    """Return this process's user + system CPU seconds."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def set_affinity_all(cpus: set) -> None:
    """Set the CPU affinity of every thread of this process."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:
            pass


class Server:
    """One server subprocess (its own session), started and stopped by pid."""

    def __init__(self, name: str, kind: str, args, workdir: str, logdir: str,
                 threads: int, workers: int = 1, pin: bool = True, env=None) -> None:
        self.name = name
        self.kind = kind  # "imserver" or "bare"
        self.args = args
        self.threads = threads
        self.workers = workers
        self.pin = pin
        self.port = free_port()
        self.http = f"http://127.0.0.1:{self.port}"
        self.ws = f"ws://127.0.0.1:{self.port}"
        self.workdir = workdir
        self.log_path = os.path.join(logdir, f"{name}-{self.port}.log")
        self.secret = secrets.token_urlsafe(24)
        self.db_path = os.path.join(workdir, f"{name}-{self.port}.sqlite3")
        # --postgres: a database of this server's own on that PostgreSQL,
        # created at start and dropped at stop.
        self.pg_admin = args.postgres if kind == "imserver" else None
        self.pg_url = None
        if self.pg_admin:
            self.pg_name = f"imbench_{os.getpid()}_{self.port}"
            self.pg_url = self.pg_admin.rpartition("/")[0] + "/" + self.pg_name
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("IMSERVER_")}
        self.env.update({
            "PYTHONUNBUFFERED": "1",
            "IMSERVER_DATABASE_URL": self.pg_url or "sqlite:///" + self.db_path,
            "IMSERVER_SECRET_KEY": self.secret,
            "IMSERVER_RATE_LIMIT": "1000000",
            "IMSERVER_RATE_BURST": "1000000",
            # Registration and login attempts per address (the bench is one address).
            "IMSERVER_AUTH_RATE_LIMIT": "1000000",
            "IMSERVER_AUTH_RATE_BURST": "1000000",
        })
        self.env.update(env or {})
        if kind == "imserver":
            self.env.update(args.server_env)
        self.proc = None
        self._log = None

    def argv(self) -> list:
        pin = ["taskset", "-c", str(SERVER_CORE)] if self.pin else []
        if self.kind == "imserver":
            script = os.path.join(os.path.dirname(sys.executable), "imserver")
            cmd = [script] if os.path.exists(script) else [
                sys.executable, "-c", "from imserver.cli import main; main()"]
            return pin + cmd + [
                "serve", "--host", "127.0.0.1", "--port", str(self.port),
                "--workers", str(self.workers), "--threads", str(self.threads),
                "--log-level", self.args.server_log_level]
        extra = ["--no-control-socket"] if _gunicorn_has_control_socket() else []
        return pin + [
            sys.executable, "-m", "gunicorn", "-k", "gthread",
            "--threads", str(self.threads),
            "--worker-connections", str(self.threads + 1000),
            "-w", "1", "-b", f"127.0.0.1:{self.port}", "--chdir", HERE,
            "--timeout", "120", "--graceful-timeout", "5", "--backlog", "2048",
            "--log-level", self.args.server_log_level, *extra, "bare_relay:create_app()"]

    def start(self, timeout: float = 60.0) -> None:
        """Start; return once /healthz answers 200."""
        if self.pg_url:
            self._postgres(f'CREATE DATABASE "{self.pg_name}"')
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.argv(), env=self.env, cwd=self.workdir,
                                     stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; "
                                   f"see {self.log_path}")
            try:
                with _http.open(self.http + "/healthz", timeout=2) as resp:
                    if resp.status == 200 and len(self.worker_pids()) >= self.workers:
                        return
            except (urllib.error.URLError, OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not answer /healthz in {timeout} s")
            time.sleep(0.05)

    def pids(self) -> list:
        """The live processes of the server's session (arbiter and workers)."""
        if self.proc is None:
            return []
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                st = _stat(int(entry))
                if st is not None and st[1] == self.proc.pid and st[0] != "Z":
                    pids.append(int(entry))
        return pids

    def worker_pids(self) -> list:
        return [p for p in self.pids() if p != self.proc.pid]

    def cpu_seconds(self) -> float:
        """CPU seconds used so far by the server's live processes."""
        return self.cpu_split()[0]

    def cpu_split(self) -> tuple:
        """``(cpu_seconds, of_which_in_the_kernel)`` of the server's live processes."""
        total = system = 0
        for pid in self.pids():
            st = _stat(pid)
            if st is not None:
                total += st[2]
                system += st[3]
        return total / CLK_TCK, system / CLK_TCK

    def context_switches(self) -> int:
        """Context switches so far of every live thread of the server."""
        total = 0
        for pid in self.pids():
            try:
                tids = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue
            for tid in tids:
                try:
                    with open(f"/proc/{pid}/task/{tid}/status") as f:
                        for line in f:
                            if "ctxt_switches:" in line:
                                total += int(line.split()[1])
                except (OSError, ValueError):
                    pass
        return total

    def memory(self) -> dict:
        """Sum of VmRSS (KB) and threads of the server's processes."""
        rss = threads = 0
        for pid in self.pids():
            st = _status(pid)
            rss += st["rss_kb"]
            threads += st["threads"]
        return {"rss_kb": rss, "threads": threads, "processes": len(self.pids())}

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the process started, wait, then SIGKILL its session by its pid."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        # Whatever is left of this server's own process group (never by name).
        if self.pids():
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.pg_url:
            self._postgres(f'DROP DATABASE IF EXISTS "{self.pg_name}" WITH (FORCE)')

    def _postgres(self, statement: str) -> None:
        import psycopg

        with psycopg.connect(self.pg_admin, autocommit=True, connect_timeout=10) as admin:
            admin.execute(statement)

    def connect_db(self):
        """A DB-API connection to the server's database, and its placeholder."""
        if self.pg_url:
            import psycopg

            return psycopg.connect(self.pg_url, connect_timeout=10), "%s"
        db = sqlite3.connect(self.db_path, timeout=30)
        db.execute("PRAGMA busy_timeout = 30000")
        return db, "?"

    def log_issues(self) -> dict:
        """Count worrying lines in the server's log."""
        patterns = {
            "worker_timeout": "WORKER TIMEOUT",
            "traceback": "Traceback",
            "error_lines": " ERROR ",
            "critical": "CRITICAL",
            "write_failed": "write failed",
            "slow_receiver": "slow receiver",
            "idle_closed": "closing idle connection",
            "commit_failed": "commit failed",
            "commit_retried": "commit attempt",
            "worker_boots": "Booting worker",
        }
        counts = dict.fromkeys(patterns, 0)
        try:
            with open(self.log_path, errors="replace") as f:
                for line in f:
                    for key, pat in patterns.items():
                        if pat in line:
                            counts[key] += 1
        except OSError:
            pass
        # Boots beyond the initial workers are restarts (a killed worker).
        counts["worker_restarts"] = max(0, counts.pop("worker_boots") - self.workers)
        return {k: v for k, v in counts.items() if v}


_CONTROL_SOCKET = None


def _gunicorn_has_control_socket() -> bool:
    global _CONTROL_SOCKET
    if _CONTROL_SOCKET is None:
        out = subprocess.run([sys.executable, "-m", "gunicorn", "--help"],
                             capture_output=True, text=True).stdout
        _CONTROL_SOCKET = "--no-control-socket" in out
    return _CONTROL_SOCKET


def core_ticks() -> dict:
    """Return ``{core: (busy, total)}`` ticks of every core, from /proc/stat."""
    out = {}
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("cpu") and line[3].isdigit():
                    name, *values = line.split()
                    values = [int(v) for v in values[:8]]
                    idle = values[3] + values[4]
                    out[int(name[3:])] = (sum(values) - idle, sum(values))
    except OSError:
        pass
    return out


class Meter:
    """CPU use of the generator, the server and each core over one phase.

    ``core_busy`` is every process's use of each core (this machine may be
    shared): on the server's core, busy minus the server's own share is
    what other processes took from it.
    """

    def __init__(self, server: Server) -> None:
        self.server = server
        self.ctx0 = server.context_switches()
        self.t0 = time.monotonic()
        self.gen0 = cpu_seconds_self()
        self.srv0, self.sys0 = server.cpu_split()
        self.cores0 = core_ticks()

    def read(self) -> dict:
        wall = time.monotonic() - self.t0
        gen = cpu_seconds_self() - self.gen0
        srv, system = self.server.cpu_split()
        srv, system = srv - self.srv0, system - self.sys0
        self.ctx = self.server.context_switches() - self.ctx0
        cores = {}
        for core, (busy, total) in core_ticks().items():
            busy0, total0 = self.cores0.get(core, (0, 0))
            if total > total0:
                cores[str(core)] = round((busy - busy0) / (total - total0), 3)
        if wall < 0.3:
            # The kernel counts CPU time in ticks (10 ms): too coarse here.
            return {"wall_s": round(wall, 3), "generator_cpu": None, "server_cpu": None,
                    "core_busy": {}, "note": "phase too short to measure CPU"}
        return {"wall_s": round(wall, 3),
                "generator_cpu": round(gen / wall, 3) if wall > 0 else None,
                "server_cpu": round(srv / wall, 3) if wall > 0 else None,
                "server_cpu_s": round(srv, 2),
                # The kernel's part: system calls, and loopback TCP for both ends.
                "server_system_share": round(system / srv, 3) if srv > 0 else None,
                "server_context_switches": self.ctx,
                "core_busy": cores}


# -- HTTP and users ----------------------------------------------------------------


def http_json(method: str, url: str, body=None, token=None, timeout=30.0):
    """Return ``(status, json)`` of one request."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with _http.open(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


class User:
    __slots__ = ("id", "name", "token")

    def __init__(self, user_id: int, name: str, token: str) -> None:
        self.id, self.name, self.token = user_id, name, token


def _register_http(server: Server, name: str) -> User:
    status, data = http_json("POST", server.http + "/api/users",
                             {"username": name, "password": PASSWORD})
    if status != 201:
        raise RuntimeError(f"register {name}: {status} {data}")
    status, tok = http_json("POST", server.http + "/api/tokens",
                            {"username": name, "password": PASSWORD})
    if status != 200:
        raise RuntimeError(f"login {name}: {status} {tok}")
    return User(data["id"], name, tok["token"])


def register_users(server: Server, n: int, prefix: str, mode: str, http_users: int) -> list:
    """Register ``n`` users (see the module docstring), return them in order."""
    names = [f"{prefix}{i}" for i in range(n)]
    if server.kind == "bare" or mode == "http":
        over_http = n
    elif mode == "direct":
        over_http = 1
    else:
        over_http = max(1, min(n, http_users))
    # The pinned server hashes on one core: a few requests at a time suffice.
    workers = 16 if server.kind == "bare" else 2
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        users = list(pool.map(lambda name: _register_http(server, name), names[:over_http]))
    if over_http < n:
        users += _insert_users(server, names[over_http:], users[0])
    return users


def _insert_users(server: Server, names: list, template: User) -> list:
    """Insert users straight into the server's database; sign their tokens."""
    from itsdangerous import URLSafeSerializer

    db, mark = server.connect_db()
    try:
        cur = db.cursor()
        cur.execute(f"SELECT password_hash FROM users WHERE id = {mark}", (template.id,))
        (password_hash,) = cur.fetchone()
        now = int(time.time() * 1000)
        cur.executemany(
            "INSERT INTO users (username, password_hash, is_admin, created_at,"
            f" last_seq, acked_seq) VALUES ({mark}, {mark}, false, {mark}, 0, 0)",
            [(name, password_hash, now) for name in names])
        db.commit()
        ids = {}
        for start in range(0, len(names), 500):
            chunk = names[start:start + 500]
            marks = ",".join([mark] * len(chunk))
            cur.execute(f"SELECT username, id FROM users WHERE username IN ({marks})", chunk)
            ids.update(cur.fetchall())
    finally:
        db.close()
    signer = URLSafeSerializer(server.secret, salt="imserver-token")
    expires = int(time.time() * 1000) + 24 * 3600 * 1000
    users = [User(ids[name], name, signer.dumps({"u": ids[name], "e": expires}))
             for name in names]
    # The signed tokens must be accepted as the server's own.
    status, me = http_json("GET", server.http + "/api/me", token=users[-1].token)
    if status != 200 or me.get("id") != users[-1].id:
        raise RuntimeError(f"a token signed by the bench is refused: {status} {me}; "
                           "use --register http")
    return users


# -- WebSocket clients ------------------------------------------------------------------
#
# Two clients with one callback interface (``send(text)`` never blocks,
# ``set_handler(fn(text, now_ns))``, ``closed``, ``close_code``, ``abort()``),
# so that every scenario runs on either:
#
# - ``websockets`` (``--client websockets``): the websockets asyncio client,
#   no compression, no keepalive of its own (it answers the server's pings);
#   a reader task and a writer task per connection.
# - ``fast`` (``--client fast``, the default): a minimal RFC 6455 client on an
#   asyncio Protocol (the handshake by hand, frames parsed in
#   ``data_received``, the mask applied by websockets' C speedup). No task
#   per connection and no future per frame, and the frames a callback sends
#   while a read is parsed go out in one write. It needs about half the CPU
#   of the websockets client per message, so that one core of generator is
#   not the bottleneck of a server near 15,000 messages a second.

try:
    from websockets.speedups import apply_mask as _apply_mask
except ImportError:  # pragma: no cover - websockets without its C extension
    def _apply_mask(data: bytes, mask: bytes) -> bytes:
        n = len(data)
        key = (mask * (n // 4 + 1))[:n]
        return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(
            n, "little")

_rand32 = random.Random(os.urandom(8)).getrandbits


class HandshakeError(ConnectionError):
    pass


def _call_handler(handler, text: str, now: int) -> None:
    """Run a frame handler; a failure of the bench is counted, printed once."""
    try:
        handler(text, now)
    except Exception:
        CLIENT_ERRORS.append(text[:200])
        if len(CLIENT_ERRORS) == 1:
            import traceback

            traceback.print_exc()


class FastConn(asyncio.Protocol):
    """A WebSocket client connection on a bare asyncio Protocol."""

    def __init__(self, host: str, target: str, opened: asyncio.Future) -> None:
        self._request = (f"GET {target} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
                         "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                         f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}"
                         "\r\n\r\n").encode()
        self._opened = opened  # resolved with the first text frame (ready)
        self._buf = bytearray()
        self._handshaken = False
        self._handler = None
        self._early: list = []
        self._out: list = []
        self._batching = False
        self._fragments = None
        self.transport = None
        self.closed = False
        self.close_code = None
        self.on_close = None

    # -- the interface --------------------------------------------------------------

    def set_handler(self, handler) -> None:
        self._handler = handler
        early, self._early = self._early, []
        for text, now in early:
            handler(text, now)

    def send(self, text: str) -> None:
        """Queue one masked text frame (written at once, or with the batch)."""
        if self.closed:
            return
        payload = text.encode()
        n = len(payload)
        mask = _rand32(32).to_bytes(4, "big")
        if n < 126:
            head = bytes((0x81, 0x80 | n))
        elif n < 65536:
            head = bytes((0x81, 0xFE)) + n.to_bytes(2, "big")
        else:
            head = bytes((0x81, 0xFF)) + n.to_bytes(8, "big")
        frame = head + mask + _apply_mask(payload, mask)
        if self._batching:
            self._out.append(frame)
        else:
            self.transport.write(frame)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(self._request)

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.close_code is None:
            self.close_code = 1006
        if not self._opened.done():
            self._opened.set_exception(exc or ConnectionError("closed before ready"))
        if self.on_close is not None:
            self.on_close(self)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter_ns()
        buf = self._buf
        buf += data
        if not self._handshaken:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(buf[:end]).split(b" ", 2)[1]
            del buf[:end + 4]
            if status != b"101":
                if not self._opened.done():
                    self._opened.set_exception(HandshakeError(f"HTTP {status.decode()}"))
                self.transport.close()
                return
            self._handshaken = True
        self._batching = True
        try:
            self._parse(buf, now)
        finally:
            self._batching = False
            if self._out:
                out, self._out = self._out, []
                if not self.closed:
                    self.transport.write(b"".join(out))

    def _parse(self, buf: bytearray, now: int) -> None:
        pos, size = 0, len(buf)
        while size - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            length, head = b1 & 0x7F, 2
            if length == 126:
                if size - pos < 4:
                    break
                length, head = int.from_bytes(buf[pos + 2:pos + 4], "big"), 4
            elif length == 127:
                if size - pos < 10:
                    break
                length, head = int.from_bytes(buf[pos + 2:pos + 10], "big"), 10
            end = pos + head + length
            if end > size:
                break
            payload = bytes(buf[pos + head:end])
            pos = end
            opcode = b0 & 0x0F
            if opcode == 0x1 or opcode == 0x0:
                if not b0 & 0x80:  # a fragment: keep it until the last one
                    self._fragments = (self._fragments or b"") + payload
                    continue
                if self._fragments is not None:
                    payload, self._fragments = self._fragments + payload, None
                self._text(payload.decode(), now)
            elif opcode == 0x9:  # ping: answer pong
                mask = _rand32(32).to_bytes(4, "big")
                frame = bytes((0x8A, 0x80 | len(payload))) + mask + _apply_mask(payload, mask)
                if self._batching:
                    self._out.append(frame)
                else:
                    self.transport.write(frame)
            elif opcode == 0x8:  # close: answer it and drop the connection
                self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 \
                    else 1005
                mask = _rand32(32).to_bytes(4, "big")
                self.transport.write(bytes((0x88, 0x80 | len(payload[:2]))) + mask
                                     + _apply_mask(payload[:2], mask))
                self.transport.close()
                self.closed = True
                break
        del buf[:pos]

    def _text(self, text: str, now: int) -> None:
        if not self._opened.done():
            self._opened.set_result(text)
        elif self._handler is not None:
            _call_handler(self._handler, text, now)
        else:
            self._early.append((text, now))


class WsConn:
    """The same interface on the ``websockets`` asyncio client."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self._handler = None
        self._early: list = []
        self._outbox: collections.deque = collections.deque()
        self._wake = asyncio.Event()
        self.on_close = None
        self._reader = asyncio.ensure_future(self._read())
        self._writer = asyncio.ensure_future(self._write())

    @property
    def closed(self) -> bool:
        return self.ws.close_code is not None or self._reader.done()

    @property
    def close_code(self):
        code = self.ws.close_code
        return code if code is not None else (1006 if self._reader.done() else None)

    def set_handler(self, handler) -> None:
        self._handler = handler
        early, self._early = self._early, []
        for text, now in early:
            handler(text, now)

    def send(self, text: str) -> None:
        self._outbox.append(text)
        self._wake.set()

    def abort(self) -> None:
        self._reader.cancel()
        self._writer.cancel()
        try:
            self.ws.transport.abort()
        except Exception:
            pass

    async def _read(self):
        try:
            async for text in self.ws:
                now = time.perf_counter_ns()
                if self._handler is not None:
                    _call_handler(self._handler, text, now)
                else:
                    self._early.append((text, now))
        except Exception:
            pass
        finally:
            if self.on_close is not None:
                self.on_close(self)

    async def _write(self):
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._outbox:
                    await self.ws.send(self._outbox.popleft())
        except Exception:
            pass


async def open_ws(server: Server, token: str, timeout: float = 30.0):
    """Open a WebSocket, wait for ``ready``; return the connection."""
    if CLIENT == "websockets":
        ws = await ws_connect(f"{server.ws}/ws?token={token}", compression=None,
                              ping_interval=None, ping_timeout=None, close_timeout=2,
                              max_queue=None, open_timeout=timeout, proxy=None,
                              user_agent_header=None)
        first = await asyncio.wait_for(ws.recv(), timeout)
        conn = WsConn(ws)
    else:
        loop = asyncio.get_running_loop()
        opened = loop.create_future()
        host = f"127.0.0.1:{server.port}"
        transport, conn = await asyncio.wait_for(loop.create_connection(
            lambda: FastConn(host, f"/ws?token={token}", opened), "127.0.0.1", server.port),
            timeout)
        try:
            first = await asyncio.wait_for(opened, timeout)
        except BaseException:
            transport.abort()
            raise
    if json.loads(first).get("type") != "ready":
        conn.abort()
        raise RuntimeError(f"first frame is not ready: {first}")
    return conn


async def open_many(server: Server, users: list, concurrency: int = 100,
                    timeout: float = 60.0) -> tuple[list, int, float]:
    """Open one WebSocket per user; return ``(conns or None, failures, seconds)``."""
    sem = asyncio.Semaphore(concurrency)
    started = time.monotonic()
    errors: dict = {}

    async def one(user):
        async with sem:
            try:
                return await open_ws(server, user.token, timeout)
            except Exception as exc:
                key = exc.__class__.__name__ + (f" {exc}" if isinstance(exc, HandshakeError)
                                                else "")
                errors[key] = errors.get(key, 0) + 1
                return None

    conns = await asyncio.gather(*(one(u) for u in users))
    failures = sum(1 for c in conns if c is None)
    if errors:
        print(f"    connect failures: {errors}", flush=True)
    return conns, failures, time.monotonic() - started


async def close_all(conns) -> None:
    """Drop the client side of every connection at once."""
    for conn in conns:
        if conn is not None:
            try:
                conn.abort()
            except Exception:
                pass
    await asyncio.sleep(0.2)


def percentile(values, q: float):
    if not values:
        return None
    values = sorted(values)
    idx = min(len(values) - 1, max(0, int(round(q / 100 * (len(values) - 1)))))
    return values[idx]


def latency_summary(values) -> dict:
    return {"n": len(values),
            "p50_ms": _r(percentile(values, 50)), "p90_ms": _r(percentile(values, 90)),
            "p99_ms": _r(percentile(values, 99)), "max_ms": _r(max(values) if values else None)}


def _r(x, digits=2):
    return None if x is None else round(x, digits)


def _count_error(frame: dict) -> None:
    code = frame.get("code")
    ERROR_CODES[code] = ERROR_CODES.get(code, 0) + 1


class Receiver:
    """Reads ``message`` frames, checks their seqs, acks every 10 (and on a timer)."""

    def __init__(self, conn, on_message=None) -> None:
        self.conn = conn
        self.on_message = on_message
        self.last_seq = 0
        self.acked = 0
        self.count = 0
        self.gaps = 0
        self.dups = 0
        self.errors = 0
        self.pongs = 0
        self.pong_ns = None  # arrival of the first pong since pongs was reset
        conn.set_handler(self._on_text)

    @property
    def closed(self) -> bool:
        return self.conn.closed

    def _on_text(self, text: str, now: int) -> None:
        frame = json.loads(text)
        kind = frame.get("type")
        if kind == "message":
            seq = frame["seq"]
            if seq <= self.last_seq:
                self.dups += 1
                return
            if seq != self.last_seq + 1:
                self.gaps += 1
            self.last_seq = seq
            self.count += 1
            if self.on_message is not None:
                self.on_message(frame, now)
            if seq - self.acked >= 10:
                self.acked = seq
                self.conn.send('{"type":"ack","seq":%d}' % seq)
        elif kind == "pong":
            if not self.pongs:
                self.pong_ns = now
            self.pongs += 1
        elif kind == "error":
            self.errors += 1
            _count_error(frame)

    def ack_now(self) -> None:
        if self.last_seq > self.acked and not self.conn.closed:
            self.acked = self.last_seq
            self.conn.send('{"type":"ack","seq":%d}' % self.acked)


async def ack_timer(receivers, stop: asyncio.Event, every: float = 0.05) -> None:
    """Ack what each receiver has every 50 ms (the other half of the ack rule)."""
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), every)
        except asyncio.TimeoutError:
            pass
        for r in receivers:
            r.ack_now()


class Sender:
    """Keeps at most ``window`` ``send`` frames waiting for their ``sent``.

    Every body starts with its send time (``perf_counter_ns``, 20 digits),
    for the receivers' end-to-end latency.
    """

    def __init__(self, conn, target: dict, window: int, body_size: int,
                 limit: int | None = None) -> None:
        self.conn = conn
        # The target's part of the frame, encoded once: "to" or "group".
        (key, value), = target.items()
        self._tail = ',"%s":%d}' % (key, value)
        self._filler = "x" * max(0, body_size - 20)
        self.limit = limit  # messages to send in all, or None until stop()
        self.next_cid = 1
        self.outstanding: dict[str, int] = {}  # cid -> perf_counter_ns at send
        self.sent = 0
        self.errors = 0
        self.sent_latency: list[float] = []
        self.record = False
        self.running = True
        self.first_send_ns = None
        self.done = asyncio.Event()
        conn.set_handler(self._on_text)
        for _ in range(window):
            if self._may_send():
                self._send_one()

    def stop(self) -> None:
        self.running = False
        if not self.outstanding:
            self.done.set()

    def _send_one(self) -> None:
        cid = str(self.next_cid)
        self.next_cid += 1
        now = time.perf_counter_ns()
        if self.first_send_ns is None:
            self.first_send_ns = now
        self.outstanding[cid] = now
        self.conn.send('{"type":"send","cid":"%s","body":"%020d%s"%s'
                       % (cid, now, self._filler, self._tail))

    def _may_send(self) -> bool:
        return self.running and (self.limit is None or self.next_cid <= self.limit)

    def _on_text(self, text: str, now: int) -> None:
        frame = json.loads(text)
        kind = frame.get("type")
        if kind not in ("sent", "error"):
            return
        started = self.outstanding.pop(frame.get("cid"), None)
        if kind == "sent":
            self.sent += 1
            if self.record and started is not None:
                self.sent_latency.append((now - started) / 1e6)
        else:
            self.errors += 1
            _count_error(frame)
        if self._may_send():
            self._send_one()
        elif not self.outstanding:
            self.done.set()


# -- scenarios -------------------------------------------------------------------------


async def _pairs(server: Server, users: list, args, duration: float) -> dict:
    p = len(users) // 2
    senders_u, receivers_u = users[:p], users[p:2 * p]
    rconns, rfail, _ = await open_many(server, receivers_u)
    sconns, sfail, _ = await open_many(server, senders_u)
    if rfail or sfail:
        await close_all(rconns + sconns)
        raise RuntimeError(f"pairs: {rfail + sfail} connections failed")
    gc.collect()
    gc.freeze()
    state = {"measure": False, "latency": [], "count": 0}
    latency = state["latency"]

    def on_message(frame, now):
        if state["measure"]:
            state["count"] += 1
            latency.append((now - int(frame["body"][:20])) / 1e6)

    receivers = [Receiver(conn, on_message) for conn in rconns]
    stop_acks = asyncio.Event()
    acker = asyncio.ensure_future(ack_timer(receivers, stop_acks))
    senders = [Sender(conn, {"to": r.id}, args.window, args.body_size)
               for conn, r in zip(sconns, receivers_u)]
    await asyncio.sleep(args.warmup)
    meter = Meter(server)
    state["measure"] = True
    for s in senders:
        s.record = True
    t0 = time.monotonic()
    await asyncio.sleep(duration)
    state["measure"] = False
    window = time.monotonic() - t0
    cpu = meter.read()
    for s in senders:
        s.record = False
        s.stop()
    # Let the outstanding messages arrive (bounded).
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        expected = sum(s.sent + len(s.outstanding) for s in senders)
        if sum(r.count for r in receivers) >= expected:
            break
        await asyncio.sleep(0.05)
    stop_acks.set()
    await acker
    for r in receivers:
        r.ack_now()
    await asyncio.sleep(0.2)
    received = sum(r.count for r in receivers)
    acked = sum(s.sent for s in senders)
    count = max(1, state["count"])
    if cpu.get("server_cpu_s") is not None:
        cpu["server_cpu_us_per_message"] = round(cpu["server_cpu_s"] * 1e6 / count, 1)
        cpu["server_context_switches_per_message"] = round(
            cpu["server_context_switches"] / count, 2)
    result = {
        "pairs": p, "window": args.window, "duration_s": round(window, 3),
        "rate": round(state["count"] / window, 1),
        "latency": latency_summary(latency),
        "sent_latency": latency_summary([x for s in senders for x in s.sent_latency]),
        "cpu": cpu,
        "sent_total": acked, "received_total": received,
        "lost": max(0, acked - received),
        "gaps": sum(r.gaps for r in receivers), "dups": sum(r.dups for r in receivers),
        "error_frames": sum(s.errors for s in senders) + sum(r.errors for r in receivers),
        "dropped_connections": sum(1 for c in rconns + sconns if c.closed),
    }
    await close_all(rconns + sconns)
    gc.unfreeze()
    return result, latency


async def _fanout(server: Server, users: list, args) -> dict:
    owner, members = users[0], users[1:]
    status, group = http_json("POST", server.http + "/api/groups",
                              {"name": "bench", "members": [m.id for m in members]},
                              token=owner.token)
    if status != 201:
        raise RuntimeError(f"create group: {status} {group}")
    mconns, mfail, _ = await open_many(server, members)
    sconns, sfail, _ = await open_many(server, [owner])
    if mfail or sfail:
        await close_all(mconns + sconns)
        raise RuntimeError(f"fanout: {mfail + sfail} connections failed")
    g = len(members)
    m = args.group_messages
    arrivals = {}  # send ns -> members that have it
    last = {}  # send ns -> time the last member got it
    per_delivery = []
    state = {"last_ns": None}

    def on_message(frame, now):
        sent_ns = int(frame["body"][:20])
        per_delivery.append((now - sent_ns) / 1e6)
        n = arrivals.get(sent_ns, 0) + 1
        arrivals[sent_ns] = n
        if n == g:
            last[sent_ns] = now
            state["last_ns"] = now

    gc.collect()
    gc.freeze()
    receivers = [Receiver(conn, on_message) for conn in mconns]
    stop_acks = asyncio.Event()
    acker = asyncio.ensure_future(ack_timer(receivers, stop_acks))
    meter = Meter(server)
    sender = Sender(sconns[0], {"group": group["id"]}, args.window, args.body_size, limit=m)
    sender.record = True
    deadline = time.monotonic() + args.fanout_timeout
    while len(last) < m and time.monotonic() < deadline:
        await asyncio.sleep(0.002)
    cpu = meter.read()
    stop_acks.set()
    await acker
    for r in receivers:
        r.ack_now()
    complete = len(last) == m
    first = sender.first_send_ns
    span = ((state["last_ns"] - first) / 1e9) if (state["last_ns"] and first) else None
    delivered = sum(r.count for r in receivers)
    last_member = [(t - s) / 1e6 for s, t in last.items()]
    if cpu.get("server_cpu_s") is not None and delivered:
        cpu["server_cpu_us_per_delivery"] = round(cpu["server_cpu_s"] * 1e6 / delivered, 1)
        cpu["server_context_switches_per_delivery"] = round(
            cpu["server_context_switches"] / delivered, 2)
    result = {
        "members": g, "messages": m, "window": args.window,
        "complete": complete, "messages_complete": len(last),
        "deliveries": delivered, "expected_deliveries": g * m,
        "span_s": _r(span, 3),
        "rate": round(delivered / span, 1) if span else None,
        "latency": latency_summary(last_member),
        "per_delivery_latency": latency_summary(per_delivery),
        "sent_latency": latency_summary(sender.sent_latency),
        "cpu": cpu,
        "gaps": sum(r.gaps for r in receivers), "dups": sum(r.dups for r in receivers),
        "error_frames": sender.errors + sum(r.errors for r in receivers),
        "dropped_connections": sum(1 for c in mconns + sconns if c.closed),
    }
    await asyncio.sleep(0.1)
    await close_all(mconns + sconns)
    gc.unfreeze()
    return result, last_member


async def _idle(server: Server, users: list, args) -> dict:
    before = server.memory()
    conns, failures, open_s = await open_many(server, users, concurrency=args.connect_concurrency,
                                              timeout=args.connect_timeout)
    live = [c for c in conns if c is not None]
    # Let the server settle (every handler thread started and parked in recv).
    await asyncio.sleep(1.0)
    opened = server.memory()
    gc.collect()
    gc.freeze()
    receivers = [Receiver(conn) for conn in live]
    drops = []  # seconds into the hold at which connections closed
    t_hold = time.monotonic()
    for conn in live:
        conn.on_close = lambda c: drops.append(round(time.monotonic() - t_hold, 2))
    meter = Meter(server)
    hold_until = t_hold + args.idle_hold
    while time.monotonic() < hold_until:
        await asyncio.sleep(min(1.0, max(0.0, hold_until - time.monotonic())))
    hold_cpu = meter.read()
    after_hold = server.memory()
    up = [r for r in receivers if not r.closed]
    dropped = len(receivers) - len(up)
    drop_times = list(drops)
    # The burst: every connection sends ping at once.
    for r in up:
        r.pongs, r.pong_ns = 0, None
    meter = Meter(server)
    t0 = time.perf_counter_ns()
    for r in up:
        r.conn.send('{"type":"ping"}')
    sent_all = (time.perf_counter_ns() - t0) / 1e9
    deadline = time.monotonic() + args.burst_timeout
    pending = set(up)
    while pending and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
        pending = {r for r in pending if not r.pongs}
    burst_cpu = meter.read()
    pong_times = sorted((r.pong_ns - t0) / 1e9 for r in up if r.pong_ns is not None)
    answered_in_2s = sum(1 for t in pong_times if t <= 2.0)
    await asyncio.sleep(0.5)
    result = {
        "connections": len(users), "opened": len(live), "open_failures": failures,
        "open_s": round(open_s, 2), "hold_s": args.idle_hold,
        "ping_interval_s": args.idle_ping_interval,
        "stayed_up": len(up), "dropped": dropped, "drop_times_s": drop_times[:20],
        "rss_kb_before": before["rss_kb"], "rss_kb_opened": opened["rss_kb"],
        "rss_kb_after_hold": after_hold["rss_kb"],
        "rss_kb_per_conn": round((opened["rss_kb"] - before["rss_kb"]) / max(1, len(live)), 1),
        "rss_kb_per_conn_after_hold": round(
            (after_hold["rss_kb"] - before["rss_kb"]) / max(1, len(live)), 1),
        "threads_before": before["threads"], "threads_opened": opened["threads"],
        "threads_after_hold": after_hold["threads"],
        "hold_cpu": hold_cpu,
        "burst": {
            "pings": len(up), "send_all_s": round(sent_all, 3),
            "answered": len(up) - len(pending), "answered_within_2s": answered_in_2s,
            "all_answered_s": round(max(pong_times), 3) if not pending and pong_times else None,
            "p50_s": _r(percentile(pong_times, 50), 3), "p99_s": _r(percentile(pong_times, 99), 3),
            "timeout_s": args.burst_timeout, "cpu": burst_cpu,
        },
        "dropped_after_burst": sum(1 for r in up if r.closed),
    }
    for conn in live:
        conn.on_close = None
    await close_all(live)
    gc.unfreeze()
    return result, [t * 1000 for t in pong_times]


async def _offline(server: Server, users: list, args) -> dict:
    sender_u, receiver_u = users
    sconns, _, _ = await open_many(server, [sender_u])
    k = args.offline_messages
    t_store = time.monotonic()
    sender = Sender(sconns[0], {"to": receiver_u.id}, args.offline_window, args.body_size,
                    limit=k)
    try:
        await asyncio.wait_for(sender.done.wait(), args.offline_timeout)
    except asyncio.TimeoutError:
        pass
    store_s = time.monotonic() - t_store
    stored = sender.sent
    await asyncio.sleep(0.3)
    state = {"last_ns": None, "count": 0}
    done = asyncio.Event()

    def on_message(frame, now):
        state["count"] += 1
        if state["count"] >= stored and state["last_ns"] is None:
            state["last_ns"] = now
            done.set()

    meter = Meter(server)
    t0 = time.perf_counter_ns()
    rconn = await open_ws(server, receiver_u.token)
    ready_ns = time.perf_counter_ns()
    receiver = Receiver(rconn, on_message)
    if stored == 0:
        done.set()
    try:
        await asyncio.wait_for(done.wait(), args.offline_timeout)
    except asyncio.TimeoutError:
        pass
    cpu = meter.read()
    last_ns = state["last_ns"]
    result = {
        "messages": k, "stored": stored, "store_s": round(store_s, 3),
        "store_rate": round(stored / store_s, 1) if store_s else None,
        "replayed": receiver.count, "complete": receiver.count >= stored,
        "replay_s": _r((last_ns - t0) / 1e9, 4) if last_ns else None,
        "ready_s": _r((ready_ns - t0) / 1e9, 4),
        "replay_after_ready_s": _r((last_ns - ready_ns) / 1e9, 4) if last_ns else None,
        "gaps": receiver.gaps, "dups": receiver.dups, "cpu": cpu,
        "error_frames": sender.errors + receiver.errors,
    }
    receiver.ack_now()
    await asyncio.sleep(0.1)
    await close_all([sconns[0], rconn])
    return result, []


# -- running one scenario on one server ---------------------------------------------


def wait_quiet(args) -> dict | None:
    """Wait (at most ``--quiet-wait`` s) until every core is mostly idle.

    The machine may be shared: a run started while other processes keep
    the cores busy measures them too. Returns what was seen.
    """
    if args.quiet_wait <= 0:
        return None
    deadline = time.monotonic() + args.quiet_wait
    started = time.monotonic()
    while True:
        before = core_ticks()
        time.sleep(1.0)
        after = core_ticks()
        busy = {c: (after[c][0] - before[c][0]) / max(1, after[c][1] - before[c][1])
                for c in after if c in before}
        if max(busy.values(), default=0) <= args.quiet_busy or time.monotonic() > deadline:
            seen = {"waited_s": round(time.monotonic() - started, 1),
                    "core_busy": {str(c): round(b, 2) for c, b in busy.items()},
                    "quiet": max(busy.values(), default=0) <= args.quiet_busy}
            if not seen["quiet"]:
                print(f"    the machine is still busy after {args.quiet_wait:g} s "
                      f"(cores {seen['core_busy']}): measuring anyway", flush=True)
            return seen


def run_on_server(name: str, kind: str, args, scenario: str, n_users: int, coro_fn,
                  threads: int = 2000, workers: int = 1, pin: bool = True, env=None):
    """Start a server, register users, run the scenario, stop; return the result."""
    server = Server(name, kind, args, args.workdir, args.logdir, threads=threads,
                    workers=workers, pin=pin and args.pin, env=env)
    print(f"  [{name}] starting ({' '.join(server.argv()[:8])} ...)", flush=True)
    try:
        server.start()
        t = time.monotonic()
        users = register_users(server, n_users, f"{scenario}_", args.register,
                               args.http_users)
        print(f"  [{name}] {n_users} users registered in {time.monotonic() - t:.1f} s; "
              f"running {scenario}", flush=True)
        ERROR_CODES.clear()
        CLIENT_ERRORS.clear()
        quiet = wait_quiet(args)
        result, samples = asyncio.run(coro_fn(server, users))
        if quiet is not None:
            result["machine_before"] = quiet
        result["server_memory_end"] = server.memory()
        if ERROR_CODES:
            result["error_codes"] = dict(ERROR_CODES)
        if CLIENT_ERRORS:
            result["bench_handler_failures"] = len(CLIENT_ERRORS)
    except Exception as exc:
        print(f"  [{name}] FAILED: {exc!r}", flush=True)
        result, samples = {"failed": repr(exc)}, []
    finally:
        server.stop()
    result["log_issues"] = server.log_issues()
    result["log"] = server.log_path
    _print_brief(name, scenario, result)
    return result, samples


def _print_brief(name: str, scenario: str, result: dict) -> None:
    if "failed" in result:
        return
    cpus = [result.get("cpu")] if "cpu" in result else [result.get("hold_cpu"),
                                                         result.get("burst", {}).get("cpu")]
    bits = []
    for cpu in cpus:
        if cpu and cpu.get("generator_cpu") is not None:
            flag = "  GENERATOR SATURATED" if (cpu["generator_cpu"] or 0) > SATURATED else ""
            bits.append(f"generator {cpu['generator_cpu']:.0%} of a core, "
                        f"server {cpu['server_cpu']:.0%}{flag}, {_cores(cpu)}")
    issues = result.get("log_issues")
    print(f"  [{name}] done: {'; '.join(bits) or 'phase too short to measure CPU'}"
          + (f"; log: {issues}" if issues else ""), flush=True)


def scenario_pairs(args, results, samples):
    n = 2 * args.pairs
    for kind in args.servers:
        res, lat = run_on_server(
            f"pairs-{kind}", kind, args, "pairs", n,
            lambda srv, users: _pairs(srv, users, args, args.duration),
            threads=max(1000, n + 200))
        results["pairs"][kind] = res
        samples[f"pairs {kind}"] = lat


def scenario_fanout(args, results, samples):
    n = args.group_size + 1
    for kind in args.servers:
        res, lat = run_on_server(f"fanout-{kind}", kind, args, "fanout", n,
                                 lambda srv, users: _fanout(srv, users, args),
                                 threads=max(1000, n + 200))
        results["fanout"][kind] = res
        samples[f"fanout {kind} (last member)"] = lat


def scenario_idle(args, results, samples):
    n = args.connections
    env = {"IMSERVER_PING_INTERVAL": str(args.idle_ping_interval)}
    for kind in args.servers:
        res, lat = run_on_server(f"idle-{kind}", kind, args, "idle", n,
                                 lambda srv, users: _idle(srv, users, args),
                                 threads=n + 200, env=env)
        results["idle"][kind] = res
        # As a share of every ping sent, so that unanswered pings show.
        samples[f"idle burst {kind} (ping->pong)"] = (lat, res.get("burst", {}).get("pings"))


def scenario_offline(args, results, samples):
    for kind in args.servers:
        res, _ = run_on_server(f"offline-{kind}", kind, args, "offline", 2,
                               lambda srv, users: _offline(srv, users, args))
        results["offline"][kind] = res


def scenario_workers(args, results, samples):
    try:
        import redis
    except ImportError:
        results["workers"]["skipped"] = "the redis package is not installed"
        print("  workers: skipped, no redis package", flush=True)
        return
    client = redis.Redis.from_url(args.redis_url, socket_timeout=3)
    try:
        client.ping()
    except Exception as exc:
        results["workers"]["skipped"] = f"Redis at {args.redis_url} does not answer: {exc!r}"
        print(f"  workers: skipped, {results['workers']['skipped']}", flush=True)
        return
    n = 2 * args.pairs
    if args.pin:
        set_affinity_all(set(range(os.cpu_count())))
    try:
        if "bare" in args.servers:
            res, lat = run_on_server(
                "workers-bare", "bare", args, "workers", n,
                lambda srv, users: _pairs(srv, users, args, args.workers_duration),
                threads=max(1000, n + 200), pin=False)
            results["workers"]["bare"] = res
            samples["workers bare 1 worker (unpinned)"] = lat
        for w in ((1, 2) if "imserver" in args.servers else ()):
            prefix = f"imbench:{os.getpid()}:{secrets.token_hex(4)}:"
            env = {"IMSERVER_REDIS_URL": args.redis_url, "IMSERVER_REDIS_PREFIX": prefix}
            try:
                res, lat = run_on_server(
                    f"workers{w}-imserver", "imserver", args, "workers", n,
                    lambda srv, users: _pairs(srv, users, args, args.workers_duration),
                    threads=max(1000, n + 200), workers=w, pin=False, env=env)
            finally:
                keys = list(client.scan_iter(match=prefix + "*", count=1000))
                if keys:
                    client.delete(*keys)
            results["workers"][f"imserver_{w}"] = res
            samples[f"workers imserver {w} worker(s)"] = lat
    finally:
        if args.pin:
            set_affinity_all({BENCH_CORE})


# -- report ------------------------------------------------------------------------------


def _fmt(x, spec=",.0f"):
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    return format(x, spec)


def _ratio(a, b):
    if a is None or b in (None, 0):
        return None
    return a / b


def build_table(results: dict, args) -> list:
    """Rows: (scenario, figure, imserver, bare, ratio, target, verdict)."""
    rows = []

    def get(d, *path):
        for key in path:
            if not isinstance(d, dict):
                return None
            d = d.get(key)
        return d

    def verdict(ok):
        return "-" if ok is None else ("met" if ok else "MISSED")

    pr = results.get("pairs", {})
    if pr:
        im, ba = pr.get("imserver", {}), pr.get("bare", {})
        rate, brate = get(im, "rate"), get(ba, "rate")
        ratio = _ratio(rate, brate)
        ok = None if rate is None else (rate >= 9000 and (ratio or 0) >= 0.9)
        rows.append(("pairs", f"delivered msg/s (P={args.pairs}, W={args.window})",
                     _fmt(rate), _fmt(brate), ratio, ">= 9,000 and >= 0.9x bare", verdict(ok)))
        for q in ("p50", "p99"):
            v, b = get(im, "latency", f"{q}_ms"), get(ba, "latency", f"{q}_ms")
            ok = None if (q != "p99" or v is None) else v <= 150
            rows.append(("pairs", f"end-to-end latency {q} ms", _fmt(v, ".1f"),
                         _fmt(b, ".1f"), _ratio(v, b), "<= 150 ms" if q == "p99" else "",
                         verdict(ok) if q == "p99" else ""))
        rows.append(("pairs", "send->sent p50/p99 ms",
                     f"{_fmt(get(im, 'sent_latency', 'p50_ms'), '.1f')}/"
                     f"{_fmt(get(im, 'sent_latency', 'p99_ms'), '.1f')}",
                     f"{_fmt(get(ba, 'sent_latency', 'p50_ms'), '.1f')}/"
                     f"{_fmt(get(ba, 'sent_latency', 'p99_ms'), '.1f')}", None, "", ""))
        _cpu_row(rows, "pairs", get(im, "cpu"), get(ba, "cpu"))
        _cost_row(rows, "pairs", "message", get(im, "cpu"), get(ba, "cpu"), ".0f", ".1f")
        si, sb = get(im, "cpu", "server_system_share"), get(ba, "cpu", "server_system_share")
        rows.append(("pairs", "  server CPU in the kernel (system calls, TCP)",
                     f"{_fmt(si and si * 100, '.0f')}%", f"{_fmt(sb and sb * 100, '.0f')}%",
                     None, "", ""))
        _integrity_row(rows, "pairs", im, ba)

    fo = results.get("fanout", {})
    if fo:
        im, ba = fo.get("imserver", {}), fo.get("bare", {})
        rate, brate = get(im, "rate"), get(ba, "rate")
        ratio = _ratio(rate, brate)
        ok = None if rate is None else (rate >= 45000 and (ratio or 0) >= 0.9
                                        and bool(im.get("complete")))
        rows.append(("fanout", f"deliveries/s (G={args.group_size}, M={args.group_messages})",
                     _fmt(rate), _fmt(brate), ratio, ">= 45,000 and >= 0.9x bare",
                     verdict(ok)))
        for q in ("p50", "p99"):
            v, b = get(im, "latency", f"{q}_ms"), get(ba, "latency", f"{q}_ms")
            ok = None if (q != "p99" or v is None) else v <= 150
            rows.append(("fanout", f"until last member {q} ms", _fmt(v, ".1f"), _fmt(b, ".1f"),
                         _ratio(v, b), "<= 150 ms" if q == "p99" else "",
                         verdict(ok) if q == "p99" else ""))
        rows.append(("fanout", "complete (every member has every message)",
                     str(get(im, "complete")), str(get(ba, "complete")), None, "", ""))
        _cpu_row(rows, "fanout", get(im, "cpu"), get(ba, "cpu"))
        _cost_row(rows, "fanout", "delivery", get(im, "cpu"), get(ba, "cpu"), ".1f", ".2f")
        _integrity_row(rows, "fanout", im, ba)

    idl = results.get("idle", {})
    if idl:
        im, ba = idl.get("imserver", {}), idl.get("bare", {})
        c = args.connections
        full = c >= 10000
        up, bup = get(im, "stayed_up"), get(ba, "stayed_up")
        ok = None if up is None else (up == c and full)
        rows.append(("idle", f"connections up after {args.idle_hold:g} s hold (of {c})",
                     _fmt(up), _fmt(bup), _ratio(up, bup),
                     "10,000, none dropped" + ("" if full else f" (C={c} < 10,000)"),
                     verdict(ok) if full else ("ok at this C" if up == c else "MISSED")))
        v, b = get(im, "rss_kb_per_conn"), get(ba, "rss_kb_per_conn")
        ok = None if v is None else v <= 40
        rows.append(("idle", "server RSS KB per connection", _fmt(v, ".1f"), _fmt(b, ".1f"),
                     _ratio(v, b), "<= 40 KB", verdict(ok)))
        rows.append(("idle", "server RSS KB per conn after the hold",
                     _fmt(get(im, "rss_kb_per_conn_after_hold"), ".1f"),
                     _fmt(get(ba, "rss_kb_per_conn_after_hold"), ".1f"), None, "", ""))
        rows.append(("idle", "server threads (open / before)",
                     f"{_fmt(get(im, 'threads_opened'))} / {_fmt(get(im, 'threads_before'))}",
                     f"{_fmt(get(ba, 'threads_opened'))} / {_fmt(get(ba, 'threads_before'))}",
                     None, "", ""))
        v, b = get(im, "burst", "all_answered_s"), get(ba, "burst", "all_answered_s")
        ok = None if im.get("failed") else (v is not None and v <= 2.0)
        rows.append(("idle", "burst: all pongs after s", _fmt(v, ".2f") if v is not None else
                     f"not all in {args.burst_timeout:g} s", _fmt(b, ".2f") if b is not None else
                     f"not all in {args.burst_timeout:g} s", _ratio(v, b), "<= 2 s",
                     verdict(ok)))
        rows.append(("idle", "burst: pongs within 2 s / pings",
                     f"{_fmt(get(im, 'burst', 'answered_within_2s'))} / "
                     f"{_fmt(get(im, 'burst', 'pings'))}",
                     f"{_fmt(get(ba, 'burst', 'answered_within_2s'))} / "
                     f"{_fmt(get(ba, 'burst', 'pings'))}", None, "", ""))
        rows.append(("idle", "dropped during the burst",
                     _fmt(get(im, "dropped_after_burst")), _fmt(get(ba, "dropped_after_burst")),
                     None, "0", ""))
        _cpu_row(rows, "idle hold", get(im, "hold_cpu"), get(ba, "hold_cpu"))
        _cpu_row(rows, "idle burst", get(im, "burst", "cpu"), get(ba, "burst", "cpu"))
        _issues_row(rows, "idle", im, ba)

    off = results.get("offline", {})
    if off:
        im, ba = off.get("imserver", {}), off.get("bare", {})
        v, b = get(im, "replay_s"), get(ba, "replay_s")
        k = args.offline_messages
        ok = None if im.get("failed") else (v is not None and v <= 0.5 and k >= 10000)
        rows.append(("offline", f"replay of K={k:,} s (connect -> last)", _fmt(v, ".3f"),
                     _fmt(b, ".3f"), _ratio(v, b),
                     "10,000 in <= 0.5 s" + ("" if k >= 10000 else f" (K={k})"),
                     verdict(ok) if k >= 10000 else ("ok at this K" if v and v <= 0.5 else "")))
        rows.append(("offline", "replayed / stored", f"{_fmt(get(im, 'replayed'))} / "
                     f"{_fmt(get(im, 'stored'))}", f"{_fmt(get(ba, 'replayed'))} / "
                     f"{_fmt(get(ba, 'stored'))}", None, "", ""))
        rows.append(("offline", "storing K: msg/s (W=%d)" % args.offline_window,
                     _fmt(get(im, "store_rate")), _fmt(get(ba, "store_rate")),
                     _ratio(get(im, "store_rate"), get(ba, "store_rate")), "", ""))
        _cpu_row(rows, "offline replay", get(im, "cpu"), get(ba, "cpu"))
        _integrity_row(rows, "offline", im, ba)

    wk = results.get("workers", {})
    if wk.get("skipped"):
        rows.append(("workers", "skipped", wk["skipped"], "", None, "", ""))
    elif wk:
        one, two, ba = wk.get("imserver_1", {}), wk.get("imserver_2", {}), wk.get("bare", {})
        r1, r2, rb = get(one, "rate"), get(two, "rate"), get(ba, "rate")
        rows.append(("workers", "pairs msg/s, 1 worker (Redis, unpinned)", _fmt(r1), _fmt(rb),
                     _ratio(r1, rb), "", ""))
        ratio = _ratio(r2, r1)
        rows.append(("workers", "pairs msg/s, 2 workers (Redis, unpinned)", _fmt(r2), _fmt(rb),
                     _ratio(r2, rb), "2 workers >= 1.6x 1",
                     "-" if ratio is None else ("met" if ratio >= 1.6 else "MISSED")))
        rows.append(("workers", "2 workers / 1 worker", _fmt(ratio, ".2f") + "x"
                     if ratio else "-", "", None, ">= 1.6x", ""))
        for label, d in (("1 worker", one), ("2 workers", two)):
            rows.append(("workers", f"latency p50/p99 ms, {label}",
                         f"{_fmt(get(d, 'latency', 'p50_ms'), '.1f')}/"
                         f"{_fmt(get(d, 'latency', 'p99_ms'), '.1f')}",
                         f"{_fmt(get(ba, 'latency', 'p50_ms'), '.1f')}/"
                         f"{_fmt(get(ba, 'latency', 'p99_ms'), '.1f')}", None, "", ""))
            _cpu_row(rows, f"workers {label}", get(d, "cpu"), get(ba, "cpu"))
        _integrity_row(rows, "workers 2", two, ba)
    return rows


def _cores(cpu: dict) -> str:
    """The busy share of each core (every process on the machine)."""
    cores = (cpu or {}).get("core_busy") or {}
    return "cores busy " + ("/".join(f"{v:.0%}" for _, v in sorted(cores.items())) or "-")


def _cpu_row(rows, scenario, im, ba):
    def fmt(cpu):
        if not cpu or cpu.get("generator_cpu") is None:
            return "-"
        flag = " SATURATED" if (cpu.get("generator_cpu") or 0) > SATURATED else ""
        return f"gen {cpu['generator_cpu']:.0%}{flag}, srv {cpu['server_cpu']:.0%}"

    rows.append((scenario, "CPU: generator, server (of one core)", fmt(im), fmt(ba), None,
                 "", ""))
    rows.append((scenario, "  cores busy, every process (0/1)",
                 _cores(im).split()[-1] if im else "-", _cores(ba).split()[-1] if ba else "-",
                 None, "", ""))


def _cost_row(rows, scenario, unit, im, ba, us_spec, switches_spec):
    """The server's CPU time and context switches per `unit` (message, delivery)."""
    def fmt(cpu):
        cpu = cpu or {}
        return (f"{_fmt(cpu.get(f'server_cpu_us_per_{unit}'), us_spec)} / "
                f"{_fmt(cpu.get(f'server_context_switches_per_{unit}'), switches_spec)}")

    rows.append((scenario, f"  server CPU us / context switches a {unit}", fmt(im), fmt(ba),
                 _ratio((im or {}).get(f"server_cpu_us_per_{unit}"),
                        (ba or {}).get(f"server_cpu_us_per_{unit}")), "", ""))


def _integrity_row(rows, scenario, im, ba):
    def fmt(d):
        if not d:
            return "-"
        if d.get("failed"):
            return "FAILED"
        bits = [f"{k}={d[k]}" for k in ("lost", "gaps", "dups", "error_frames",
                                         "dropped_connections") if d.get(k)]
        bits += [f"error {k}={v}" for k, v in (d.get("error_codes") or {}).items()]
        bits += [f"{k}={v}" for k, v in (d.get("log_issues") or {}).items()]
        return ", ".join(bits) or "clean"

    rows.append((scenario, "errors / losses / log issues", fmt(im), fmt(ba), None, "", ""))


def _issues_row(rows, scenario, im, ba):
    def fmt(d):
        if d.get("failed"):
            return "FAILED"
        return ", ".join(f"{k}={v}" for k, v in (d.get("log_issues") or {}).items()) or "clean"

    rows.append((scenario, "log issues", fmt(im), fmt(ba), None, "", ""))


def print_table(rows) -> str:
    head = ("scenario", "figure", "imserver", "bare relay", "ratio", "target", "result")
    table = [head] + [(s, f, i, b, "-" if r is None else f"{r:.2f}x", t, v)
                      for s, f, i, b, r, t, v in rows]
    widths = [max(len(str(row[c])) for row in table) for c in range(len(head))]
    lines = []
    for n, row in enumerate(table):
        lines.append("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    text = "\n".join(lines)
    print(text)
    return text


def _quantiles(values) -> dict:
    values, total = values if isinstance(values, tuple) else (values, None)
    values = sorted(values)
    out = {"n": len(values), "percentiles_ms": [
        _r(values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))], 3)
        for q in range(101)] if values else []}
    if total is not None:
        out["of"] = total
    return out


def plot(samples: dict, path: str) -> str:
    """Draw the CDF of every latency distribution; return a message."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (.venv/bin/pip install matplotlib): no plot"
    groups = {}
    for label, values in samples.items():
        values, total = values if isinstance(values, tuple) else (values, None)
        if values:
            groups.setdefault(label.split()[0], []).append((label, values, total))
    if not groups:
        return "no latency samples: no plot"
    fig, axes = plt.subplots(len(groups), 1, figsize=(9, 3.2 * len(groups)), squeeze=False)
    for ax, (name, series) in zip(axes[:, 0], groups.items()):
        for label, values, total in series:
            values = sorted(values)
            n = len(values)
            total = max(total or n, n)
            answered = f", {n:,} of {total:,}" if total > n else f", n={n:,}"
            ax.plot(values, [(i + 1) / total for i in range(n)],
                    label=f"{label} ({answered[2:]}, p50 {percentile(values, 50):.1f}, "
                          f"p99 {percentile(values, 99):.1f} ms)")
        ax.set_xscale("log")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction" + (" of pings" if name == "idle" else ""))
        ax.set_title(name)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot: {path}"


# -- main ---------------------------------------------------------------------------------


QUICK = {"pairs": 5, "duration": 3.0, "warmup": 0.5, "group_size": 20, "group_messages": 50,
         "connections": 100, "idle_hold": 4.0, "idle_ping_interval": 2.0,
         "offline_messages": 500, "workers_duration": 2.0, "burst_timeout": 10.0}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__[__doc__.index("Usage::"):],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help="comma-separated, of: " + ", ".join(SCENARIOS))
    p.add_argument("--quick", action="store_true",
                   help="small sizes and durations, for a smoke test (< 60 s)")
    p.add_argument("--out", default="bench-out", help="folder for results.json, "
                   "latency.png and logs/ (default: bench-out)")
    p.add_argument("--pairs", "-P", type=int, default=50, help="sender/receiver pairs")
    p.add_argument("--window", "-W", type=int, default=10,
                   help="send frames waiting for their sent, per sender")
    p.add_argument("--duration", type=float, default=10.0, help="pairs: measured seconds")
    p.add_argument("--warmup", type=float, default=1.0, help="pairs: seconds not measured")
    p.add_argument("--body-size", type=int, default=40, help="characters of each body")
    p.add_argument("--group-size", "-G", type=int, default=200,
                   help="fanout: members receiving (the sender is one more member)")
    p.add_argument("--group-messages", "-M", type=int, default=200,
                   help="fanout: messages sent")
    p.add_argument("--fanout-timeout", type=float, default=60.0)
    p.add_argument("--connections", "-C", type=int, default=10000,
                   help="idle: connections (the server gets C+200 threads)")
    p.add_argument("--idle-hold", type=float, default=60.0, help="idle: seconds held")
    p.add_argument("--idle-ping-interval", type=float, default=10.0,
                   help="idle: IMSERVER_PING_INTERVAL, so that the heartbeat runs in the hold")
    p.add_argument("--burst-timeout", type=float, default=30.0,
                   help="idle: seconds to wait for every pong")
    p.add_argument("--connect-concurrency", type=int, default=200,
                   help="idle: handshakes in flight at once")
    p.add_argument("--connect-timeout", type=float, default=60.0)
    p.add_argument("--offline-messages", "-K", type=int, default=10000)
    p.add_argument("--offline-window", type=int, default=100,
                   help="offline: send frames in flight while storing the K messages")
    p.add_argument("--offline-timeout", type=float, default=120.0)
    p.add_argument("--workers-duration", type=float, default=None,
                   help="workers: measured seconds (default: --duration)")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--register", choices=("auto", "http", "direct"), default="auto",
                   help="how imserver users are made (see the docstring)")
    p.add_argument("--http-users", type=int, default=4,
                   help="auto: users per imserver scenario registered over HTTP (the "
                        "others are inserted directly)")
    p.add_argument("--server-log-level", default="info",
                   choices=("debug", "info", "warning", "error"))
    p.add_argument("--quiet-wait", type=float, default=0.0,
                   help="before each measurement, wait up to this many seconds for every "
                        "core to be at most --quiet-busy busy (a shared machine)")
    p.add_argument("--quiet-busy", type=float, default=0.25)
    p.add_argument("--client", choices=("fast", "websockets"), default="fast",
                   help="WebSocket client of the generator (see the docstring)")
    p.add_argument("--servers", default="bare,imserver",
                   help="which servers to run each scenario against (default: both)")
    p.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                   help="an IMSERVER_ setting for every imserver server of the run (may be "
                        "given several times), e.g. IMSERVER_SWITCH_INTERVAL=0.1")
    p.add_argument("--postgres", metavar="URL", default=None,
                   help="run imserver on PostgreSQL: URL of an existing database of a "
                        "server where the bench may create and drop databases of its own "
                        "(imbench_<pid>_<port>), e.g. postgresql://postgres@127.0.0.1:5432/"
                        "test; default: a fresh SQLite file per server")
    p.add_argument("--no-pin", dest="pin", action="store_false",
                   help="pin nothing (on a machine with one core, nothing is pinned)")
    args = p.parse_args(argv)
    explicit = {a.dest for a in p._actions
                if any(opt in (argv if argv is not None else sys.argv[1:])
                       for opt in a.option_strings)}
    if args.quick:
        for key, value in QUICK.items():
            if key not in explicit:
                setattr(args, key, value)
    if args.workers_duration is None:
        args.workers_duration = args.duration
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    server_env = {}
    for item in args.server_env:
        name, sep, value = item.partition("=")
        if not sep or not name.startswith("IMSERVER_"):
            p.error(f"--server-env wants IMSERVER_NAME=VALUE, not {item!r}")
        server_env[name] = value
    args.server_env = server_env
    if not set(args.servers) <= {"bare", "imserver"}:
        p.error("--servers: bare and/or imserver")
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    return args


def setup_process(args) -> list:
    """Pin this process to its core and raise its file limit; return notes."""
    notes = []
    if args.pin and (os.cpu_count() or 1) >= 2 and shutil.which("taskset"):
        os.sched_setaffinity(0, {BENCH_CORE})
        notes.append(f"generator pinned to core {BENCH_CORE}, servers to core {SERVER_CORE} "
                     "(taskset), except in workers")
    else:
        args.pin = False
        notes.append("nothing pinned")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    notes.append(f"RLIMIT_NOFILE {limit}")
    try:
        with open("/proc/sys/kernel/pid_max") as f:
            pid_max = int(f.read())
        notes.append(f"kernel.pid_max {pid_max}: the threads of the whole machine (imserver "
                     "holds one a connection, the bare relay two)")
    except OSError:
        pid_max = None
    if "idle" in args.scenarios:
        if args.connections + 100 > limit:
            raise SystemExit(f"--connections {args.connections} needs more than "
                             f"RLIMIT_NOFILE {limit} file descriptors")
        if pid_max and 2 * args.connections > pid_max - 2000:
            raise SystemExit(f"--connections {args.connections}: 2 threads each would pass "
                             f"kernel.pid_max {pid_max}")
    return notes


def git_describe() -> dict:
    """The commit of the code measured, and whether the tree has changes."""
    def git(*cmd):
        try:
            return subprocess.run(["git", "-C", REPO, *cmd], capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def main(argv=None) -> int:
    global CLIENT
    args = parse_args(argv)
    CLIENT = args.client
    notes = setup_process(args)
    if args.postgres:
        notes.append("imserver on PostgreSQL (--postgres): a database of its own per server")
    os.makedirs(args.out, exist_ok=True)
    args.logdir = os.path.join(args.out, "logs")
    os.makedirs(args.logdir, exist_ok=True)
    started = time.time()
    print("bench: " + " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]))
    for note in notes:
        print("  " + note)
    results = {s: {} for s in args.scenarios}
    samples = {}
    runners = {"pairs": scenario_pairs, "fanout": scenario_fanout, "idle": scenario_idle,
               "offline": scenario_offline, "workers": scenario_workers}
    with tempfile.TemporaryDirectory(prefix="imbench-") as workdir:
        args.workdir = workdir
        for scenario in SCENARIOS:
            if scenario in args.scenarios:
                print(f"\n== {scenario}", flush=True)
                t = time.monotonic()
                runners[scenario](args, results, samples)
                print(f"== {scenario}: {time.monotonic() - t:.1f} s", flush=True)
    print()
    rows = build_table(results, args)
    table = print_table(rows)
    config = {k: v for k, v in vars(args).items() if k not in ("workdir", "logdir")}
    out = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "elapsed_s": round(time.time() - started, 1),
        "command": sys.argv,
        "config": config,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(), "notes": notes},
        "code": git_describe(),
        "results": results,
        "table": [dict(zip(("scenario", "figure", "imserver", "bare", "ratio", "target",
                            "result"), row)) for row in rows],
        "table_text": table,
        # Each latency distribution as its 0th..100th percentiles, in ms.
        "distributions": {label: _quantiles(values) for label, values in samples.items()},
    }
    path = os.path.join(args.out, "results.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print(f"\nresults: {path}")
    print(plot(samples, os.path.join(args.out, "latency.png")))
    print(f"logs: {args.logdir}; elapsed {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
