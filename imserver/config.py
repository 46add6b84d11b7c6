"""Every knob of the contract and its default, as one plain dict.

``create_app`` layers these defaults, then ``IMSERVER_*`` environment variables
(``app.config.from_prefixed_env("IMSERVER")``, whose values pass through
``json.loads``, so ``IMSERVER_RATE_LIMIT=20`` arrives as an int), then the
test configuration. Core modules never read this: the app passes values on.

Imports: stdlib only.
"""

DEFAULTS = {
    # Storage. None means "SQLite in the instance folder".
    "DATABASE_URL": None,
    # Cross-process delivery. None means one process, in-process delivery only.
    "REDIS_URL": None,
    # Prefix of every Redis key and channel, so that several deployments (or
    # test runs) can share one Redis.
    "REDIS_PREFIX": "imserver:",
    # Signing key of tokens. None: generated once and kept in the instance
    # folder (see imserver.auth.load_secret_key).
    "SECRET_KEY": None,
    # Seconds a token stays valid: 7 days.
    "TOKEN_TTL": 7 * 24 * 3600,
    # Characters in a message body.
    "MAX_BODY_CHARS": 4000,
    # Bytes in one WebSocket frame; past it the connection closes with 1009.
    "MAX_FRAME_BYTES": 65536,
    # Members in one group.
    "MAX_GROUP_MEMBERS": 500,
    # Messages a second per user, and the burst allowed above it.
    "RATE_LIMIT": 20,
    "RATE_BURST": 40,
    # Seconds between server pings, and seconds of silence before a
    # connection is closed and removed.
    "PING_INTERVAL": 25,
    "IDLE_TIMEOUT": 60,
    # Seconds a queued frame may wait for a receiver that does not read
    # before that receiver is closed.
    "SEND_TIMEOUT": 10,
    # Bytes queued for one connection before it counts as stuck and is closed
    # (bounds the memory one client can make us hold).
    "MAX_OUTBUF_BYTES": 4 * 1024 * 1024,
    # Kernel send buffer of each WebSocket (SO_SNDBUF). Left alone, Linux
    # grows it to megabytes: a client that stops reading would hold that
    # much kernel memory and be noticed late. None: the kernel's choice.
    "SOCKET_SEND_BUFFER": 256 * 1024,
    # Bytes in an HTTP request body.
    "MAX_CONTENT_LENGTH": 256 * 1024,
    # Messages committed in one transaction at most (group commit).
    "COMMIT_BATCH": 512,
    # Seconds a thread may keep the GIL while another waits for it, set in
    # each gunicorn worker (imserver.gunicorn_conf): Python's 5 ms made
    # thousands of waiting threads a storm of wake-ups.
    "SWITCH_INTERVAL": 0.1,
    # Buckets of each gunicorn worker's own futex hash table (Linux 6.16 and
    # newer; a power of two, or 0 for the kernel's shared table). With the
    # kernel's default, 16 on a 2-core machine, thousands of threads waiting
    # for the GIL share a bucket, and bursts stalled for seconds in the
    # kernel walking it (docs/performance.md, idle).
    "FUTEX_HASH_SLOTS": 16384,
    # Threads that run the database reads of connections and requests (see
    # imserver.store._read): they bound the reads running at once.
    "READ_THREADS": 4,
    # Open WebSockets one process accepts; past it the upgrade is refused
    # with 503. None: 10,000 (``imserver serve`` sets it from --threads).
    "MAX_CONNECTIONS": None,
    # Registration and login attempts per client address: a second, and the
    # burst allowed above it (429 past it).
    "AUTH_RATE_LIMIT": 0.2,
    "AUTH_RATE_BURST": 10,
    # Failed logins per username: a minute, and the burst (429 past it).
    "LOGIN_FAILURES_PER_MINUTE": 5,
    # Reverse proxies in front that set X-Forwarded-For (0: none, and the
    # header is ignored so clients cannot forge their address).
    "PROXY_COUNT": 0,
    # Accept permessage-deflate when a client offers it. Off by default:
    # chat frames are short, and zlib on every frame costs more CPU than it
    # saves bandwidth.
    "WS_COMPRESSION": False,
}
