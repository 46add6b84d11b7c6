"""The baseline of ``scripts/bench.py``: a bare flask-sock + simple-websocket relay.

This is NOT imserver. It is the same transport (Flask, flask-sock,
simple-websocket under gunicorn's gthread worker, one handler thread per
connection, a dict of connections with one lock per connection) with
everything imserver adds taken away: no database, no authentication, no
durability, no ordering guarantees beyond one lock, no heartbeat, no slow
receiver protection. What the bench measures on it is the ceiling of the
transport; every imserver figure is printed as a ratio to it.

It speaks the subset of the contract (``docs/protocol.md``) that
the load generator uses, so one generator drives both servers:

- ``POST /api/users`` ``{"username", "password"}`` -> 201 ``{"id", "username"}``
  (409 ``username_taken``), in memory;
- ``POST /api/tokens`` -> ``{"token": "<user id>", "user_id", "expires_at"}``:
  the token is the user id as a string, nothing is checked;
- ``POST /api/groups`` ``{"name", "members"}`` with ``Authorization: Bearer
  <user id>`` -> 201 ``{"id", "name", "owner", "members"}``;
- ``GET /healthz`` -> ``{"status": "ok"}``;
- ``GET /ws?token=<user id>``: ``ready`` first; ``send`` -> ``sent`` to the
  sender at once and ``message`` (with a per-user ``seq`` counter) to the
  receiver or to every other member of the group; ``ping`` -> ``pong``;
  ``ack`` is ignored. Entries for a user who is not connected are kept in a
  list in memory and written after ``ready`` on the next connection (so that
  the ``offline`` scenario has a transport baseline: pushing K frames to a
  fresh connection, without any database read).

Run it (the bench does this itself)::

    .venv/bin/gunicorn -k gthread --threads 1000 --chdir scripts \\
        -b 127.0.0.1:5001 'bare_relay:create_app()'
"""

import itertools
import json
import threading
import time

from flask import Flask
from flask import request
from flask_sock import Sock
from simple_websocket import ConnectionClosed


class _User:
    """One user: its connection, the lock of that connection, its seq counter."""

    __slots__ = ("id", "name", "lock", "ws", "seq", "pending")

    def __init__(self, user_id: int, name: str) -> None:
        self.id = user_id
        self.name = name
        # Serializes writes to ``ws`` (and guards ``seq`` and ``pending``).
        self.lock = threading.Lock()
        self.ws = None
        self.seq = 0
        # Frames for this user while it has no connection.
        self.pending: list[str] = []

    def deliver(self, message_json: str) -> None:
        """Write one ``message`` frame with the next seq, or keep it."""
        with self.lock:
            self.seq += 1
            frame = '{"type":"message","seq":%d,%s' % (self.seq, message_json[1:])
            ws = self.ws
            if ws is None:
                self.pending.append(frame)
                return
            try:
                ws.send(frame)
            except Exception:
                # No guarantees: the frame is lost with the connection.
                self.ws = None


def _error(code: str, message: str, status: int):
    return {"error": {"code": code, "message": message}}, status


def create_app() -> Flask:
    """Build the relay app (``gunicorn 'bare_relay:create_app()'``)."""
    app = Flask(__name__)
    sock = Sock(app)
    users: dict[int, _User] = {}
    by_name: dict[str, int] = {}
    groups: dict[int, list[int]] = {}
    # Guards the three dicts above (registration only; the hot path reads).
    state_lock = threading.Lock()
    user_ids = itertools.count(1)
    group_ids = itertools.count(1)
    message_ids = itertools.count(1)

    def caller() -> int | None:
        header = request.headers.get("Authorization", "")
        token = header.partition(" ")[2] or request.args.get("token", "")
        try:
            user_id = int(token)
        except ValueError:
            return None
        return user_id if user_id in users else None

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.post("/api/users")
    def register():
        data = request.get_json(force=True, silent=True) or {}
        name = data.get("username")
        if not isinstance(name, str) or not name:
            return _error("invalid", "username", 400)
        with state_lock:
            if name in by_name:
                return _error("username_taken", "taken", 409)
            user_id = next(user_ids)
            users[user_id] = _User(user_id, name)
            by_name[name] = user_id
        return {"id": user_id, "username": name}, 201

    @app.post("/api/tokens")
    def login():
        data = request.get_json(force=True, silent=True) or {}
        user_id = by_name.get(data.get("username"))
        if user_id is None:
            return _error("bad_credentials", "bad credentials", 401)
        return {"token": str(user_id), "user_id": user_id,
                "expires_at": int(time.time() * 1000) + 7 * 24 * 3600 * 1000}

    @app.post("/api/groups")
    def create_group():
        owner = caller()
        if owner is None:
            return _error("unauthorized", "no token", 401)
        data = request.get_json(force=True, silent=True) or {}
        members = sorted(set(data.get("members", [])) | {owner})
        if any(m not in users for m in members):
            return _error("not_found", "no such user", 404)
        with state_lock:
            group_id = next(group_ids)
            groups[group_id] = members
        return {"id": group_id, "name": data.get("name", ""), "owner": owner,
                "members": members}, 201

    @app.before_request
    def check_ws_token():
        if request.path == "/ws" and caller() is None:
            return _error("unauthorized", "bad token", 401)
        return None

    @sock.route("/ws")
    def websocket(ws):
        me = users[caller()]
        with me.lock:
            old, me.ws = me.ws, ws
            ws.send('{"type":"ready","user_id":%d}' % me.id)
            for frame in me.pending:
                ws.send(frame)
            me.pending.clear()
        if old is not None:
            try:
                old.close(4001, "replaced")
            except Exception:
                pass
        try:
            while True:
                text = ws.receive()
                try:
                    frame = json.loads(text)
                except (TypeError, ValueError):
                    continue
                kind = frame.get("type")
                if kind == "send":
                    _relay(me, ws, frame)
                elif kind == "ping":
                    with me.lock:
                        ws.send('{"type":"pong"}')
        except ConnectionClosed:
            pass
        finally:
            with me.lock:
                if me.ws is ws:
                    me.ws = None

    def _relay(me: _User, ws, frame: dict) -> None:
        message_id = next(message_ids)
        ts = time.time_ns() // 1_000_000
        cid = frame.get("cid")
        to, group = frame.get("to"), frame.get("group")
        message = {"id": message_id, "from": me.id}
        if group is not None:
            message["group"] = group
        else:
            message["to"] = to
        message.update(body=frame.get("body"), ts=ts, cid=cid)
        message_json = json.dumps(message, separators=(",", ":"))
        with me.lock:
            ws.send(json.dumps({"type": "sent", "cid": cid, "id": message_id, "ts": ts},
                               separators=(",", ":")))
        if group is not None:
            recipients = [users[m] for m in groups.get(group, ()) if m != me.id]
        else:
            recipients = [users[to]] if to in users else []
        for user in recipients:
            user.deliver(message_json)

    return app
