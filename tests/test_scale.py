"""Several gunicorn workers on Redis and PostgreSQL (and SQLite): the full contract.

Each test starts the real server with two gthread workers as a subprocess,
against the machine's PostgreSQL (a fresh database) and Redis (a key prefix
of its own), and finds which worker holds which client from the kernel's
socket table, so that "users on different workers" is a fact, not a hope.
"""

import threading

import pytest
from conftest import T
from conftest import wait_until
from procs import ServerProcess
from procs import serve_argv
from procs import worker_of
from websockets.exceptions import ConnectionClosed


def two_workers(port):
    return serve_argv(port, "--workers", "2")


@pytest.fixture
def cluster(tmp_path, pg_url, redis_url):
    url, prefix = redis_url
    server = ServerProcess(tmp_path, argv=two_workers, env={
        "IMSERVER_DATABASE_URL": pg_url,
        "IMSERVER_REDIS_URL": url,
        "IMSERVER_REDIS_PREFIX": prefix,
    })
    wait_until(lambda: len(server.worker_pids()) == 2, T * 2, "two workers")
    yield server
    server.stop()
    server.cleanup()


def spread(server, count_per_worker=2, attempts=60):
    """Register and connect users until each worker holds ``count_per_worker``.

    Returns ``{pid: [(user, client), ...]}``; extra connections are closed.
    """
    by_worker = {pid: [] for pid in server.worker_pids()}
    for _ in range(attempts):
        if all(len(v) >= count_per_worker for v in by_worker.values()):
            return by_worker
        user = server.user()
        client = user.connect()
        pid = worker_of(server, client)
        if len(by_worker[pid]) < count_per_worker:
            by_worker[pid].append((user, client))
        else:
            client.close()
    raise AssertionError(f"could not spread users over workers: {by_worker}")


def messages_until_pong(client):
    """Send a ping; return the message frames received before the pong."""
    client.send({"type": "ping"})
    frames = []
    while True:
        frame = client.recv(T * 2)
        if frame["type"] == "pong":
            return frames
        assert frame["type"] == "message", frame
        frames.append(frame)


def close_all(by_worker):
    for pairs in by_worker.values():
        for _, client in pairs:
            client.close()


def test_users_on_different_workers_chat_one_to_one(cluster):
    """Live, offline, redelivery and order hold between users on two workers."""
    by_worker = spread(cluster, 1)
    (alice, wa), (bob, wb) = [pairs[0] for pairs in by_worker.values()]
    assert worker_of(cluster, wa) != worker_of(cluster, wb)
    # Live, both ways.
    wa.send_to(bob.id, "hi bob")
    sent = wa.recv_type("sent")
    got = wb.recv_type("message")
    assert (got["id"], got["seq"], got["body"]) == (sent["id"], 1, "hi bob")
    wb.send_to(alice.id, "hi alice")
    wb.recv_type("sent")
    assert wa.recv_type("message")["body"] == "hi alice"
    wb.send({"type": "ack", "seq": 1})
    # Offline: bob leaves, alice sends five, bob comes back (to any worker).
    wb.close()
    wait_until(lambda: cluster.request("GET", f"/api/presence?ids={bob.id}",
                                       token=alice.token)[1]["online"][str(bob.id)] is False,
               message="bob offline")
    for i in range(5):
        wa.send_to(bob.id, f"offline {i}")
        wa.recv_type("sent")
    wb = bob.connect()
    replay = messages_until_pong(wb)
    assert [(m["seq"], m["body"]) for m in replay] == [
        (i + 2, f"offline {i}") for i in range(5)]
    # Not acked: the same five come again on the next connection.
    wb.close()
    wb = bob.connect()
    assert [m["seq"] for m in messages_until_pong(wb)] == [2, 3, 4, 5, 6]
    wb.close()
    wa.close()


def test_group_fans_out_across_workers_exactly_once(cluster):
    """A group message reaches every member on every worker once, seq dense."""
    by_worker = spread(cluster, 2)
    members = [pair for pairs in by_worker.values() for pair in pairs]
    (owner, wo) = members[0]
    status, group = cluster.request("POST", "/api/groups", {
        "name": "spread", "members": [u.id for u, _ in members[1:]]}, token=owner.token)
    assert status == 201
    for i in range(10):
        wo.send_to(group=group["id"], body=f"g{i}")
        wo.recv_type("sent")
    for user, client in members[1:]:
        # A member on the other worker gets the entries through Redis, which
        # may come after its own pong: wait for the ten, then check nothing more.
        frames = [client.recv_type("message", T * 2) for _ in range(10)]
        assert [(m["seq"], m["body"]) for m in frames] == [
            (i + 1, f"g{i}") for i in range(10)], user.id
        assert messages_until_pong(client) == []
    assert messages_until_pong(wo) == []
    close_all(by_worker)


def test_new_connection_on_another_worker_replaces_the_old_with_4001(cluster):
    """One live connection per user across workers: the older one gets 4001."""
    alice, bob = cluster.user(), cluster.user()
    old = bob.connect()
    old_pid = worker_of(cluster, old)
    new = None
    for _ in range(40):
        candidate = bob.connect()
        if worker_of(cluster, candidate) != old_pid:
            new = candidate
            break
        # Same worker: it replaced ``old`` there; it becomes the old one.
        with pytest.raises(ConnectionClosed) as info:
            old.recv(T)
        assert info.value.rcvd.code == 4001
        old = candidate
    assert new is not None, "every connection landed on one worker"
    with pytest.raises(ConnectionClosed) as info:
        old.recv(T)
    assert (info.value.rcvd.code, info.value.rcvd.reason) == (4001, "replaced")
    # The new connection is the one that receives, and bob reads as online.
    wa = alice.connect()
    wa.send_to(bob.id, "to the new one")
    wa.recv_type("sent")
    assert new.recv_type("message")["body"] == "to the new one"
    status, body = cluster.request("GET", f"/api/presence?ids={bob.id}", token=alice.token)
    assert body["online"] == {str(bob.id): True}
    new.close()
    wa.close()


def test_presence_is_answered_across_workers(cluster):
    """Presence flips on connect and disconnect whatever worker holds the user."""
    by_worker = spread(cluster, 1)
    (alice, wa), (bob, wb) = [pairs[0] for pairs in by_worker.values()]
    carol = cluster.user()
    ids = f"{alice.id},{bob.id},{carol.id}"
    status, body = cluster.request("GET", f"/api/presence?ids={ids}", token=carol.token)
    assert body["online"] == {str(alice.id): True, str(bob.id): True, str(carol.id): False}
    wb.close()
    wait_until(lambda: cluster.request("GET", f"/api/presence?ids={ids}",
                                       token=carol.token)[1]["online"][str(bob.id)] is False,
               message="bob offline")
    wa.close()


def test_concurrent_writers_on_both_workers_keep_seq_dense(cluster):
    """Many senders on both workers to one receiver: seqs 1..N, no gap, in order."""
    by_worker = spread(cluster, 3)
    pairs = [pair for ps in by_worker.values() for pair in ps]
    (bob, wb), senders = pairs[0], pairs[1:]
    per_sender = 40

    def send_all(user, client):
        for i in range(per_sender):
            client.send_to(bob.id, f"{user.id}:{i}")
        for _ in range(per_sender):
            client.recv_type("sent", T * 2)

    threads = [threading.Thread(target=send_all, args=pair) for pair in senders]
    for t in threads:
        t.start()
    total = per_sender * len(senders)
    got = []
    while len(got) < total:
        frame = wb.recv(T * 4)
        assert frame["type"] == "message"
        got.append(frame)
    for t in threads:
        t.join(T * 4)
    assert [m["seq"] for m in got] == list(range(1, total + 1))
    for user, _ in senders:
        mine = [m["body"] for m in got if m["from"] == user.id]
        assert mine == [f"{user.id}:{i}" for i in range(per_sender)]
    close_all(by_worker)


def test_crossing_traffic_between_workers_never_deadlocks_the_writers(cluster):
    """Users on both workers send to each other and ack at once: every message
    arrives in seq order, and no writer's commit fails on a deadlock.

    A batch locks the ``users`` rows of its acks and of its recipients' seqs;
    two workers' batches took them in opposite orders, and PostgreSQL broke
    a deadlock about once a second (a second's wait each time, logged as a
    failed commit attempt) until the writers took a turn first.
    """
    by_worker = spread(cluster, 3)
    left, right = by_worker.values()
    rounds = 40
    failures = []

    def talk(client, peers):
        try:
            expected = rounds * len(peers)
            sent = seqs = 0
            for i in range(rounds):
                for peer in peers:
                    client.send_to(peer.id, f"r{i}")
                want_sent = (i + 1) * len(peers)
                # Ack what comes as it comes, while the round's sends commit.
                while sent < want_sent:
                    frame = client.recv(T * 4)
                    if frame["type"] == "sent":
                        sent += 1
                    else:
                        assert frame["type"] == "message", frame
                        seqs += 1
                        assert frame["seq"] == seqs, frame
                        client.send({"type": "ack", "seq": frame["seq"]})
            while seqs < expected:
                frame = client.recv_type("message", T * 4)
                seqs += 1
                assert frame["seq"] == seqs, frame
                client.send({"type": "ack", "seq": frame["seq"]})
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    threads = [threading.Thread(target=talk, args=(client, [u for u, _ in other]))
               for side, other in ((left, right), (right, left))
               for _, client in side]
    for t in threads:
        t.start()
    for t in threads:
        t.join(T * 20)
    assert not any(t.is_alive() for t in threads), "a client is still talking"
    assert not failures, failures
    assert "deadlock detected" not in cluster.log()
    assert "commit attempt" not in cluster.log()
    close_all(by_worker)


def test_sqlite_with_two_workers_on_one_host(tmp_path, redis_url):
    """Two workers share one SQLite file (WAL, busy timeout) and keep the contract."""
    url, prefix = redis_url
    server = ServerProcess(tmp_path, argv=two_workers, env={
        "IMSERVER_REDIS_URL": url, "IMSERVER_REDIS_PREFIX": prefix})
    try:
        wait_until(lambda: len(server.worker_pids()) == 2, T * 2, "two workers")
        by_worker = spread(server, 2)
        pairs = [pair for ps in by_worker.values() for pair in ps]
        (bob, wb), senders = pairs[0], pairs[1:]

        def send_all(user, client):
            for i in range(30):
                client.send_to(bob.id, f"{user.id}:{i}")
            for _ in range(30):
                client.recv_type("sent", T * 2)

        threads = [threading.Thread(target=send_all, args=pair) for pair in senders]
        for t in threads:
            t.start()
        got = [wb.recv_type("message", T * 4) for _ in range(30 * len(senders))]
        for t in threads:
            t.join(T * 4)
        assert [m["seq"] for m in got] == list(range(1, 30 * len(senders) + 1))
        close_all(by_worker)
    finally:
        server.stop()
        server.cleanup()


def test_several_workers_without_redis_are_refused(tmp_path):
    """imserver serve --workers 2 without Redis exits with a clear message."""
    import subprocess

    from procs import server_env

    result = subprocess.run(two_workers(5999), env=server_env(tmp_path), cwd=str(tmp_path),
                            capture_output=True, text=True, timeout=T * 6)
    assert result.returncode != 0
    assert "IMSERVER_REDIS_URL" in result.stdout + result.stderr
