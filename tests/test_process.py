"""The real server as a process: ``imserver serve`` (gunicorn, gthread worker).

These start the server the way it runs in production and check what only a
process shows: it starts and answers, a ``kill -9`` loses nothing it
acknowledged, SIGTERM closes every WebSocket with 1001 and loses nothing,
several workers are refused without Redis, the heartbeat drops a silent
client under gunicorn, and ``gunicorn 'imserver:create_app()'`` works.
"""

import json
import os
import subprocess
import sys
import threading
import time

import pytest
from websockets.exceptions import ConnectionClosed

from conftest import T
from conftest import RawClient
from imserver import gunicorn_conf
from procs import ServerPool
from procs import free_port
from procs import serve_argv
from procs import server_env


@pytest.fixture
def servers(tmp_path):
    """Start ``ServerProcess`` objects; kill whatever is left at teardown."""
    pool = ServerPool(tmp_path)
    yield pool
    pool.close()


def drain_until_pong(client, timeout=3 * T):
    """Send a ping; return every frame received before its pong."""
    client.send({"type": "ping"})
    frames = []
    deadline = time.monotonic() + timeout
    while True:
        frame = client.recv(timeout=max(0.1, deadline - time.monotonic()))
        if frame["type"] == "pong":
            return frames
        frames.append(frame)


def recv_until_closed(client, timeout=3 * T):
    """Receive until the connection closes; return ``(frames, exception)``."""
    frames = []
    deadline = time.monotonic() + timeout
    while True:
        try:
            frames.append(json.loads(client.ws.recv(
                timeout=max(0.1, deadline - time.monotonic()))))
        except ConnectionClosed as exc:
            return frames, exc


# -- 1. it starts and serves ------------------------------------------------------


def test_serve_starts_and_two_users_chat(servers):
    server = servers()
    status, body = server.request("GET", "/healthz")
    assert (status, body) == (200, {"status": "ok"})
    # imserver serve disables gunicorn's per-user control socket.
    assert "Control socket listening" not in server.log()
    # ... and runs its worker without glibc's per-thread cache of freed
    # blocks (each idle thread would keep its handshake's), unless told not to.
    (worker,) = server.worker_pids()
    with open(f"/proc/{worker}/environ", "rb") as f:
        environ = f.read().split(b"\0")
    if os.confstr("CS_GNU_LIBC_VERSION"):
        assert any(b"glibc.malloc.tcache_count=0" in v for v in environ
                   if v.startswith(b"GLIBC_TUNABLES=")), "tcache left on"

    alice, bob = server.user(), server.user()
    status, me = server.request("GET", "/api/me", token=alice.token)
    assert (status, me) == (200, {"id": alice.id, "username": alice.name})

    a, b = alice.connect(), bob.connect()
    cid = a.send_to(bob.id, "hello bob")
    sent = a.recv_type("sent")
    assert sent["cid"] == cid
    got = b.recv_type("message")
    assert got["seq"] == 1
    assert (got["id"], got["from"], got["to"], got["body"], got["cid"]) == (
        sent["id"], alice.id, bob.id, "hello bob", cid)
    b.send({"type": "ack", "seq": 1})

    cid = b.send_to(alice.id, "hello alice")
    assert b.recv_type("sent")["cid"] == cid
    got = a.recv_type("message")
    assert (got["seq"], got["from"], got["body"]) == (1, bob.id, "hello alice")

    status, body = server.request("GET", f"/api/messages?with={bob.id}", token=alice.token)
    assert status == 200
    assert [m["body"] for m in body["messages"]] == ["hello bob", "hello alice"]

    status, text = server.get_text("/metrics")
    assert status == 200
    assert "imserver_connections 2.0" in text.splitlines()
    assert "imserver_messages_total 2.0" in text.splitlines()
    a.close()
    b.close()
    assert server.stop() == 0


# -- 2. kill -9 ------------------------------------------------------------------------


def test_kill9_mid_burst_loses_nothing_acknowledged(servers):
    total, kill_after = 300, 150
    server = servers()
    alice, bob = server.user(), server.user()
    bodies = {f"k{i}": f"burst {i}" for i in range(total)}

    a = alice.connect()

    def burst():
        try:
            for cid, body in bodies.items():
                a.send_to(bob.id, body, cid=cid)
        except ConnectionClosed:
            pass  # the server was killed mid-burst

    sender = threading.Thread(target=burst, daemon=True)
    sender.start()
    acked = {}
    killed = False
    while True:
        try:
            frame = a.recv(timeout=4 * T)
        except ConnectionClosed:
            break
        assert frame["type"] == "sent", frame
        assert frame["cid"] not in acked, frame
        acked[frame["cid"]] = frame["id"]
        if len(acked) == kill_after and not killed:
            server.kill9()
            killed = True
    sender.join(2 * T)
    assert killed, f"only {len(acked)} sent frames before the connection closed"
    assert not server.alive() and not server.group_pids()
    assert len(acked) >= kill_after

    # A new server on the same database file: bob's inbox is replayed.
    server = servers.restart(server)
    alice, bob = server.adopt(alice), server.adopt(bob)
    b = bob.connect()
    replayed = drain_until_pong(b)
    assert all(f["type"] == "message" for f in replayed), replayed
    seqs = [f["seq"] for f in replayed]
    assert seqs == list(range(1, len(replayed) + 1))
    ids = [f["id"] for f in replayed]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    by_id = {f["id"]: f for f in replayed}
    for cid, message_id in acked.items():
        assert message_id in by_id, f"acknowledged {cid} (id {message_id}) lost"
        entry = by_id[message_id]
        assert (entry["cid"], entry["body"], entry["from"], entry["to"]) == (
            cid, bodies[cid], alice.id, bob.id)
    # Nothing beyond what alice sent.
    assert {f["cid"] for f in replayed} <= set(bodies)

    # Alice resends every cid: an acknowledged one answers the same id, a
    # stored but unacknowledged one its stored id, the rest are new.
    a = alice.connect()
    stored = {f["cid"]: f["id"] for f in replayed}
    for cid, body in bodies.items():
        a.send_to(bob.id, body, cid=cid)
    answers = {}
    while len(answers) < total:
        frame = a.recv_type("sent", timeout=3 * T)
        answers[frame["cid"]] = frame["id"]
    for cid, message_id in stored.items():
        assert answers[cid] == message_id, cid
    assert all(answers[cid] == message_id for cid, message_id in acked.items())

    # Bob gets exactly the messages not stored before, each once, seqs going on.
    live = []
    while len(replayed) + len(live) < total:
        live.append(b.recv_type("message", timeout=4 * T))
    live += drain_until_pong(b)
    everything = replayed + live
    assert [f["seq"] for f in everything] == list(range(1, total + 1))
    assert sorted(f["cid"] for f in everything) == sorted(bodies)
    assert {f["id"] for f in everything} == set(answers.values())
    a.close()
    b.close()


# -- 3. SIGTERM ------------------------------------------------------------------------


def test_sigterm_closes_with_1001_and_keeps_what_was_acked(servers):
    server = servers()
    alice, bob, carol = server.user(), server.user(), server.user()
    a, b = alice.connect(), bob.connect()

    to_carol = [a.send_to(carol.id, f"for carol {i}") for i in range(20)]
    to_bob = [a.send_to(bob.id, f"for bob {i}") for i in range(5)]
    sent = {}
    while len(sent) < len(to_carol) + len(to_bob):
        frame = a.recv_type("sent")
        sent[frame["cid"]] = frame["id"]
    for i in range(5):
        assert b.recv_type("message")["body"] == f"for bob {i}"

    server.terminate()
    for client in (a, b):
        frames, exc = recv_until_closed(client)
        assert frames == []
        assert exc.rcvd is not None, "no close frame from the server"
        assert exc.rcvd.code == 1001
    code = server.wait(6 * T)
    assert code is not None, f"still running after SIGTERM:\n{server.log()}"
    assert code == 0, server.log()
    assert server.wait_group_gone()

    server = servers.restart(server)
    alice, bob, carol = (server.adopt(u) for u in (alice, bob, carol))
    c = carol.connect()
    replayed = drain_until_pong(c)
    assert [f["body"] for f in replayed] == [f"for carol {i}" for i in range(20)]
    assert [f["id"] for f in replayed] == [sent[cid] for cid in to_carol]
    status, body = server.request("GET", f"/api/messages?with={alice.id}", token=bob.token)
    assert status == 200
    assert [m["id"] for m in body["messages"]] == [sent[cid] for cid in to_bob]
    c.close()


# -- 4. several workers need Redis -----------------------------------------------------


def _printed_with_setting(name: str, setting, script: str) -> list:
    """Run ``script`` in a new Python with the setting ``name`` set to
    ``setting`` (or unset, for the default); return what it printed, split."""
    env = {k: v for k, v in os.environ.items() if k != name}
    if setting is not None:
        env[name] = setting
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=T, check=True).stdout.split()


@pytest.mark.parametrize("setting,expected", [(None, 0.1), ("0.02", 0.02)])
def test_a_worker_takes_the_gils_switch_interval_from_the_settings(setting, expected):
    """Each gunicorn worker waits 100 ms (or IMSERVER_SWITCH_INTERVAL) before
    forcing the GIL from its holder, not Python's 5 ms (a storm of wake-ups
    with thousands of threads waiting)."""
    out = _printed_with_setting(
        "IMSERVER_SWITCH_INTERVAL", setting,
        "import sys; from imserver import gunicorn_conf;"
        " before = sys.getswitchinterval(); gunicorn_conf.post_fork(None, None);"
        " print(before, sys.getswitchinterval())")
    assert float(out[0]) == 0.005
    assert float(out[1]) == pytest.approx(expected)


@pytest.mark.parametrize("setting,expected", [(None, 16384), ("4096", 4096), ("0", 0)])
def test_a_worker_sizes_its_futex_hash_table_from_the_settings(setting, expected):
    """Each gunicorn worker asks Linux for a futex hash table of
    FUTEX_HASH_SLOTS buckets (16 by default on 2 cores since Linux 6.16,
    where the GIL's mutex could share a bucket with every thread waiting for
    the GIL). On a kernel without the setting, the worker goes on as before."""
    out = _printed_with_setting(
        "IMSERVER_FUTEX_HASH_SLOTS", setting,
        "import threading; from imserver import gunicorn_conf as g;"
        " t = threading.Thread(target=int); t.start(); t.join();"
        " before = g._prctl(g.PR_FUTEX_HASH, g.PR_FUTEX_HASH_GET_SLOTS, 0, 0, 0);"
        " g.post_fork(None, None);"
        " t = threading.Thread(target=int); t.start(); t.join();"
        " print(before, g._prctl(g.PR_FUTEX_HASH, g.PR_FUTEX_HASH_GET_SLOTS, 0, 0, 0))")
    before, after = int(out[0]), int(out[1])
    if before == -1:
        # No PR_FUTEX_HASH (Linux before 6.16): nothing to size, and no failure.
        assert after == -1
    else:
        assert after == expected


@pytest.mark.parametrize("setting", ["3", "-2", "\"many\"", "1.5", "lots"])
def test_a_futex_hash_size_that_is_not_a_power_of_two_is_refused(setting, monkeypatch):
    monkeypatch.setenv("IMSERVER_FUTEX_HASH_SLOTS", setting)
    with pytest.raises(ValueError, match="power of two"):
        gunicorn_conf.futex_hash_slots()


def test_several_workers_without_redis_are_refused(tmp_path):
    env = server_env(tmp_path)
    result = subprocess.run(serve_argv(free_port(), "--workers", "2"), env=env,
                            cwd=str(tmp_path), capture_output=True, text=True,
                            timeout=6 * T, stdin=subprocess.DEVNULL)
    assert result.returncode != 0
    assert "IMSERVER_REDIS_URL" in result.stdout + result.stderr


# -- 5. heartbeat under gunicorn ---------------------------------------------------------


def test_heartbeat_drops_a_silent_client_and_keeps_a_live_one(servers):
    server = servers(env={"IMSERVER_PING_INTERVAL": "0.5", "IMSERVER_IDLE_TIMEOUT": "1.5"})
    quiet, lively = server.user(), server.user()

    live = lively.connect()
    live_since = time.monotonic()

    opened = time.monotonic()
    raw = RawClient(server.port, quiet.token, timeout=4 * T)
    assert raw.status == 101, raw.status_line
    opcode, payload = raw.read_frame()
    assert (opcode, json.loads(payload)) == (0x1, {"type": "ready", "user_id": quiet.id})
    pings, close_code = 0, None
    while True:
        try:
            opcode, payload = raw.read_frame()
        except (EOFError, ConnectionResetError):
            break  # the server closed the connection
        if opcode == 0x9:
            pings += 1  # never answered
        elif opcode == 0x8:
            close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
        else:
            raise AssertionError(f"unexpected frame {(opcode, payload)}")
    dropped_after = time.monotonic() - opened
    raw.close()
    assert pings >= 1, "the server never pinged"
    assert close_code in (None, 1008), close_code
    # Dropped for its silence (IDLE_TIMEOUT=1.5), not at once.
    assert 1.4 <= dropped_after <= 4 * T, dropped_after

    status, body = server.request("GET", f"/api/presence?ids={quiet.id},{lively.id}",
                                  token=lively.token)
    assert status == 200
    assert body["online"] == {str(quiet.id): False, str(lively.id): True}

    # The client that answers pings is still there past the idle timeout.
    time.sleep(max(0.0, 2.5 - (time.monotonic() - live_since)))
    assert time.monotonic() - live_since > 2.0
    assert drain_until_pong(live) == []
    live.close()


# -- 6. plain gunicorn --------------------------------------------------------------------


@pytest.mark.parametrize("config", [[], ["-c", "python:imserver.gunicorn_conf"]],
                         ids=["plain", "gunicorn_conf"])
def test_plain_gunicorn_serves_create_app(servers, config):
    def argv(port):
        return [sys.executable, "-m", "gunicorn", *config, "-k", "gthread",
                "--threads", "50", "-b", f"127.0.0.1:{port}", "--no-control-socket",
                "imserver:create_app()"]

    server = servers(argv=argv)
    assert server.request("GET", "/healthz") == (200, {"status": "ok"})
    alice, bob = server.user(), server.user()
    a, b = alice.connect(), bob.connect()
    a.send_to(bob.id, "over plain gunicorn")
    a.recv_type("sent")
    assert b.recv_type("message")["body"] == "over plain gunicorn"
    a.close()
    b.close()
    assert server.stop() == 0
