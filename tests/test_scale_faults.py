"""Several gunicorn workers on PostgreSQL and Redis, when something breaks.

Every test runs the real server (``imserver serve --workers 2``) as a
subprocess against the real PostgreSQL (a fresh database per test) and a
real Redis, then breaks one piece for real: a worker is killed with
SIGKILL, Redis stops and comes back, Redis or PostgreSQL is not there at
start, the server gets SIGTERM. What is checked is the contract's promise
in each case: nothing acknowledged with ``sent`` is lost, inbox entries come
back dense and in order, ``/healthz`` tells the truth and recovers by itself,
presence and the one-connection rule hold across workers.

Which worker accepts a connection is the kernel's choice: tests connect
users until each worker holds the ones they need (``worker_of`` reads it
from /proc). They synchronise on frames and close codes, or poll with one
deadline (``wait_until``); the waits that depend on the server's own timers
(the sweep every 10 s, the liveness key's 15 s, the Redis subscriber's
reconnect backoff) get deadlines sized from those timers.
"""

import concurrent.futures
import contextlib
import itertools
import os
import re
import signal
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.exceptions import WebSocketException

from conftest import T
from conftest import wait_until
from procs import ServerProcess
from procs import free_port
from procs import serve_argv
from procs import worker_of

# The server's own timers (imserver.hub.SWEEP_INTERVAL, RedisBroker.NODE_TTL
# and the subscriber's reconnect backoff, at most 10 s).
SWEEP_INTERVAL = 10.0
NODE_TTL = 15.0
REDIS_BACKOFF_MAX = 10.0

_cids = itertools.count(1)
_names = itertools.count(1)


def two_workers(port):
    return serve_argv(port, "--workers", "2")


def cluster_env(database_url: str, redis_url: str, prefix: str) -> dict:
    """Return the environment of a server on PostgreSQL and Redis."""
    return {"IMSERVER_DATABASE_URL": database_url, "IMSERVER_REDIS_URL": redis_url,
            "IMSERVER_REDIS_PREFIX": prefix}


# -- clients ---------------------------------------------------------------------------


class Peer:
    """One live connection of a user and every frame it received, filed by type."""

    def __init__(self, user, client):
        self.user = user
        self.client = client
        self.messages = []  # message frames, in arrival order
        self.sent = {}  # cid -> sent frame
        self.pongs = 0
        self.closed = None  # the ConnectionClosed that ended the connection

    @property
    def id(self):
        return self.user.id

    def send_to(self, to: int, body: str) -> str:
        """Send a message with a cid unique in the test run; return the cid."""
        cid = f"f{next(_cids)}"
        self.client.send_to(to, body, cid=cid)
        return cid

    def ack(self, seq: int) -> None:
        self.client.send({"type": "ack", "seq": seq})

    def _file(self, frame: dict) -> None:
        kind = frame["type"]
        if kind == "message":
            self.messages.append(frame)
        elif kind == "sent":
            assert frame["cid"] not in self.sent, frame
            self.sent[frame["cid"]] = frame
        elif kind == "pong":
            self.pongs += 1
        else:
            # No test here expects a refusal (an error frame) or anything else.
            raise AssertionError(f"unexpected frame {frame}")

    def pump(self, predicate, timeout: float = T, what: str = "frames") -> None:
        """File frames until ``predicate()`` holds, or fail at ``timeout``."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.closed is not None:
                raise AssertionError(f"{self.user.name}: closed ({self.closed!r}) "
                                     f"while waiting for {what}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{self.user.name}: timed out waiting for {what}")
            try:
                frame = self.client.recv(timeout=min(remaining, 1.0))
            except TimeoutError:
                continue
            except ConnectionClosed as exc:
                self.closed = exc
                continue
            self._file(frame)

    def sync(self, timeout: float = 2 * T) -> None:
        """Ping and file every frame that arrives before the pong."""
        before = self.pongs
        self.client.send({"type": "ping"})
        self.pump(lambda: self.pongs > before, timeout, "pong")

    def wait_closed(self, timeout: float = 2 * T) -> ConnectionClosed:
        """File frames until the server ends the connection; return how it ended."""
        self.pump(lambda: self.closed is not None, timeout, "the connection to close")
        return self.closed

    def wait_sent(self, cids, timeout: float = 2 * T) -> dict:
        """Wait for ``sent`` of every cid; return cid -> message id."""
        cids = list(cids)
        self.pump(lambda: all(c in self.sent for c in cids), timeout,
                  f"sent of {len(cids)} messages")
        return {c: self.sent[c]["id"] for c in cids}

    def close(self) -> None:
        self.client.close()


class Lab:
    """The servers, clients and helpers of one test; everything ends at teardown."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.servers = []
        self.peers = []
        # Anything else to stop at teardown (a redis-server, a forwarder).
        self.stack = contextlib.ExitStack()

    def start(self, env: dict, start: bool = True) -> ServerProcess:
        """Start ``imserver serve --workers 2`` with ``env``."""
        cls = ServerProcess if start else UnwaitedServer
        server = cls(self.tmp_path, env=env, argv=two_workers)
        self.servers.append(server)
        if start:
            # /healthz answered from one worker: wait for the other to be there.
            wait_until(lambda: len(server.worker_pids()) == 2, 2 * T, "two workers")
        return server

    def restart(self, server: ServerProcess) -> ServerProcess:
        new = server.restart()
        self.servers.append(new)
        return new

    def users(self, server: ServerProcess, n: int) -> list:
        """Register ``n`` users at once (the password hash is slow on purpose)."""
        names = [f"u{os.getpid()}x{next(_names)}" for _ in range(n)]
        with concurrent.futures.ThreadPoolExecutor(max_workers=n) as pool:
            return list(pool.map(server.user, names))

    def connect(self, user) -> Peer:
        """Open a WebSocket for ``user`` and check ``ready``."""
        client = user.connect(ready=False)
        try:
            assert client.recv() == {"type": "ready", "user_id": user.id}
        except BaseException:
            client.close()
            raise
        peer = Peer(user, client)
        self.peers.append(peer)
        return peer

    def reconnect(self, user, timeout: float = 4 * T) -> Peer:
        """Connect ``user``, retrying until the server takes it or ``timeout``."""
        errors = []

        def attempt():
            try:
                return self.connect(user)
            except (OSError, WebSocketException, AssertionError) as exc:
                errors.append(exc)
                return None

        try:
            return wait_until(attempt, timeout, f"a connection of {user.name}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last error: {errors[-1:]!r}") from None

    def spread(self, server: ServerProcess, per_worker: int) -> tuple:
        """Connect new users until each worker holds ``per_worker`` of them.

        Returns ``(pids, peers)``: the two worker pids and, for each, a list
        of ``per_worker`` peers connected to it. Extra connections are closed.
        """
        by_pid: dict = {}
        for _ in range(10):
            for user in self.users(server, per_worker + 1):
                peer = self.connect(user)
                pid = worker_of(server, peer.client)
                group = by_pid.setdefault(pid, [])
                if len(group) < per_worker:
                    group.append(peer)
                else:
                    peer.close()
            if len(by_pid) == 2 and all(len(g) == per_worker for g in by_pid.values()):
                pids = sorted(by_pid)
                return pids, [by_pid[pid] for pid in pids]
        raise AssertionError(f"connections did not spread over two workers: "
                             f"{ {pid: len(g) for pid, g in by_pid.items()} }")

    def close(self) -> None:
        for peer in self.peers:
            with contextlib.suppress(Exception):
                peer.close()
        for server in self.servers:
            server.cleanup()
        self.stack.close()


class UnwaitedServer(ServerProcess):
    """A ``ServerProcess`` whose first start returns without waiting for /healthz 200.

    For a server started while a service it needs is away: it answers 503
    until the service comes, and the test polls that itself.
    """

    _launching = False

    def start(self, *args, **kwargs):
        self._launching = True
        try:
            super().start(*args, **kwargs)
        finally:
            self._launching = False

    def _healthy(self) -> bool:
        return self._launching or super()._healthy()


@pytest.fixture
def lab(tmp_path):
    lab = Lab(tmp_path)
    yield lab
    lab.close()


# -- HTTP and database helpers ---------------------------------------------------------


def health(server: ServerProcess):
    """Return the status of ``GET /healthz``, or None if nothing answers yet."""
    try:
        with urllib.request.urlopen(server.url + "/healthz", timeout=T) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        exc.read()
        exc.close()
        return exc.code
    except (urllib.error.URLError, OSError):
        return None


def presence(server: ServerProcess, token: str, *ids) -> dict:
    """Return ``{user_id: online}`` from ``GET /api/presence``."""
    status, body = server.request("GET", "/api/presence?ids=" + ",".join(map(str, ids)),
                                  token=token)
    assert status == 200, body
    return {int(k): v for k, v in body["online"].items()}


def wait_presence(server: ServerProcess, token: str, expected: dict,
                  timeout: float = 2 * T, what: str = "presence") -> None:
    """Poll presence until it reads ``expected``, then check that it holds.

    A user is in the presence hash a moment after its ``ready`` (which goes
    out first); the repeated reads reach both workers.
    """
    wait_until(lambda: presence(server, token, *expected) == expected, timeout, what)
    for _ in range(6):
        assert presence(server, token, *expected) == expected


def history(server: ServerProcess, user, other_id: int) -> list:
    """Return every message between ``user`` and ``other_id``, ascending."""
    messages, before = [], ""
    while True:
        status, body = server.request(
            "GET", f"/api/messages?with={other_id}&limit=100{before}", token=user.token)
        assert status == 200, body
        messages[:0] = body["messages"]
        if not body["has_more"]:
            return messages
        before = f"&before={body['messages'][0]['id']}"


def acked_seq(pg_url: str, user_id: int) -> int:
    """Read a user's acked cursor straight from PostgreSQL."""
    import psycopg

    with psycopg.connect(pg_url, autocommit=True, connect_timeout=5) as conn:
        return conn.execute("SELECT acked_seq FROM users WHERE id = %s",
                            (user_id,)).fetchone()[0]


def wait_acked(pg_url: str, user_id: int, seq: int) -> None:
    """Wait until the ack of ``seq`` is committed (acks have no answer frame)."""
    wait_until(lambda: acked_seq(pg_url, user_id) >= seq, 2 * T, f"ack {seq} committed")


def kill_worker(server: ServerProcess, pid: int) -> None:
    """SIGKILL one worker of ``server`` (only ours) and wait until it is gone."""
    assert pid in server.worker_pids(), (pid, server.worker_pids())
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: pid not in server.worker_pids(), T, f"worker {pid} gone")


def wait_replaced(server: ServerProcess, pid: int) -> None:
    """Wait until gunicorn runs two workers again, none of them ``pid``."""

    def replaced():
        pids = server.worker_pids()
        return len(pids) == 2 and pid not in pids

    wait_until(replaced, 4 * T, f"gunicorn to replace worker {pid}")


def assert_dense(frames: list, first: int = 1) -> None:
    """Check that entries carry seqs first, first+1, ... and distinct ids."""
    seqs = [f["seq"] for f in frames]
    assert seqs == list(range(first, first + len(frames))), seqs
    ids = [f["id"] for f in frames]
    assert len(set(ids)) == len(ids), ids


# -- 1. kill -9 of a worker ------------------------------------------------------------


def test_killed_worker_clients_reconnect_and_get_every_entry(pg_url, redis_url, lab):
    """SIGKILL of a worker: its clients come back and get exactly their unacked ones."""
    server = lab.start(cluster_env(pg_url, *redis_url))
    (x, _), ([a, c], [b, _]) = lab.spread(server, 2)

    # Before the kill: A and B chat across workers, B writes to C; A acks
    # part of what it got, C all of it.
    to_a = [b.send_to(a.id, f"b->a {i}") for i in range(5)]
    to_c = [b.send_to(c.id, f"b->c {i}") for i in range(3)]
    to_b = [a.send_to(b.id, f"a->b {i}") for i in range(5)]
    ids_to_a = b.wait_sent(to_a)
    b.wait_sent(to_c)
    a.wait_sent(to_b)
    a.pump(lambda: len(a.messages) == 5, what="5 messages from B")
    c.pump(lambda: len(c.messages) == 3, what="3 messages from B")
    b.pump(lambda: len(b.messages) == 5, what="5 messages from A")
    assert [m["id"] for m in a.messages] == [ids_to_a[cid] for cid in to_a]
    assert_dense(a.messages)
    assert_dense(c.messages)
    a.ack(3)
    c.ack(3)
    wait_acked(pg_url, a.id, 3)
    wait_acked(pg_url, c.id, 3)

    # A bursts to B and worker X is killed while the burst is in flight.
    burst = [f"burst {i}" for i in range(300)]
    burst_cids = []

    def send_burst():
        try:
            for body in burst:
                burst_cids.append(a.send_to(b.id, body))
        except ConnectionClosed:
            pass  # the worker died under the burst

    sender = threading.Thread(target=send_burst, daemon=True)
    sender.start()
    a.pump(lambda: len(a.sent) >= len(to_b) + 30, what="30 sent frames of the burst")
    kill_worker(server, x)

    # The clients on X see their connection drop (no close frame: the
    # process is gone).
    for peer in (a, c):
        closed = peer.wait_closed()
        assert closed.rcvd is None, closed
    sender.join(T)
    assert not sender.is_alive()
    acked_burst = {cid: frame["id"] for cid, frame in a.sent.items() if cid not in to_b}
    assert len(acked_burst) >= 30

    # While they are away, B writes to both.
    later_a = [b.send_to(a.id, f"b->a later {i}") for i in range(4)]
    later_c = [b.send_to(c.id, f"b->c later {i}") for i in range(2)]
    ids_later_a = b.wait_sent(later_a)
    ids_later_c = b.wait_sent(later_c)

    # gunicorn starts a new worker; A and C connect again.
    wait_replaced(server, x)
    a2 = lab.reconnect(a.user)
    c2 = lab.reconnect(c.user)
    a2.sync()
    c2.sync()
    # Exactly the unacked entries and the new ones, from the acked cursor on.
    assert_dense(a2.messages, first=4)
    assert [m["id"] for m in a2.messages] == (
        [ids_to_a[cid] for cid in to_a[3:]] + [ids_later_a[cid] for cid in later_a])
    assert [m["body"] for m in a2.messages] == (
        ["b->a 3", "b->a 4"] + [f"b->a later {i}" for i in range(4)])
    assert_dense(c2.messages, first=4)
    assert [m["id"] for m in c2.messages] == [ids_later_c[cid] for cid in later_c]

    # Everything A had acknowledged with sent is in the history.
    stored = {m["id"]: m for m in history(server, b.user, a.id)}
    for cid, message_id in acked_burst.items():
        assert message_id in stored, f"acknowledged {cid} (id {message_id}) lost"
        assert stored[message_id]["cid"] == cid
    from_a = [m for m in stored.values() if m["from"] == a.id]
    assert {m["cid"] for m in from_a} <= set(to_b) | set(burst_cids)

    # B (on the surviving worker) gets every entry X committed for it, also
    # those whose notification died with X: the sweep reads them back.
    wanted = {m["id"] for m in from_a}
    b.pump(lambda: wanted <= {m["id"] for m in b.messages}, SWEEP_INTERVAL + 3 * T,
           f"all {len(wanted)} messages A stored for B")
    b.sync()
    assert_dense(b.messages)
    assert {m["id"] for m in b.messages} == wanted

    # The survivors and the reconnected clients chat across workers as before.
    cid = a2.send_to(b.id, "after the kill")
    a2.wait_sent([cid])
    b.pump(lambda: b.messages[-1]["cid"] == cid, what="a live message after the kill")
    assert b.messages[-1]["seq"] == len(wanted) + 1


# -- 2. Redis restarting under traffic -------------------------------------------------


def test_redis_restart_under_traffic_delays_but_loses_nothing(pg_url, own_redis, lab):
    """Redis stops and comes back: sends go on, deliveries and health recover alone."""
    server = lab.start(cluster_env(pg_url, own_redis.url, "faults:"))
    _, ([a], [b]) = lab.spread(server, 1)
    carol, dave = lab.users(server, 2)

    def chat(n, tag):
        to_b = [a.send_to(b.id, f"{tag} a->b {i}") for i in range(n)]
        to_a = [b.send_to(a.id, f"{tag} b->a {i}") for i in range(n)]
        return list(a.wait_sent(to_b).values()), list(b.wait_sent(to_a).values())

    chat(5, "before")
    b.pump(lambda: len(b.messages) == 5, what="5 messages before the outage")
    a.pump(lambda: len(a.messages) == 5, what="5 messages before the outage")
    wait_presence(server, a.user.token, {a.id: True, b.id: True, carol.id: False})

    own_redis.stop()
    wait_until(lambda: health(server) == 503, 2 * T, "/healthz 503 without Redis")
    # The database is the truth: sends are stored and acknowledged anyway,
    # and a user can connect (its presence is restored when Redis is back).
    c = lab.connect(carol)
    outage_ab, outage_ba = chat(10, "outage 1")
    to_c = [a.send_to(carol.id, f"a->c {i}") for i in range(3)]
    to_c = list(a.wait_sent(to_c).values())
    # Redis stays away while the subscribers back off (0.5, 1, 2 s, ...),
    # and the traffic goes on.
    wait_until(lambda: server.log().count("redis unreachable") >= 6, 3 * T,
               "the Redis subscribers to back off")
    more_ab, more_ba = chat(10, "outage 2")
    outage_ab += more_ab
    outage_ba += more_ba
    assert len(set(outage_ab) | set(outage_ba)) == 40
    assert health(server) == 503

    own_redis.start()
    # Whatever worker answers, it says 200 again by itself.
    wait_until(lambda: all(health(server) == 200 for _ in range(6)),
               REDIS_BACKOFF_MAX + 2 * T, "/healthz 200 after Redis is back")
    # Every message sent during the outage reaches its receiver, which never
    # reconnected, in seq order with no gap.
    for peer, ids, before in ((b, outage_ab, 5), (a, outage_ba, 5), (c, to_c, 0)):
        wanted = set(ids)
        peer.pump(lambda: wanted <= {m["id"] for m in peer.messages},
                  SWEEP_INTERVAL + 2 * T, "the messages sent during the outage")
        peer.sync()
        assert_dense(peer.messages)
        assert [m["id"] for m in peer.messages[before:]] == ids

    # Presence works again (Redis came back empty: the workers restored it).
    expected = {a.id: True, b.id: True, carol.id: True, dave.id: False}
    wait_presence(server, dave.token, expected, what="presence after Redis is back")
    # Live delivery across workers works again, at once.
    cid = a.send_to(b.id, "after the outage")
    b.pump(lambda: b.messages[-1]["cid"] == cid, T, "a live message after the outage")
    assert b.messages[-1]["seq"] == 26
    b.close()
    wait_presence(server, dave.token, {b.id: False}, what="B offline after closing")


# -- 3. Redis unreachable at start -----------------------------------------------------


def test_server_starts_without_redis_and_recovers_when_it_comes(pg_url, own_redis, lab):
    """Redis not there at start: the server runs, says 503 and why, then heals alone."""
    own_redis.stop()  # its port is now free: nothing listens there
    server = lab.start(cluster_env(pg_url, own_redis.url, "faults:"), start=False)
    wait_until(lambda: health(server) == 503, 4 * T, "/healthz 503 without Redis")
    wait_until(lambda: re.search(r"redis unreachable", server.log(), re.I), 2 * T,
               "the log to say Redis is unreachable")
    assert server.alive()
    assert f"127.0.0.1:{own_redis.port}" in server.log()
    # The database works meanwhile.
    alice, bob = lab.users(server, 2)

    own_redis.start()
    # Each worker's subscriber retries on its own: wait until whichever
    # answers says 200.
    wait_until(lambda: all(health(server) == 200 for _ in range(6)),
               REDIS_BACKOFF_MAX + 2 * T, "/healthz 200 once Redis answers")
    a, b = lab.connect(alice), lab.connect(bob)
    cid = a.send_to(bob.id, "redis came")
    a.wait_sent([cid])
    b.pump(lambda: len(b.messages) == 1, what="the message")
    assert b.messages[0]["cid"] == cid


# -- 4. PostgreSQL unreachable at start ------------------------------------------------


class Forwarder:
    """A TCP forwarder from 127.0.0.1:``port`` to ``target``, run by threads.

    Stands in for a database that comes up late: nothing listens on the
    port until the test creates it. ``stop`` closes every socket and joins
    every thread.
    """

    def __init__(self, port: int, target: tuple):
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", port))
        self.listener.settimeout(0.1)
        self._stop = threading.Event()
        # Guards _sockets and _threads, shared with the accepting thread.
        self._lock = threading.Lock()
        self._sockets = []
        self._threads = []
        self.accepted = 0
        self._acceptor = threading.Thread(target=self._accept, name="forwarder",
                                          daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            with self._lock:
                if self._stop.is_set():
                    client.close()
                    upstream.close()
                    return
                self.accepted += 1
                self._sockets += [client, upstream]
                for src, dst in ((client, upstream), (upstream, client)):
                    thread = threading.Thread(target=self._pipe, args=(src, dst),
                                              daemon=True)
                    thread.start()
                    self._threads.append(thread)

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def stop(self) -> None:
        self._stop.set()
        self._acceptor.join(T)
        self.listener.close()
        with self._lock:
            sockets, threads = list(self._sockets), list(self._threads)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(T)
        for sock in sockets:
            sock.close()


def test_server_starts_without_postgres_and_recovers_when_it_comes(pg_url, redis_url,
                                                                   lab):
    """PostgreSQL not there at start: 503 and ``unavailable`` until it comes."""
    parts = urllib.parse.urlsplit(pg_url)
    port = free_port()
    userinfo = parts.netloc.rpartition("@")[0]
    away_url = urllib.parse.urlunsplit(
        parts._replace(netloc=f"{userinfo}@127.0.0.1:{port}" if userinfo
                       else f"127.0.0.1:{port}"))
    server = lab.start(cluster_env(away_url, *redis_url), start=False)

    wait_until(lambda: health(server) == 503, 4 * T,
               "/healthz 503 without the database")
    status, body = server.request("POST", "/api/users",
                                  {"username": "early", "password": "password123"})
    assert status == 503, body
    assert body["error"]["code"] == "unavailable"
    wait_until(lambda: re.search(r"database unreachable", server.log(), re.I), 2 * T,
               "the log to say the database is unreachable")
    assert server.alive()
    assert health(server) == 503
    # Let the background retries back off (0.5, 1, 2 s, ...): the database
    # then comes back between two of them, as it would in production.
    wait_until(lambda: server.log().count("database still unreachable") >= 4, 3 * T,
               "the background retries to back off")

    forwarder = Forwarder(port, (parts.hostname, parts.port or 5432))
    lab.stack.callback(forwarder.stop)
    # Each worker retries on its own: wait until whichever answers says 200.
    wait_until(lambda: all(health(server) == 200 for _ in range(6)), 4 * T,
               "/healthz 200 once the database answers")
    assert forwarder.accepted >= 1
    # Healthy means serving: registration works at once.
    status, body = server.request("POST", "/api/users",
                                  {"username": "early", "password": "password123"})
    assert status == 201, body
    alice, bob = lab.users(server, 2)
    a, b = lab.connect(alice), lab.connect(bob)
    cid = a.send_to(bob.id, "the database came")
    a.wait_sent([cid])
    b.pump(lambda: len(b.messages) == 1, what="the message")
    assert b.messages[0]["cid"] == cid


# -- 5. SIGTERM with two workers -------------------------------------------------------


def test_sigterm_with_two_workers_closes_all_with_1001_and_keeps_what_was_acked(
        pg_url, redis_url, lab):
    """SIGTERM: every client on every worker gets 1001, nothing acknowledged is lost."""
    server = lab.start(cluster_env(pg_url, *redis_url))
    _, ([a, a_other], [b, b_other]) = lab.spread(server, 2)
    (carol,) = lab.users(server, 1)

    to_b = [a.send_to(b.id, f"a->b {i}") for i in range(5)]
    to_a = [b.send_to(a.id, f"b->a {i}") for i in range(5)]
    acked = dict(a.wait_sent(to_b))
    acked.update(b.wait_sent(to_a))
    b.pump(lambda: len(b.messages) == 5, what="5 messages from A")

    # A and B write to carol (offline) without pause while SIGTERM comes.
    def burst(peer, n):
        try:
            for i in range(n):
                peer.send_to(carol.id, f"{peer.user.name} to carol {i}")
        except ConnectionClosed:
            pass  # the server closed the connection under the burst

    senders = [threading.Thread(target=burst, args=(peer, 300), daemon=True)
               for peer in (a, b)]
    for sender in senders:
        sender.start()
    a.pump(lambda: len(a.sent) >= len(to_b) + 20, what="20 sent frames to carol")
    stopping = time.monotonic()
    server.terminate()
    for peer in (a, a_other, b, b_other):
        closed = peer.wait_closed(3 * T)
        assert closed.rcvd is not None, f"{peer.user.name}: no close frame"
        assert closed.rcvd.code == 1001, closed
    for sender in senders:
        sender.join(T)
    code = server.wait(3 * T)
    assert code is not None, f"still running after SIGTERM:\n{server.log()}"
    assert code == 0, server.log()
    assert server.wait_group_gone()
    exited_after = time.monotonic() - stopping
    for peer in (a, b):
        acked.update({cid: f["id"] for cid, f in peer.sent.items()})
    to_carol = {cid: mid for cid, mid in acked.items() if cid not in to_b + to_a}
    assert len(to_carol) >= 20

    # After a restart, everything acknowledged is there: carol's inbox is
    # replayed densely and holds every message acknowledged for her.
    server = lab.restart(server)
    c = lab.connect(server.adopt(carol))
    c.sync(3 * T)
    assert_dense(c.messages)
    got = {m["id"]: m for m in c.messages}
    for cid, message_id in to_carol.items():
        assert message_id in got, f"acknowledged {cid} (id {message_id}) lost"
        assert got[message_id]["cid"] == cid
    stored = {m["id"] for m in history(server, server.adopt(a.user), b.id)}
    assert set(acked[cid] for cid in to_b + to_a) <= stored
    assert exited_after < 3 * T


# -- 6. presence and the one-connection rule after a worker kill -----------------------


def test_presence_and_replace_survive_a_worker_kill(pg_url, redis_url, lab):
    """A killed worker's users read offline once its liveness key expires; all heals."""
    server = lab.start(cluster_env(pg_url, *redis_url))
    (x, _), ([u], [v]) = lab.spread(server, 1)
    wait_presence(server, v.user.token, {u.id: True, v.id: True})

    kill_worker(server, x)
    u.wait_closed()
    # The presence hash still names the dead worker; its liveness key
    # expires within NODE_TTL, and then u reads as offline from any worker.
    wait_presence(server, v.user.token, {u.id: False, v.id: True}, NODE_TTL + 2 * T,
                  "u offline after its worker was killed")

    wait_replaced(server, x)
    u2 = lab.reconnect(u.user)
    wait_presence(server, v.user.token, {u.id: True}, what="u online again")

    # One connection per user still holds, across workers: each new
    # connection of u closes the previous one with 4001, until one of them
    # replaced a connection held by the other worker.
    current, current_pid = u2, worker_of(server, u2.client)
    across = False
    for _ in range(20):
        newer = lab.connect(u.user)
        newer_pid = worker_of(server, newer.client)
        closed = current.wait_closed()
        assert closed.rcvd is not None and (closed.rcvd.code, closed.rcvd.reason) == (
            4001, "replaced"), closed
        across = newer_pid != current_pid
        current, current_pid = newer, newer_pid
        if across:
            break
    assert across, "every new connection landed on the same worker"
    wait_presence(server, v.user.token, {u.id: True}, what="u online after replaces")
    # Messages reach the one live connection.
    cid = v.send_to(u.id, "to the newest connection")
    v.wait_sent([cid])
    current.pump(lambda: any(m["cid"] == cid for m in current.messages),
                 what="the message on the newest connection")
    current.close()
    wait_presence(server, v.user.token, {u.id: False}, what="u offline after closing")

