"""Operations: metrics that move, the admin API and its rules, the health check."""

import re

import pytest
from conftest import T
from conftest import wait_until
from websockets.exceptions import ConnectionClosed

from imserver import create_app
from imserver.cli import cli


def metric(live_server, name, labels=""):
    """Return the value of one sample of /metrics (0 when absent)."""
    status, _ = live_server.request("GET", "/healthz")
    import urllib.request

    with urllib.request.urlopen(live_server.url + "/metrics", timeout=T) as resp:
        text = resp.read().decode()
    match = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def grant_admin(app, username):
    result = app.test_cli_runner().invoke(cli, ["admin", "grant", username])
    assert result.exit_code == 0, result.output
    assert "is an admin" in result.output


def test_metrics_have_the_contract_names_and_move(live_server):
    """Connections, messages, deliveries, replays, latencies: present and moving."""
    alice, bob = live_server.user(), live_server.user()
    names = ["imserver_connections", "imserver_messages_total",
             "imserver_deliveries_total", "imserver_replayed_total",
             "imserver_send_to_sent_seconds_count", "imserver_commit_seconds_count"]
    before = {n: metric(live_server, n) for n in names}
    wa = alice.connect()
    assert metric(live_server, "imserver_connections") == before["imserver_connections"] + 1
    wa.send_to(bob.id, "offline")  # stored, replayed later
    wa.recv_type("sent")
    wb = bob.connect()
    wb.recv_type("message")
    wa.send_to(bob.id, "live")  # delivered live
    wa.recv_type("sent")
    wb.recv_type("message")
    after = {n: metric(live_server, n) for n in names}
    assert after["imserver_connections"] == before["imserver_connections"] + 2
    assert after["imserver_messages_total"] == before["imserver_messages_total"] + 2
    assert after["imserver_deliveries_total"] >= before["imserver_deliveries_total"] + 1
    assert after["imserver_replayed_total"] == before["imserver_replayed_total"] + 1
    assert after["imserver_send_to_sent_seconds_count"] >= 2
    assert after["imserver_commit_seconds_count"] >= 2
    wa.send("garbage")
    assert wa.recv_type("error")["code"] == "bad_json"
    assert metric(live_server, "imserver_refused_frames_total", '{code="bad_json"}') == 1
    wa.close()
    wb.close()
    wait_until(lambda: metric(live_server, "imserver_connections") ==
               before["imserver_connections"], message="gauge back down")


@pytest.mark.parametrize("config_overrides", [{"RATE_LIMIT": 0.001, "RATE_BURST": 1}])
def test_rate_limited_frames_are_counted(live_server):
    """Each rate_limited refusal moves imserver_rate_limited_total."""
    alice, bob = live_server.user(), live_server.user()
    wa = alice.connect()
    wa.send_to(bob.id, "one")
    wa.recv_type("sent")
    wa.send_to(bob.id, "two")
    assert wa.recv_type("error")["code"] == "rate_limited"
    assert metric(live_server, "imserver_rate_limited_total") == 1
    wa.close()


@pytest.mark.parametrize("config_overrides", [{
    "SEND_TIMEOUT": 0.5, "MAX_OUTBUF_BYTES": 64 * 1024,
    # Big messages, to fill the kernel's buffers (megabytes on loopback).
    "MAX_BODY_CHARS": 60_000, "MAX_FRAME_BYTES": 100_000}])
def test_slow_receivers_closed_are_counted(live_server):
    """A receiver that stops reading is closed and counted."""
    from conftest import RawClient

    alice, bob = live_server.user(), live_server.user()
    raw = RawClient(live_server.port, bob.token, rcvbuf=4096)
    wa = alice.connect()
    try:
        raw.read_frame()
        for _ in range(150):
            wa.send_to(bob.id, "x" * 60_000)
        for _ in range(150):
            wa.recv_type("sent")
        wait_until(lambda: metric(live_server, "imserver_slow_receivers_closed_total") == 1,
                   T * 2, "slow receiver counted")
    finally:
        raw.close()
        wa.close()


def test_admin_api_is_for_admins_only(live_server):
    """Without the admin flag, stats and kick answer 403 forbidden."""
    user = live_server.user()
    for method, path in [("GET", "/api/admin/stats"),
                         ("POST", f"/api/admin/users/{user.id}/kick")]:
        status, body = live_server.request(method, path, token=user.token)
        assert (status, body["error"]["code"]) == (403, "forbidden")
        status, body = live_server.request(method, path)
        assert (status, body["error"]["code"]) == (401, "unauthorized")


def test_admin_sees_connections_and_kicks_a_user(live_server):
    """An admin gets ConnManager.count() per worker and closes a user's connection."""
    admin, bob = live_server.user(), live_server.user()
    grant_admin(live_server.app, admin.name)
    wb = bob.connect()
    status, body = live_server.request("GET", "/api/admin/stats", token=admin.token)
    assert status == 200
    assert body["connections"] == 1 and len(body["workers"]) == 1
    assert body["workers"][0]["connections"] == live_server.hub.conns.count() == 1
    status, _ = live_server.request("POST", f"/api/admin/users/{bob.id}/kick",
                                    token=admin.token)
    assert status == 204
    with pytest.raises(ConnectionClosed) as info:
        wb.recv()
    assert (info.value.rcvd.code, info.value.rcvd.reason) == (1000, "kicked")
    wait_until(lambda: live_server.hub.conns.count() == 0, message="kicked user removed")
    status, body = live_server.request("POST", f"/api/admin/users/{bob.id}/kick",
                                       token=admin.token)
    assert (status, body["error"]["code"]) == (404, "not_found")


def test_admin_grant_of_an_unknown_user_fails(app):
    """imserver admin grant with an unknown name exits non-zero."""
    result = app.test_cli_runner().invoke(cli, ["admin", "grant", "nobody"])
    assert result.exit_code == 1


def test_health_check_fails_when_the_redis_subscriber_is_dead(tmp_path, redis_url):
    """/healthz is 503 when Redis answers but our subscriber no longer receives."""
    import redis
    from conftest import base_config

    url, prefix = redis_url
    app = create_app(base_config(tmp_path, REDIS_URL=url, REDIS_PREFIX=prefix))
    hub = app.extensions["imserver"]
    client = app.test_client()
    try:
        wait_until(lambda: client.get("/healthz").status_code == 200, message="healthy")
        # The subscriber thread dies; Redis itself still answers.
        hub.broker._stop.set()
        hub.broker._listener.join(T)
        assert redis.Redis.from_url(url).ping()
        response = client.get("/healthz")
        assert response.status_code == 503
        assert response.get_json()["status"] == "unavailable"
    finally:
        hub.shutdown()


_BATCHED_CHECK = """
import sys
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from imserver.metrics import LATENCY_BUCKETS, BatchedObservations

values = [0.0, 0.001, 0.0011, 0.004, 0.05, 0.07, 0.3, 2.0, 4.9, 5.0, 7.5, 100.0] * 3
registry = CollectorRegistry()
hist = Histogram(sys.argv[1] + "_seconds", "x", buckets=LATENCY_BUCKETS, registry=registry)
if sys.argv[1] == "batched":
    gathered = BatchedObservations(hist)
    for v in values[:20]:
        gathered.add(v)
    gathered.flush()
    gathered.flush()  # nothing new: changes nothing
    for v in values[20:]:
        gathered.add(v)
    gathered.flush()
else:
    for v in values:
        hist.observe(v)
if len(sys.argv) > 2:
    from prometheus_client import multiprocess
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
text = generate_latest(registry).decode().replace(sys.argv[1], "lat")
print("".join(line + "\\n" for line in text.splitlines() if "_created" not in line))
"""


@pytest.mark.parametrize("multiprocess", [False, True], ids=["one-process", "multiprocess"])
def test_batched_latencies_expose_what_observing_each_would(tmp_path, multiprocess):
    """The writer's batched send latencies give the same buckets, count and sum,
    also across gunicorn workers (prometheus-client's multiprocess files)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    if multiprocess:
        env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path)

    def exposition(kind: str) -> str:
        args = [sys.executable, "-c", _BATCHED_CHECK, kind] + (["mp"] if multiprocess else [])
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        if multiprocess:
            for path in tmp_path.iterdir():
                path.unlink()
        return done.stdout

    one_by_one, batched = exposition("single"), exposition("batched")
    assert 'lat_seconds_bucket{le="0.001"} 6.0' in one_by_one
    assert "lat_seconds_count 36.0" in one_by_one
    assert batched == one_by_one
