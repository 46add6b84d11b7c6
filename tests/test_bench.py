"""scripts/bench.py end to end: every scenario, small, against the servers it starts.

The figures belong to docs/performance.md, not here; this checks that the
command the README gives runs, that each scenario measured both servers, and
that the contract held while it did (nothing lost, no gaps, nothing left
behind in Redis).
"""

import json
import os
import signal
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "scripts", "bench.py")


def run_bench(out, *args, timeout=360):
    """Run scripts/bench.py to the end; return (process, stdout, report)."""
    proc = subprocess.Popen([sys.executable, BENCH, "--quick", "--out", str(out), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            # Ctrl-C: the bench stops the servers it started, then exits.
            proc.send_signal(signal.SIGINT)
            try:
                proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    with open(out / "results.json") as f:
        return proc, stdout, json.load(f)


def assert_pairs_kept_the_contract(run):
    assert run["rate"] > 0 and run["received_total"] == run["sent_total"] > 0
    for key in ("lost", "gaps", "dups", "error_frames", "dropped_connections"):
        assert run[key] == 0, (key, run)


@pytest.mark.timeout(400)
def test_quick_bench_runs_every_scenario_against_both_servers(tmp_path, redis_url):
    url, _prefix = redis_url
    out = tmp_path / "bench-out"
    proc, stdout, report = run_bench(out, "--redis-url", url,
                                     "--scenarios", "pairs,fanout,idle,offline,workers")
    results = report["results"]
    assert set(results) == {"pairs", "fanout", "idle", "offline", "workers"}

    # Both servers ran each scenario, and imserver kept the contract.
    for name in ("pairs", "fanout", "idle", "offline"):
        assert set(results[name]) >= {"imserver", "bare"}, name
    assert_pairs_kept_the_contract(results["pairs"]["imserver"])
    fanout = results["fanout"]["imserver"]
    assert fanout["complete"] and fanout["deliveries"] == fanout["expected_deliveries"] > 0
    idle = results["idle"]["imserver"]
    assert idle["opened"] == idle["stayed_up"] == idle["connections"] == 100
    assert idle["burst"]["answered"] == idle["burst"]["pings"] == 100
    offline = results["offline"]["imserver"]
    assert offline["complete"] and offline["replayed"] == offline["stored"] == 500
    assert offline["gaps"] == offline["dups"] == 0
    for workers in ("imserver_1", "imserver_2"):
        run = results["workers"][workers]
        assert run["rate"] > 0 and run["lost"] == run["gaps"] == run["dups"] == 0, run

    # The table prints a ratio to the bare relay for each rate, and the plot exists.
    rows = {(row["scenario"], row["figure"]): row for row in report["table"]}
    assert rows[("pairs", "delivered msg/s (P=5, W=10)")]["ratio"] > 0
    assert "bare relay" in stdout and "delivered msg/s" in stdout
    assert (out / "latency.png").stat().st_size > 0

    # The workers scenario cleaned its Redis keys (imbench:<its pid>:...) up.
    import redis

    client = redis.Redis.from_url(url)
    try:
        assert list(client.scan_iter(match=f"imbench:{proc.pid}:*", count=1000)) == []
    finally:
        client.close()


@pytest.mark.timeout(300)
def test_bench_runs_imserver_on_postgres_and_drops_its_databases(tmp_path, pg_url,
                                                                 redis_url):
    """--postgres: each imserver gets a database of its own there, dropped after."""
    import psycopg

    url, _prefix = redis_url
    out = tmp_path / "bench-out"
    proc, stdout, report = run_bench(out, "--redis-url", url, "--servers", "imserver",
                                     "--scenarios", "pairs,workers", "--postgres", pg_url,
                                     timeout=240)
    results = report["results"]
    for run in (results["pairs"]["imserver"], results["workers"]["imserver_1"],
                results["workers"]["imserver_2"]):
        assert_pairs_kept_the_contract(run)
        # No commit failed or was retried (a deadlock between the workers).
        assert run["log_issues"] == {}, run
    assert "imserver on PostgreSQL" in stdout
    # The bench inserted most users straight into each server's database and
    # they chatted: the servers ran on those PostgreSQL databases, now gone.
    with psycopg.connect(pg_url, autocommit=True, connect_timeout=5) as conn:
        left = conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s",
                            (f"imbench_{proc.pid}_%",)).fetchall()
    assert left == []
