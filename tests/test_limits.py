"""Limits that keep one client from hurting the others: connections, attempts, backlog."""

import json
import logging
import threading

import pytest
from conftest import T
from conftest import RawClient
from conftest import wait_until


@pytest.mark.parametrize("config_overrides", [{"MAX_CONNECTIONS": 2}])
def test_connections_past_the_bound_are_refused_with_503_before_upgrade(live_server):
    """The connection past MAX_CONNECTIONS gets 503; a freed place is taken again."""
    users = [live_server.user() for _ in range(3)]
    first, second = users[0].connect(), users[1].connect()
    raw = RawClient(live_server.port, users[2].token)
    assert raw.status == 503
    raw.close()
    first.close()
    wait_until(lambda: live_server.hub.open_connections == 1, message="place freed")
    third = users[2].connect()
    third.send({"type": "ping"})
    assert third.recv() == {"type": "pong"}
    second.close()
    third.close()


@pytest.mark.parametrize("config_overrides", [{"AUTH_RATE_LIMIT": 0.001,
                                               "AUTH_RATE_BURST": 3}])
def test_registration_and_login_attempts_are_limited_per_address(live_server):
    """Past AUTH_RATE_BURST attempts from one address, 429 rate_limited."""
    statuses = []
    for i in range(3):
        status, _ = live_server.request("POST", "/api/users",
                                        {"username": f"u{i}", "password": "password123"})
        statuses.append(status)
    assert statuses == [201, 201, 201]
    status, body = live_server.request("POST", "/api/users",
                                       {"username": "u9", "password": "password123"})
    assert (status, body["error"]["code"]) == (429, "rate_limited")
    status, body = live_server.request("POST", "/api/tokens",
                                       {"username": "u0", "password": "password123"})
    assert (status, body["error"]["code"]) == (429, "rate_limited")


@pytest.mark.parametrize("config_overrides", [{"LOGIN_FAILURES_PER_MINUTE": 3}])
def test_repeated_failed_logins_lock_the_username_for_a_while(live_server):
    """After too many wrong passwords even the right one gets 429 for a while."""
    user = live_server.user()
    for _ in range(3):
        status, body = live_server.request("POST", "/api/tokens",
                                           {"username": user.name, "password": "wrong-one!"})
        assert (status, body["error"]["code"]) == (401, "bad_credentials")
    status, body = live_server.request("POST", "/api/tokens",
                                       {"username": user.name, "password": "password123"})
    assert (status, body["error"]["code"]) == (429, "rate_limited")
    # Another username is not affected.
    other = live_server.user()
    status, _ = live_server.request("POST", "/api/tokens",
                                    {"username": other.name, "password": "password123"})
    assert status == 200


def connection_threads() -> int:
    """Threads, but the store's few reader threads (started on first use, then kept)."""
    return sum(1 for t in threading.enumerate() if not t.name.startswith("imserver-read"))


def test_each_connection_costs_one_thread_and_a_flood_is_read_as_served(live_server):
    """One thread per connection (the handler reads its own socket), and a
    flooding client's frames wait in its socket, not in our memory."""
    users = [live_server.user() for _ in range(20)]
    before = connection_threads()
    clients = [RawClient(live_server.port, u.token) for u in users]
    try:
        for raw in clients:
            raw.read_frame()
        wait_until(lambda: live_server.hub.conns.count() == 20, message="all registered")
        # werkzeug's one thread per connection, and nothing more (two per
        # connection would be 40; a few HTTP threads may still be ending).
        assert connection_threads() - before <= 25
        session = live_server.hub.conns._get_wrapper(users[0].id).conn
        most = [0]
        done = threading.Event()

        def sample():
            while not done.is_set():
                most[0] = max(most[0], len(session.ws.input_buffer))

        sampler = threading.Thread(target=sample)
        sampler.start()
        frame = json.dumps({"type": "ack", "seq": 0}).encode()
        raw = clients[0]
        try:
            for _ in range(20_000):
                raw.send_frame(frame)
            raw.send_frame(json.dumps({"type": "ping"}).encode())
            while True:
                opcode, payload = raw.read_frame()
                if opcode == 0x1 and json.loads(payload)["type"] == "pong":
                    break
        finally:
            done.set()
            sampler.join(T)
        # At most what one read of the socket holds is parsed ahead.
        from imserver.ws import RECEIVE_BYTES

        assert most[0] <= RECEIVE_BYTES // len(frame) + 1
    finally:
        for raw in clients:
            raw.close()
    wait_until(lambda: connection_threads() <= before, message="threads released")


def test_tokens_never_reach_the_request_log(live_server, caplog):
    """The /ws request line is logged with the token redacted."""
    user = live_server.user()
    with caplog.at_level(logging.INFO, logger="werkzeug"):
        ws = user.connect()
        ws.close()
        wait_until(lambda: any("/ws" in r.getMessage() for r in caplog.records),
                   message="request logged")
    lines = [r.getMessage() for r in caplog.records]
    assert not any(user.token in line for line in lines)
    assert any("token=[redacted]" in line for line in lines)
