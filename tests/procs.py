"""Run the real server as a subprocess, and speak to it.

``ServerProcess`` starts ``imserver serve`` (gunicorn, gthread worker) or any
other command line that serves the app, on a free port of 127.0.0.1, with a
SQLite file under the test's ``tmp_path`` and the environment the test asks
for; it returns once ``GET /healthz`` answers 200. Its HTTP and WebSocket
helpers are those of conftest's ``LiveServer`` (``request``, ``user``,
``ws_url``; ``User.connect`` gives a conftest ``Client``), so a test speaks
to a subprocess exactly as to the in-process server.

The server runs in its own session (``start_new_session``), so its process
group holds gunicorn's arbiter and workers and nothing else: ``kill9`` and
the last-resort cleanup signal that group, by the id of the process this
module started, never anything found by name.

Not a test module: tests import it as ``procs`` (pytest puts ``tests/`` on
``sys.path``, as for ``conftest``).
"""

import itertools
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from conftest import LiveServer
from conftest import T
from conftest import User

# Seconds a server gets to answer /healthz after it is started.
START_TIMEOUT = 6 * T

_starts = itertools.count(1)


def free_port() -> int:
    """Return a TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve_argv(port: int, *extra: str) -> list:
    """Return the command line of ``imserver serve`` on ``port``."""
    return [sys.executable, "-c", "from imserver.cli import main; main()", "serve",
            "--host", "127.0.0.1", "--port", str(port), "--threads", "200", *extra]


def server_env(tmp_path, db_path=None, **extra) -> dict:
    """Return the environment of a test server: ours, without the caller's IMSERVER_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMSERVER_")}
    env.update({
        "IMSERVER_DATABASE_URL": "sqlite:///" + str(db_path or tmp_path / "im.sqlite3"),
        "IMSERVER_SECRET_KEY": "test",
        "IMSERVER_RATE_LIMIT": "100000",
        "IMSERVER_RATE_BURST": "100000",
        "IMSERVER_AUTH_RATE_LIMIT": "100000",
        "IMSERVER_AUTH_RATE_BURST": "100000",
        "PYTHONUNBUFFERED": "1",
    })
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _proc_state(pid: int):
    """Return ``(state, pgrp)`` of a process from /proc, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name is in parentheses and may hold spaces.
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[0], int(fields[2])


class ServerProcess(LiveServer):
    """The server as a subprocess; HTTP and WebSocket helpers of ``LiveServer``.

    ``argv(port)`` builds the command line (``imserver serve`` by default);
    ``env`` is added to the test environment of ``server_env``. Every start
    writes its output to its own log file under ``tmp_path``.
    """

    def __init__(self, tmp_path, env=None, argv=serve_argv, db_path=None, port=None,
                 start=True):
        self.app = None
        self.hub = None
        self.tmp_path = tmp_path
        self.argv = argv
        self.env = server_env(tmp_path, db_path, **(env or {}))
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None
        self.log_path = None
        self._log_file = None
        if start:
            self.start()

    # -- life -------------------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the process; return once /healthz answers 200."""
        self.log_path = self.tmp_path / f"server-{next(_starts)}-{self.port}.log"
        self._log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            self.argv(self.port), env=self.env, cwd=str(self.tmp_path),
            stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT,
            start_new_session=True)
        self.pgid = self.proc.pid
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"server exited with {self.proc.returncode} before answering "
                    f"/healthz:\n{self.log()}")
            if self._healthy():
                return
            if time.monotonic() > deadline:
                self.kill9()
                raise AssertionError(f"server did not answer /healthz in {timeout} s:\n"
                                     f"{self.log()}")
            time.sleep(0.05)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/healthz", timeout=1) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def get_text(self, path: str) -> tuple:
        """Return ``(status, text)`` of a GET that does not answer JSON."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=T) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def group_pids(self) -> list:
        """Return the live (not zombie) processes of the server's process group."""
        pids = []
        for name in os.listdir("/proc"):
            if name.isdigit():
                state = _proc_state(int(name))
                if state is not None and state[1] == self.pgid and state[0] != "Z":
                    pids.append(int(name))
        return pids

    def worker_pids(self) -> list:
        """Return the pids of gunicorn's workers (the group but the arbiter)."""
        return [pid for pid in self.group_pids() if pid != self.proc.pid]

    def wait_group_gone(self, timeout: float = 2 * T) -> bool:
        """Wait until no process of the group is alive; return whether it happened."""
        deadline = time.monotonic() + timeout
        while self.group_pids():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def terminate(self) -> None:
        """Send SIGTERM to the process started (gunicorn passes it to its workers)."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int | None:
        """Wait for the process to exit; return its code, or None on timeout."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 6 * T) -> int | None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL the group; return the code."""
        if self.proc is None:
            return None
        self.terminate()
        code = self.wait(timeout)
        if code is None:
            self.kill9()
        else:
            # The workers are gone before the arbiter exits, unless orphaned.
            if not self.wait_group_gone():
                self._signal_group(signal.SIGKILL)
                self.wait_group_gone()
        self._close_log()
        return code

    def kill9(self) -> None:
        """SIGKILL the arbiter and its workers at once (``kill -9`` of the server)."""
        if self.proc is None:
            return
        self._signal_group(signal.SIGKILL)
        self.wait(2 * T)
        self.wait_group_gone()
        self._close_log()

    def _signal_group(self, signum) -> None:
        # Only the group of the process this object started.
        try:
            os.killpg(self.pgid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def cleanup(self) -> None:
        """Make sure nothing of this server is left running (test teardown)."""
        if self.proc is not None and (self.alive() or self.group_pids()):
            self._signal_group(signal.SIGKILL)
            self.wait(2 * T)
        self._close_log()

    def log(self) -> str:
        """Return what the server printed so far."""
        if self.log_path is None:
            return ""
        if self._log_file is not None:
            self._log_file.flush()
        return self.log_path.read_text(errors="replace")

    def adopt(self, user: User) -> User:
        """Return ``user`` (registered with another server on the same
        database) speaking to this server, with the same token."""
        return User(user.id, user.name, user.token, self)

    def restart(self, **kwargs) -> "ServerProcess":
        """Return a new server on the same database file and environment."""
        server = ServerProcess(self.tmp_path, argv=self.argv, start=False, **kwargs)
        server.env = dict(self.env)
        server.start()
        return server


class ServerPool:
    """Start ``ServerProcess`` objects for one test; clean up what is left.

    Call it to start a server, ``restart(server)`` for a new one on the
    same database; ``close(print_logs)`` kills whatever still runs.
    """

    def __init__(self, tmp_path) -> None:
        self.tmp_path = tmp_path
        self.started = []

    def __call__(self, **kwargs) -> "ServerProcess":
        server = ServerProcess(self.tmp_path, **kwargs)
        self.started.append(server)
        return server

    def restart(self, server: "ServerProcess", **kwargs) -> "ServerProcess":
        new = server.restart(**kwargs)
        self.started.append(new)
        return new

    def close(self, print_logs: bool = False) -> None:
        for server in self.started:
            if print_logs:
                print(f"---- server log {server.log_path} ----\n{server.log()}")
            server.cleanup()


def worker_of(server: "ServerProcess", client) -> int:
    """Return the pid of the gunicorn worker holding ``client``'s connection.

    Reads the kernel's table of TCP sockets for the server-side socket whose
    peer is the client's port, then finds which worker has it open.
    """
    ws = client.ws if hasattr(client, "ws") else client
    sock = ws.socket if hasattr(ws, "socket") else ws.sock
    client_port = sock.getsockname()[1]
    wanted_local = f"0100007F:{server.port:04X}"
    wanted_remote = f"0100007F:{client_port:04X}"
    inode = None
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if fields[1] == wanted_local and fields[2] == wanted_remote:
                inode = fields[9]
                break
    assert inode is not None, f"no server socket for client port {client_port}"
    target = f"socket:[{inode}]"
    for pid in server.worker_pids():
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                        return pid
                except OSError:
                    continue
        except OSError:
            continue
    raise AssertionError(f"no worker holds {target}")
