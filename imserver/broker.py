"""The delivery seam: hand committed inbox entries to the connections.

``LocalBroker`` is the Go article's single-machine mode: every user's
connection is in this process's ``ConnManager``, so delivering is writing
to it, and presence is asking it. The scale-out mode (several processes on
Redis) is another broker with the same two methods, so neither the
WebSocket handler nor the store changes with it.

Imports: stdlib, and ``redis`` inside ``RedisBroker`` only. The app hands in
callables (``deliver(entries)``, ``is_online(user_id)``, ...); this module
never imports the ``ConnManager``.
"""

import json
import logging
import os
import queue
import threading
import time

logger = logging.getLogger(__name__)


class LocalBroker:
    """Deliver and answer presence within this one process."""

    def __init__(self, deliver, is_online, count, on_kick) -> None:
        # deliver(entries): write (user_id, seq, frame) entries to local
        # connections; returns the set of user ids that were connected.
        self._deliver = deliver
        self._is_online = is_online
        self._count = count
        self._on_kick = on_kick

    def publish(self, entries: list) -> None:
        """Deliver committed entries, in commit order, to whoever is online."""
        self._deliver(entries)

    def online(self, user_ids) -> dict:
        """Return ``{user_id: bool}``: who has a live connection."""
        return {user_id: self._is_online(user_id) for user_id in user_ids}

    def register(self, user_id: int, token: str) -> None:
        """Nothing to record: the ConnManager is the whole truth here."""

    def unregister(self, user_id: int, token: str) -> None:
        """Nothing to forget beyond the ConnManager."""

    def healthy(self) -> bool:
        """Tell whether delivery works (always, within one process)."""
        return True

    def kick(self, user_id: int, code: int = 1000, reason: str = "") -> bool:
        """Close ``user_id``'s connection; False if it has none."""
        if not self._is_online(user_id):
            return False
        self._on_kick(user_id, None, code, reason)
        return True

    def stats(self) -> list[dict]:
        """Return this process's connection count."""
        return [{"node": "local", "pid": os.getpid(), "connections": self._count()}]

    def close(self) -> None:
        """Release resources (none here)."""


class RedisBroker:
    """Deliver across processes and hosts through Redis pub/sub.

    The Go article's design is single-machine: one process holds the map of
    connections. With several gunicorn workers (or hosts) user A's socket and
    user B's socket live in different processes. Each process still keeps
    its own ``ConnManager`` for its own sockets; this broker adds:

    - **a node channel per process** (``<prefix>node:<node_id>``), which the
      process subscribes to once. Committed entries for users held
      elsewhere are published, grouped, to the channel of the node holding
      each user: one subscription per process instead of one per user, and
      no subscription churn when users come and go.
    - **a presence hash** (``<prefix>presence``: user id -> connection
      token ``node_id/n``) written on connect and removed on disconnect
      (only if it still names this connection), and a liveness key per node
      (``<prefix>alive:<node_id>``, refreshed every few seconds, expiring
      after ``NODE_TTL``), so that users of a killed process read as offline.
    - **replace across processes**: registering a user whose hash entry
      names another node sends that node a ``kick``: it closes its
      connection with 4001 unless it is the one to keep.

    Pub/sub may drop a notification (a reconnect, a Redis restart): the
    database stays the truth. After the subscriber (re)connects, the app
    re-registers its users and catches every connection up from the
    database (``on_reconnect``); a gap in live entries is filled from the
    database too, so a dropped notification only delays a delivery.

    Publishing to other nodes is done by a thread of its own (the
    publisher), in commit order, so the writer never waits on Redis.

    Redis errors never leave this class: a failed publish is logged and
    counted, and the entries wait in the inboxes.
    """

    NODE_TTL = 15  # seconds a node counts as alive after its last refresh
    REFRESH = 5  # seconds between refreshes of the liveness key

    _REGISTER = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return old
"""
    _RESTORE = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  return ARGV[2]
end
return redis.call('HGET', KEYS[1], ARGV[1])
"""
    _UNREGISTER = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"""

    def __init__(self, url: str, prefix: str, deliver, is_online, count, on_kick,
                 on_reconnect, on_publish_error=None) -> None:
        import uuid

        import redis

        self._redis_module = redis
        self.prefix = prefix
        self.node_id = uuid.uuid4().hex[:16]
        self.channel = f"{prefix}node:{self.node_id}"
        self._presence = f"{prefix}presence"
        self._deliver = deliver
        self._is_online = is_online
        self._count = count
        self._stats = f"{prefix}stats"
        self._on_kick = on_kick
        self._on_reconnect = on_reconnect
        self._on_publish_error = on_publish_error
        self._client = redis.Redis.from_url(url, socket_timeout=5,
                                            socket_connect_timeout=5)
        self._register_script = self._client.register_script(self._REGISTER)
        self._unregister_script = self._client.register_script(self._UNREGISTER)
        self._restore_script = self._client.register_script(self._RESTORE)
        # Probes for health checks: nonce -> threading.Event, set by the listener.
        self._probes: dict = {}
        self._probes_lock = threading.Lock()
        self._subscribed = threading.Event()
        self._stop = threading.Event()
        self._listener = threading.Thread(target=self._listen, name="imserver-redis",
                                          daemon=True)
        self._listener.start()
        # Entries for users held by other nodes, waiting for the publisher:
        # lists of entries, None to stop.
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._publisher = threading.Thread(target=self._publish_loop,
                                           name="imserver-publisher", daemon=True)
        self._publisher.start()

    # -- the delivery seam ---------------------------------------------------

    def publish(self, entries: list) -> None:
        """Deliver committed entries: here to local users, via Redis to others.

        The local ones are written at once (in the writer thread); the
        others are queued for the publisher thread, so that the writer
        starts its next transaction instead of waiting for two Redis round
        trips. One thread publishes, in commit order, so each user's
        entries arrive in order; batches queued meanwhile go out together.
        """
        connected = self._deliver(entries)
        remote = [e for e in entries if e[0] not in connected]
        if remote:
            self._outbox.put(remote)

    def _publish_loop(self) -> None:
        """The publisher thread: send what the writer queued until ``close``."""
        stopping = False
        while not stopping:
            remote = self._outbox.get()
            if remote is None:
                break
            while True:
                try:
                    more = self._outbox.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stopping = True
                    break
                remote += more
            try:
                self._publish_remote(remote)
            except Exception:
                logger.exception("publishing entries failed")

    def _publish_remote(self, remote: list) -> None:
        """Publish entries to the nodes holding their users (two round trips)."""
        try:
            user_ids = sorted({e[0] for e in remote})
            nodes = self._client.hmget(self._presence, user_ids)
            node_of = {u: t.decode().split("/")[0] for u, t in zip(user_ids, nodes) if t}
            by_node: dict = {}
            for entry in remote:
                node = node_of.get(entry[0])
                if node is not None and node != self.node_id:
                    by_node.setdefault(node, []).append(list(entry))
            if by_node:
                pipe = self._client.pipeline(transaction=False)
                for node, items in by_node.items():
                    pipe.publish(f"{self.prefix}node:{node}", json.dumps({"e": items}))
                pipe.execute()
        except self._redis_module.RedisError as exc:
            # The entries are committed: their users get them on the next
            # catch-up or connection. Delay, never loss.
            logger.warning("publish failed, entries wait in the inboxes: %s", exc)
            if self._on_publish_error is not None:
                self._on_publish_error()

    def online(self, user_ids) -> dict:
        """Return ``{user_id: bool}`` across every process and host."""
        result = {u: self._is_online(u) for u in user_ids}
        others = [u for u in user_ids if not result[u]]
        if not others:
            return result
        try:
            tokens = self._client.hmget(self._presence, others)
            nodes = {u: t.decode().split("/")[0] for u, t in zip(others, tokens) if t}
            distinct = sorted(set(nodes.values()))
            pipe = self._client.pipeline(transaction=False)
            for node in distinct:
                pipe.exists(f"{self.prefix}alive:{node}")
            alive = dict(zip(distinct, pipe.execute()))
        except self._redis_module.RedisError as exc:
            logger.warning("presence lookup failed: %s", exc)
            return result
        for user_id, node in nodes.items():
            result[user_id] = bool(alive.get(node))
        return result

    def register(self, user_id: int, token: str) -> None:
        """Record that ``user_id`` is connected here; replace it elsewhere."""
        try:
            old = self._register_script(keys=[self._presence], args=[user_id, token])
        except self._redis_module.RedisError as exc:
            logger.warning("presence register failed user_id=%s: %s", user_id, exc)
            return
        if old:
            node = old.decode().split("/")[0]
            if node != self.node_id:
                self._send_control(node, {"kick": user_id, "keep": token,
                                          "code": 4001, "reason": "replaced"})

    def restore(self, user_id: int, token: str) -> bool:
        """Re-record a connection after Redis lost its data; False if replaced.

        Only fills an empty entry: an entry naming another connection means
        the user connected elsewhere meanwhile, and that one wins.
        """
        try:
            current = self._restore_script(keys=[self._presence], args=[user_id, token])
        except self._redis_module.RedisError as exc:
            logger.warning("presence restore failed user_id=%s: %s", user_id, exc)
            return True
        return current is None or current.decode() == token

    def unregister(self, user_id: int, token: str) -> None:
        """Forget ``user_id``'s presence if it still names this connection."""
        try:
            self._unregister_script(keys=[self._presence], args=[user_id, token])
        except self._redis_module.RedisError as exc:
            logger.warning("presence unregister failed user_id=%s: %s", user_id, exc)

    def kick(self, user_id: int, code: int = 1000, reason: str = "") -> bool:
        """Close ``user_id``'s connection wherever it is; False if not found."""
        try:
            token = self._client.hget(self._presence, user_id)
        except self._redis_module.RedisError as exc:
            logger.warning("kick lookup failed user_id=%s: %s", user_id, exc)
            return False
        if not token:
            return False
        node = token.decode().split("/")[0]
        message = {"kick": user_id, "keep": None, "code": code, "reason": reason}
        if node == self.node_id:
            self._on_kick(user_id, None, code, reason)
            return True
        return self._send_control(node, message)

    def healthy(self, timeout: float = 2.0) -> bool:
        """Tell whether the subscriber really receives: a round trip to ourselves."""
        import secrets

        if not self._subscribed.is_set():
            return False
        nonce = secrets.token_hex(8)
        event = threading.Event()
        with self._probes_lock:
            self._probes[nonce] = event
        try:
            if not self._send_control(self.node_id, {"probe": nonce}):
                return False
            return event.wait(timeout)
        finally:
            with self._probes_lock:
                self._probes.pop(nonce, None)

    def close(self) -> None:
        """Publish what is queued, stop the threads and forget this node."""
        self._outbox.put(None)
        self._publisher.join(timeout=5)
        self._stop.set()
        self._listener.join(timeout=5)
        try:
            self._client.delete(f"{self.prefix}alive:{self.node_id}")
            self._client.hdel(self._stats, self.node_id)
        except self._redis_module.RedisError:
            pass
        self._client.close()

    # -- internals -------------------------------------------------------------

    def _send_control(self, node: str, message: dict) -> bool:
        try:
            self._client.publish(f"{self.prefix}node:{node}", json.dumps(message))
            return True
        except self._redis_module.RedisError as exc:
            logger.warning("control message to node %s failed: %s", node, exc)
            return False

    def _listen(self) -> None:
        """Receive this node's channel; reconnect with backoff; never die."""
        backoff = 0.5
        while not self._stop.is_set():
            pubsub = None
            try:
                pubsub = self._client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.channel)
                self._refresh()
                self._subscribed.set()
                logger.info("redis subscriber ready node=%s", self.node_id)
                # Whatever was published while we were not listening is in
                # the database: re-register our users and catch them up.
                self._on_reconnect()
                backoff = 0.5
                next_refresh = time.monotonic() + self.REFRESH
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is not None and message["type"] == "message":
                        self._handle(message["data"])
                    if time.monotonic() >= next_refresh:
                        self._refresh()
                        next_refresh = time.monotonic() + self.REFRESH
            except self._redis_module.RedisError as exc:
                lost = self._subscribed.is_set()
                self._subscribed.clear()
                # Say plainly that Redis does not answer, also at start when
                # there was never a subscription to lose.
                logger.warning("redis unreachable (%s): subscriber %s, retrying in %.1fs",
                               exc, "lost" if lost else "not connected", backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
            except Exception:
                self._subscribed.clear()
                logger.exception("redis subscriber failed")
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
            finally:
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except Exception:
                        pass
        self._subscribed.clear()

    def _refresh(self) -> None:
        pipe = self._client.pipeline(transaction=False)
        pipe.set(f"{self.prefix}alive:{self.node_id}", 1, ex=self.NODE_TTL)
        pipe.hset(self._stats, self.node_id, json.dumps(self._own_stats()))
        pipe.execute()

    def _own_stats(self) -> dict:
        return {"node": self.node_id, "pid": os.getpid(), "connections": self._count()}

    def stats(self) -> list[dict]:
        """Return the connection count of every live node (as of its last refresh)."""
        own = self._own_stats()
        try:
            rows = self._client.hgetall(self._stats)
            nodes = sorted(k.decode() for k in rows)
            pipe = self._client.pipeline(transaction=False)
            for node in nodes:
                pipe.exists(f"{self.prefix}alive:{node}")
            alive = dict(zip(nodes, pipe.execute()))
        except self._redis_module.RedisError as exc:
            logger.warning("stats lookup failed: %s", exc)
            return [own]
        result = [own]
        for key, value in rows.items():
            node = key.decode()
            if node != self.node_id and alive.get(node):
                result.append(json.loads(value))
        return result

    def _handle(self, data: bytes) -> None:
        try:
            message = json.loads(data)
        except ValueError:
            logger.warning("ignoring a malformed message on %s", self.channel)
            return
        if "e" in message:
            self._deliver([tuple(e) for e in message["e"]])
        elif "kick" in message:
            self._on_kick(message["kick"], message.get("keep"),
                          message.get("code", 1000), message.get("reason", ""))
        elif "probe" in message:
            with self._probes_lock:
                event = self._probes.get(message["probe"])
            if event is not None:
                event.set()
