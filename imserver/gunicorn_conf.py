"""gunicorn settings for imserver in production.

Use: ``gunicorn -c python:imserver.gunicorn_conf 'imserver:create_app()'``
(``imserver serve`` does the same). Every setting can be overridden on the
command line or by ``GUNICORN_CMD_ARGS``.

Why these values:

- ``gthread`` runs one thread per open connection (the design's "one thread
  per connection"): a WebSocket holds its thread for its whole life, so
  ``threads`` is the number of WebSockets one worker can hold. Threads are
  created only when needed, so a high ceiling costs nothing idle.
- ``worker_connections`` above ``threads``: gunicorn stops accepting at this
  count, and a connection past it waits in the listen backlog; keep room
  for short HTTP calls.
- ``timeout``: gunicorn kills a worker whose main thread missed its
  heartbeat for this long; a burst of thousands of connections can starve
  the main thread of the GIL for seconds, so it is generous.
- On SIGTERM each worker closes every WebSocket with 1001 at once (the
  ``post_worker_init`` hook below), then gunicorn's graceful stop ends.
- The GIL's switch interval is ``SWITCH_INTERVAL`` (100 ms, not Python's 5
  ms): a thread waiting for the GIL wakes up every interval to ask for it,
  and with thousands of connection threads waiting at once (a burst after
  any pause of the GIL's holder) those wake-ups became a storm that kept
  the process in the kernel: a 200 ms pause at the start of a burst from
  10,000 connections made 1.4 million context switches and 13 s of delay
  at 5 ms, 38 thousand and 1.05 s at 100 ms (docs/performance.md, idle).
  Our threads hold the GIL for microseconds to a few milliseconds and give
  it up on every blocking call, so the longer interval costs nothing
  measurable elsewhere.
- Each worker gets a futex hash table of its own with ``FUTEX_HASH_SLOTS``
  buckets (``set_futex_hash_slots``). Linux 6.16 gave every threaded
  process a private table sized by its CPUs, not its threads: 16 buckets on
  a 2-core machine for 10,000 threads. Every thread waiting for the GIL
  waits on one futex (the GIL's condition variable), so thousands of
  waiters share a bucket; in the stalls caught under perf, the release of
  a contended mutex walked such a queue in the kernel for most of the
  core, and a burst from 10,000 connections stalled for 15 to 30 s at 98 %
  kernel time. With 16,384 buckets no burst stalled (docs/performance.md,
  idle, with what is not explained yet).
"""

import ctypes
import json
import os
import resource
import signal
import sys
import threading

from imserver.config import DEFAULTS

bind = os.environ.get("IMSERVER_BIND", "127.0.0.1:5000")
worker_class = "gthread"
workers = 1
threads = 2000
worker_connections = 3000
keepalive = 5
timeout = 120
# One gunicorn per host may run several instances: no shared control socket.
control_socket_disable = True
graceful_timeout = 30
backlog = 2048

# Threads hold little: a smaller stack than the default 8 MiB keeps the
# address space of thousands of threads small (only touched pages count
# toward RSS either way).
THREAD_STACK_SIZE = 1024 * 1024


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def _setting(name: str):
    """Return ``IMSERVER_<name>`` as the app reads it (JSON), else the default.

    The worker's settings apply before the app exists, so they are read
    here the same way ``create_app`` reads them.
    """
    value = os.environ.get("IMSERVER_" + name)
    return json.loads(value) if value else DEFAULTS[name]


def switch_interval() -> float:
    """Return ``IMSERVER_SWITCH_INTERVAL`` if set, else the default (seconds)."""
    return float(_setting("SWITCH_INTERVAL"))


# prctl(2): a process's own futex hash table (Linux 6.16 and newer).
PR_FUTEX_HASH = 78
PR_FUTEX_HASH_SET_SLOTS = 1
PR_FUTEX_HASH_GET_SLOTS = 2


def futex_hash_slots() -> int:
    """Return ``IMSERVER_FUTEX_HASH_SLOTS`` if set, else the default.

    Raises ``ValueError`` unless it is 0 (the kernel's shared table) or a
    power of two, as the kernel requires.
    """
    try:
        slots = _setting("FUTEX_HASH_SLOTS")
    except ValueError:
        slots = None
    if not isinstance(slots, int) or isinstance(slots, bool) or slots < 0 or (
            slots & (slots - 1)):
        raise ValueError("IMSERVER_FUTEX_HASH_SLOTS must be 0 or a power of two, not "
                         f"{os.environ.get('IMSERVER_FUTEX_HASH_SLOTS')}")
    return slots


def _prctl(*args) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(*(ctypes.c_ulong(a) for a in args))


def set_futex_hash_slots(slots: int):
    """Give this process a futex hash table of ``slots`` buckets.

    Returns the buckets in effect (0: the kernel's shared table), or None
    where the kernel has no such setting (before Linux 6.16, not Linux).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        if _prctl(PR_FUTEX_HASH, PR_FUTEX_HASH_SET_SLOTS, slots, 0, 0) != 0:
            return None
        return _prctl(PR_FUTEX_HASH, PR_FUTEX_HASH_GET_SLOTS, 0, 0, 0)
    except (OSError, AttributeError):  # no libc to load, or no prctl in it
        return None


def post_fork(server, worker):
    """Prepare a worker: more file descriptors, smaller thread stacks, the
    GIL's switch interval, a futex hash table sized for thousands of threads."""
    _raise_fd_limit()
    threading.stack_size(THREAD_STACK_SIZE)
    sys.setswitchinterval(switch_interval())
    if set_futex_hash_slots(futex_hash_slots()) is None and server is not None:
        server.log.info("futex hash table left to the kernel (no PR_FUTEX_HASH here)")


def child_exit(server, worker):
    """Drop a dead worker's live gauges from the shared metrics."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def post_worker_init(worker):
    """On SIGTERM, close every WebSocket with 1001 before gunicorn's own stop."""
    hub = getattr(worker.wsgi, "extensions", {}).get("imserver")
    if hub is None:
        return
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):
        threading.Thread(target=hub.shutdown, name="imserver-shutdown").start()
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)
