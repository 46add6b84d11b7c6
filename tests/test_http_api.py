"""The HTTP API against a live server: accounts, tokens, messages, history,
the error envelope, and the operations endpoints.

Every call goes over a real socket to ``live_server``; WebSocket receivers
are real ``websockets`` clients. Nothing sleeps: tests wait on a frame or
poll with ``wait_until``.
"""

import http.client
import itertools
import json
import re
import sqlite3
import time

import pytest
from itsdangerous import URLSafeSerializer

from conftest import T
from conftest import User
from conftest import wait_until
from imserver.auth import issue_token

DAY_MS = 24 * 3600 * 1000

_fast_names = itertools.count(1)


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


@pytest.fixture
def make_user(live_server, app):
    """Return a factory of users made without password hashing (fast).

    Registration and login are tested on their own below; the other tests
    only need signed-in users, and scrypt costs a tenth of a second each.
    """

    def make(name=None):
        name = name or f"fast{next(_fast_names)}"
        row = live_server.hub.store.create_user(name, "!no-password")
        with app.app_context():
            token, _ = issue_token(row["id"])
        return User(row["id"], name, token, live_server)

    return make


def call(server, method, path, raw=None, token=None, headers=None):
    """Make one HTTP call; return ``(status, headers, body bytes)``."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=T)
    try:
        hdrs = dict(headers or {})
        if raw is not None:
            hdrs.setdefault("Content-Type", "application/json")
        if token:
            hdrs["Authorization"] = f"Bearer {token}"
        conn.request(method, path, body=raw, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def assert_error(server, method, path, status, code, raw=None, token=None, headers=None):
    """Check that a call answers ``status`` with the JSON error envelope ``code``."""
    got, hdrs, payload = call(server, method, path, raw=raw, token=token, headers=headers)
    assert got == status, payload
    assert hdrs.get_content_type() == "application/json", (hdrs["Content-Type"], payload)
    body = json.loads(payload)
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    return body


def register(server, username, password="password123"):
    """POST /api/users; return ``(status, body)``."""
    return server.request("POST", "/api/users", {"username": username, "password": password})


def login(server, username, password="password123"):
    """POST /api/tokens; return ``(status, body)``."""
    return server.request("POST", "/api/tokens", {"username": username, "password": password})


def post_message(server, sender, body="hi", **fields):
    """POST /api/messages as ``sender``; return ``(status, body)``."""
    payload = {"body": body, **fields}
    return server.request("POST", "/api/messages", payload, token=sender.token)


def history(server, user, query):
    """GET /api/messages?<query> as ``user``; return ``(status, body)``."""
    return server.request("GET", "/api/messages?" + query, token=user.token)


def metric(server, name):
    """Return the value of one unlabelled sample of /metrics."""
    status, hdrs, payload = call(server, "GET", "/metrics")
    assert status == 200
    match = re.search(rf"^{re.escape(name)} (\S+)$", payload.decode(), re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def assert_nothing_more(ws):
    """Prove nothing else is queued for ``ws``: a ping is answered by the next frame."""
    ws.send({"type": "ping"})
    assert ws.recv() == {"type": "pong"}


def now_ms():
    return time.time_ns() // 1_000_000


def sign(app, data, key=None):
    """Sign ``data`` as a token, with the app's key or with ``key``."""
    key = key if key is not None else app.config["SECRET_KEY"]
    return URLSafeSerializer(key, salt="imserver-token").dumps(data)


def flip(token, index):
    """Return ``token`` with the character at ``index`` changed."""
    index %= len(token)
    assert token[index] != "."
    new = "A" if token[index] != "A" else "B"
    return token[:index] + new + token[index + 1:]


# ---------------------------------------------------------------------------
# POST /api/users
# ---------------------------------------------------------------------------


def test_register_answers_201_with_id_and_username(live_server):
    """A valid registration answers 201 with exactly the new id and username."""
    status, body = register(live_server, "alice")
    assert status == 201
    assert set(body) == {"id", "username"}
    assert body["username"] == "alice"
    assert type(body["id"]) is int and body["id"] > 0
    status, second = register(live_server, "bob")
    assert status == 201
    assert second["id"] != body["id"]


@pytest.mark.parametrize("username", ["a", "x" * 32, "Az09_.-", "...", "-_-"])
def test_register_with_boundary_username_is_accepted(live_server, username):
    """Usernames of 1 and 32 characters of every allowed kind are accepted."""
    status, body = register(live_server, username)
    assert status == 201, body
    assert body["username"] == username


@pytest.mark.parametrize("password", ["p" * 8, "p" * 128, "pässwörd✓", "        "])
def test_register_with_boundary_password_is_accepted(live_server, password):
    """Passwords of 8 and 128 characters (any characters) are accepted and log in."""
    status, body = register(live_server, "carol", password)
    assert status == 201, body
    status, tok = login(live_server, "carol", password)
    assert status == 200, tok


def test_register_with_taken_username_is_refused_409(live_server):
    """A second registration of one username answers 409 username_taken."""
    assert register(live_server, "dave")[0] == 201
    assert_error(live_server, "POST", "/api/users", 409, "username_taken",
                 raw=json.dumps({"username": "dave", "password": "otherpass1"}))


@pytest.mark.parametrize("body", [
    {},
    {"username": "erin"},
    {"password": "password123"},
    {"username": None, "password": "password123"},
    {"username": "erin", "password": None},
    {"username": 42, "password": "password123"},
    {"username": ["erin"], "password": "password123"},
    {"username": "erin", "password": 12345678},
    {"username": "erin", "password": ["password123"]},
    {"username": "", "password": "password123"},
    {"username": "x" * 33, "password": "password123"},
    {"username": "er in", "password": "password123"},
    {"username": " erin", "password": "password123"},
    {"username": "erin\n", "password": "password123"},
    {"username": "érin", "password": "password123"},
    {"username": "用户", "password": "password123"},
    {"username": "er/in", "password": "password123"},
    {"username": "er@in", "password": "password123"},
    {"username": "erin", "password": "p" * 7},
    {"username": "erin", "password": "p" * 129},
    {"username": "erin", "password": ""},
], ids=lambda b: json.dumps(b)[:40])
def test_register_with_bad_fields_is_refused_400_invalid(live_server, body):
    """Every malformed username or password answers 400 invalid and creates nothing."""
    assert_error(live_server, "POST", "/api/users", 400, "invalid", raw=json.dumps(body))
    # Nothing was created: the valid name is still free.
    assert register(live_server, "erin")[0] == 201


@pytest.mark.parametrize("raw", [
    b"not json",
    b'{"username": "erin", "password": ',
    b'["erin", "password123"]',
    b'"erin"',
    b"42",
    b"null",
    b"",
], ids=["text", "truncated", "array", "string", "number", "null", "empty"])
def test_register_with_non_object_body_is_refused_400_invalid(live_server, raw):
    """A body that is not a JSON object answers 400 invalid."""
    assert_error(live_server, "POST", "/api/users", 400, "invalid", raw=raw)


def test_register_without_content_type_still_reads_json(live_server):
    """A JSON body without Content-Type: application/json is still accepted."""
    status, hdrs, payload = call(
        live_server, "POST", "/api/users",
        raw=json.dumps({"username": "frank", "password": "password123"}),
        headers={"Content-Type": "text/plain"})
    assert status == 201, payload
    assert json.loads(payload)["username"] == "frank"


def test_register_stores_only_a_salted_hash_of_the_password(live_server, app, tmp_path):
    """users.password_hash never holds the password, and one password hashes differently twice."""
    password = "same-password-42"
    one = register(live_server, "gina", password)[1]["id"]
    two = register(live_server, "hank", password)[1]["id"]
    db = sqlite3.connect(str(tmp_path / "im.sqlite3"))
    try:
        rows = dict(db.execute("SELECT id, password_hash FROM users WHERE id IN (?, ?)",
                               (one, two)).fetchall())
    finally:
        db.close()
    assert set(rows) == {one, two}
    for stored in rows.values():
        assert password not in stored
        assert len(stored) > len(password)
    assert rows[one] != rows[two]


# ---------------------------------------------------------------------------
# POST /api/tokens
# ---------------------------------------------------------------------------


def test_login_answers_token_user_id_and_expiry(live_server, app):
    """A good login answers 200 {token, user_id, expires_at} expiring TOKEN_TTL from now."""
    user_id = register(live_server, "ivan")[1]["id"]
    before = now_ms()
    status, body = login(live_server, "ivan")
    after = now_ms()
    assert status == 200
    assert set(body) == {"token", "user_id", "expires_at"}
    assert body["user_id"] == user_id
    assert isinstance(body["token"], str) and body["token"]
    ttl_ms = app.config["TOKEN_TTL"] * 1000
    assert ttl_ms == 7 * DAY_MS
    assert before + ttl_ms - 1000 <= body["expires_at"] <= after + ttl_ms + 1000
    status, me = live_server.request("GET", "/api/me", token=body["token"])
    assert (status, me) == (200, {"id": user_id, "username": "ivan"})


def test_login_with_wrong_password_is_refused_401(live_server):
    """A wrong password answers 401 bad_credentials."""
    register(live_server, "judy")
    assert_error(live_server, "POST", "/api/tokens", 401, "bad_credentials",
                 raw=json.dumps({"username": "judy", "password": "wrong-password"}))


def test_login_of_unknown_user_is_refused_401(live_server):
    """An unknown username answers 401 bad_credentials, like a wrong password."""
    assert_error(live_server, "POST", "/api/tokens", 401, "bad_credentials",
                 raw=json.dumps({"username": "nobody", "password": "password123"}))


@pytest.mark.parametrize("raw", [
    b"not json",
    b"[]",
    b"",
    b"{}",
    b'{"username": "kate"}',
    b'{"password": "password123"}',
    b'{"username": "kate", "password": 12345678}',
    b'{"username": 7, "password": "password123"}',
    b'{"username": "kate", "password": "short"}',
], ids=["text", "array", "empty", "object", "no-password", "no-username",
        "int-password", "int-username", "short-password"])
def test_login_with_malformed_body_is_refused_401(live_server, raw):
    """A malformed login body answers 401 bad_credentials, not a hint about the rules."""
    register(live_server, "kate")
    assert_error(live_server, "POST", "/api/tokens", 401, "bad_credentials", raw=raw)


# ---------------------------------------------------------------------------
# GET /api/me and tokens
# ---------------------------------------------------------------------------


def test_me_with_bearer_token_answers_the_user(live_server):
    """GET /api/me with a valid Bearer token answers exactly {id, username}."""
    user = live_server.user("leo")
    status, body = live_server.request("GET", "/api/me", token=user.token)
    assert (status, body) == (200, {"id": user.id, "username": "leo"})


def test_me_without_token_is_refused_401(live_server):
    """GET /api/me without a token answers 401 unauthorized."""
    assert_error(live_server, "GET", "/api/me", 401, "unauthorized")


@pytest.mark.parametrize("header", ["Bearer garbage", "Bearer ", "Bearer a.b.c", "Basic xyz",
                                    "Bearer " + "x" * 2000])
def test_me_with_garbage_token_is_refused_401(live_server, header):
    """A token that is not one of ours answers 401 unauthorized."""
    assert_error(live_server, "GET", "/api/me", 401, "unauthorized",
                 headers={"Authorization": header})


def test_me_with_token_signed_by_another_key_is_refused_401(live_server, app):
    """A well-formed token signed with another SECRET_KEY answers 401."""
    user = live_server.user()
    forged = sign(app, {"u": user.id, "e": now_ms() + DAY_MS}, key="another-secret")
    assert_error(live_server, "GET", "/api/me", 401, "unauthorized", token=forged)
    # The same payload with the right key is accepted: only the key differs.
    good = sign(app, {"u": user.id, "e": now_ms() + DAY_MS})
    assert live_server.request("GET", "/api/me", token=good)[0] == 200


def test_me_with_expired_token_is_refused_401(live_server, app):
    """A correctly signed token whose expiry has passed answers 401."""
    user = live_server.user()
    expired = sign(app, {"u": user.id, "e": now_ms() - 1000})
    assert_error(live_server, "GET", "/api/me", 401, "unauthorized", token=expired)


@pytest.mark.parametrize("config_overrides", [{"TOKEN_TTL": 0}])
def test_me_with_token_of_zero_ttl_is_refused_401(live_server):
    """With TOKEN_TTL 0 a freshly issued token is already expired."""
    user = live_server.user()
    assert_error(live_server, "GET", "/api/me", 401, "unauthorized", token=user.token)


@pytest.mark.parametrize("where", ["payload", "signature"])
def test_me_with_tampered_token_is_refused_401(live_server, where):
    """A valid token with one character changed answers 401."""
    user = live_server.user()
    payload, _, signature = user.token.rpartition(".")
    index = 1 if where == "payload" else len(payload) + 1 + len(signature) // 2
    tampered = flip(user.token, index)
    assert tampered != user.token
    assert_error(live_server, "GET", "/api/me", 401, "unauthorized", token=tampered)


def test_me_with_token_of_unknown_user_is_refused_401(live_server, app):
    """A correctly signed token naming a user that does not exist answers 401."""
    token = sign(app, {"u": 987654, "e": now_ms() + DAY_MS})
    assert_error(live_server, "GET", "/api/me", 401, "unauthorized", token=token)


def test_issue_token_makes_a_token_the_api_accepts(live_server, app):
    """A token from imserver.auth.issue_token is accepted by GET /api/me."""
    user = live_server.user()
    with app.app_context():
        token, expires_at = issue_token(user.id)
    assert expires_at > now_ms()
    assert live_server.request("GET", "/api/me", token=token) == (
        200, {"id": user.id, "username": user.name})


@pytest.mark.parametrize("method,path", [
    ("GET", "/api/messages?with=1"),
    ("POST", "/api/messages"),
    ("GET", "/api/presence?ids=1"),
    ("GET", "/api/groups"),
    ("POST", "/api/groups"),
])
def test_every_api_call_without_token_is_refused_401(live_server, method, path):
    """Every call under /api but registration and login needs a token."""
    raw = b"{}" if method == "POST" else None
    assert_error(live_server, method, path, 401, "unauthorized", raw=raw)


# ---------------------------------------------------------------------------
# POST /api/messages
# ---------------------------------------------------------------------------


def test_post_message_answers_201_with_the_message(make_user, live_server):
    """POST /api/messages answers 201 with exactly {id, from, to, body, ts, cid}."""
    alice, bob = make_user(), make_user()
    before = now_ms()
    status, body = post_message(live_server, alice, "hello", to=bob.id, cid="c-1")
    assert status == 201
    assert set(body) == {"id", "from", "to", "body", "ts", "cid"}
    assert body["from"] == alice.id and body["to"] == bob.id
    assert body["body"] == "hello" and body["cid"] == "c-1"
    assert type(body["id"]) is int and body["id"] > 0
    assert before - 1000 <= body["ts"] <= now_ms() + 1000


def test_post_message_without_cid_answers_cid_null(make_user, live_server):
    """A message posted without a cid answers cid null, and a new id each time."""
    alice, bob = make_user(), make_user()
    first = post_message(live_server, alice, "one", to=bob.id)
    second = post_message(live_server, alice, "one", to=bob.id)
    assert first[0] == second[0] == 201
    assert first[1]["cid"] is None and second[1]["cid"] is None
    assert second[1]["id"] > first[1]["id"]


def test_post_message_with_to_in_query_is_accepted(make_user, live_server):
    """`?to=<uid>` in the query stands in for `to` in the body."""
    alice, bob = make_user(), make_user()
    status, body = live_server.request("POST", f"/api/messages?to={bob.id}",
                                       {"body": "via query", "cid": "q1"}, token=alice.token)
    assert status == 201, body
    assert body["to"] == bob.id and body["from"] == alice.id and body["body"] == "via query"
    status, page = history(live_server, bob, f"with={alice.id}")
    assert [m["id"] for m in page["messages"]] == [body["id"]]


def test_message_ids_grow_with_time(make_user, live_server):
    """Each new message gets a larger id than the one before."""
    alice, bob = make_user(), make_user()
    ids = [post_message(live_server, alice, f"m{i}", to=bob.id)[1]["id"] for i in range(5)]
    assert ids == sorted(ids) and len(set(ids)) == 5


@pytest.mark.parametrize("fields", [
    "both", "neither", "self", "to-string", "to-zero", "to-negative", "to-bool",
    "to-float", "group-string", "no-body", "empty-body", "int-body", "null-body",
    "list-body", "long-cid", "int-cid", "empty-cid",
])
def test_post_message_with_bad_frame_is_refused_400(make_user, live_server, fields):
    """A malformed message answers 400 bad_frame, as on the WebSocket."""
    alice, bob = make_user(), make_user()
    payload = {
        "both": {"to": bob.id, "group": 1, "body": "x"},
        "neither": {"body": "x"},
        "self": {"to": alice.id, "body": "x"},
        "to-string": {"to": str(bob.id), "body": "x"},
        "to-zero": {"to": 0, "body": "x"},
        "to-negative": {"to": -1, "body": "x"},
        "to-bool": {"to": True, "body": "x"},
        "to-float": {"to": float(bob.id), "body": "x"},
        "group-string": {"group": "1", "body": "x"},
        "no-body": {"to": bob.id},
        "empty-body": {"to": bob.id, "body": ""},
        "int-body": {"to": bob.id, "body": 5},
        "null-body": {"to": bob.id, "body": None},
        "list-body": {"to": bob.id, "body": ["x"]},
        "long-cid": {"to": bob.id, "body": "x", "cid": "c" * 65},
        "int-cid": {"to": bob.id, "body": "x", "cid": 5},
        "empty-cid": {"to": bob.id, "body": "x", "cid": ""},
    }[fields]
    assert_error(live_server, "POST", "/api/messages", 400, "bad_frame",
                 raw=json.dumps(payload), token=alice.token)
    # Nothing was stored.
    assert history(live_server, alice, f"with={bob.id}")[1] == {"messages": [],
                                                                "has_more": False}


def test_post_message_with_to_and_group_in_query_and_body_is_refused(make_user, live_server):
    """`?to=` in the query together with `group` in the body is both: 400 bad_frame."""
    alice, bob = make_user(), make_user()
    assert_error(live_server, "POST", f"/api/messages?to={bob.id}", 400, "bad_frame",
                 raw=json.dumps({"group": 1, "body": "x"}), token=alice.token)


def test_post_message_to_unknown_user_is_refused_404(make_user, live_server):
    """A message to a user id that does not exist answers 404 not_found."""
    alice = make_user()
    assert_error(live_server, "POST", "/api/messages", 404, "not_found",
                 raw=json.dumps({"to": 999999, "body": "x"}), token=alice.token)
    assert_error(live_server, "POST", "/api/messages?to=999999", 404, "not_found",
                 raw=json.dumps({"body": "x"}), token=alice.token)


def test_post_message_with_body_of_max_chars_is_accepted(make_user, live_server, app):
    """A body of exactly MAX_BODY_CHARS characters (even multi-byte) is stored whole."""
    assert app.config["MAX_BODY_CHARS"] == 4000
    alice, bob = make_user(), make_user()
    for text in ["a" * 4000, "é" * 4000, "😀" * 4000]:
        status, body = post_message(live_server, alice, text, to=bob.id)
        assert status == 201
        assert body["body"] == text


def test_post_message_with_body_over_max_chars_is_refused_400(make_user, live_server):
    """A body of MAX_BODY_CHARS + 1 characters answers 400 body_too_long."""
    alice, bob = make_user(), make_user()
    assert_error(live_server, "POST", "/api/messages", 400, "body_too_long",
                 raw=json.dumps({"to": bob.id, "body": "a" * 4001}), token=alice.token)
    assert history(live_server, alice, f"with={bob.id}")[1]["messages"] == []


def test_post_message_with_same_cid_twice_stores_and_delivers_once(make_user, live_server):
    """The same cid posted twice answers the same id, and the receiver gets one entry."""
    alice, bob = make_user(), make_user()
    first = post_message(live_server, alice, "once", to=bob.id, cid="dup")
    again = post_message(live_server, alice, "once", to=bob.id, cid="dup")
    assert first[0] == again[0] == 201
    assert again[1] == first[1]
    ws = bob.connect()
    try:
        frame = ws.recv_type("message")
        assert frame == {"type": "message", "seq": 1, **first[1]}
        assert_nothing_more(ws)
    finally:
        ws.close()
    page = history(live_server, bob, f"with={alice.id}")[1]
    assert [m["id"] for m in page["messages"]] == [first[1]["id"]]


def test_post_message_same_cid_from_two_senders_are_two_messages(make_user, live_server):
    """A cid is the sender's own: two senders using one cid make two messages."""
    alice, bob, carol = make_user(), make_user(), make_user()
    one = post_message(live_server, alice, "from alice", to=carol.id, cid="same")[1]
    two = post_message(live_server, bob, "from bob", to=carol.id, cid="same")[1]
    assert one["id"] != two["id"]
    assert (one["from"], two["from"]) == (alice.id, bob.id)


def test_post_message_reaches_online_receiver_live_with_seq(make_user, live_server):
    """An online receiver gets the posted message over its WebSocket at once, with seq."""
    alice, bob = make_user(), make_user()
    ws = bob.connect()
    try:
        status, first = post_message(live_server, alice, "live 1", to=bob.id, cid="l1")
        assert status == 201
        assert ws.recv_type("message") == {"type": "message", "seq": 1, **first}
        status, second = post_message(live_server, alice, "live 2", to=bob.id, cid="l2")
        assert ws.recv_type("message") == {"type": "message", "seq": 2, **second}
        assert_nothing_more(ws)
    finally:
        ws.close()


def test_post_message_does_not_echo_to_the_senders_socket(make_user, live_server):
    """The sender's own WebSocket gets no inbox entry for a message it posted."""
    alice, bob = make_user(), make_user()
    ws = alice.connect()
    try:
        assert post_message(live_server, alice, "x", to=bob.id)[0] == 201
        assert_nothing_more(ws)
    finally:
        ws.close()


# ---------------------------------------------------------------------------
# GET /api/messages?with=
# ---------------------------------------------------------------------------


def test_history_with_user_is_ascending_and_only_between_the_two(make_user, live_server):
    """History with a user holds both directions, ascending, and nobody else's messages."""
    alice, bob, carol = make_user(), make_user(), make_user()
    sent = [
        post_message(live_server, alice, "a->b 1", to=bob.id)[1],
        post_message(live_server, bob, "b->a", to=alice.id)[1],
        post_message(live_server, alice, "a->c", to=carol.id)[1],
        post_message(live_server, carol, "c->a", to=alice.id)[1],
        post_message(live_server, bob, "b->c", to=carol.id)[1],
        post_message(live_server, alice, "a->b 2", to=bob.id)[1],
    ]
    want = [sent[0], sent[1], sent[5]]
    for viewer, other in [(alice, bob), (bob, alice)]:
        status, body = history(live_server, viewer, f"with={other.id}")
        assert status == 200
        assert body == {"messages": want, "has_more": False}
    status, body = history(live_server, alice, f"with={carol.id}")
    assert body == {"messages": [sent[2], sent[3]], "has_more": False}


def test_history_answers_newest_limit_below_before(make_user, live_server):
    """`limit` picks the newest messages below `before`, ascending, with has_more."""
    alice, bob = make_user(), make_user()
    ids = [post_message(live_server, alice, f"m{i}", to=bob.id)[1]["id"] for i in range(5)]

    def page(query):
        status, body = history(live_server, alice, f"with={bob.id}&{query}")
        assert status == 200, body
        return [m["id"] for m in body["messages"]], body["has_more"]

    assert page("limit=2") == (ids[3:5], True)
    assert page(f"limit=2&before={ids[3]}") == (ids[1:3], True)
    assert page(f"limit=2&before={ids[1]}") == (ids[0:1], False)
    assert page(f"limit=5") == (ids, False)
    assert page(f"limit=4") == (ids[1:], True)
    assert page(f"before={ids[0]}") == ([], False)
    assert page(f"before={ids[4] + 1000}") == (ids, False)


def test_history_limit_defaults_to_50(make_user, live_server):
    """Without `limit` history answers the newest 50 messages."""
    alice, bob = make_user(), make_user()
    ws = alice.connect()
    try:
        cids = [ws.send_to(bob.id, f"m{i}") for i in range(55)]
        ids = [ws.recv_type("sent")["id"] for _ in cids]
    finally:
        ws.close()
    status, body = history(live_server, bob, f"with={alice.id}")
    assert status == 200
    assert [m["id"] for m in body["messages"]] == ids[5:]
    assert body["has_more"] is True


@pytest.mark.parametrize("query", ["limit=0", "limit=101", "limit=abc", "limit=-1",
                                   "limit=1.5", "before=abc", "before=0", "before=-3",
                                   "with=abc", "with=0"])
def test_history_with_bad_query_is_refused_400_invalid(make_user, live_server, query):
    """Out-of-range or non-integer limit, before or with answers 400 invalid."""
    alice, bob = make_user(), make_user()
    if not query.startswith("with="):
        query = f"with={bob.id}&{query}"
    assert_error(live_server, "GET", f"/api/messages?{query}", 400, "invalid",
                 token=alice.token)


@pytest.mark.parametrize("limit", [1, 100])
def test_history_with_limit_at_bounds_is_accepted(make_user, live_server, limit):
    """limit=1 and limit=100 are accepted."""
    alice, bob = make_user(), make_user()
    post_message(live_server, alice, "x", to=bob.id)
    post_message(live_server, alice, "y", to=bob.id)
    status, body = history(live_server, alice, f"with={bob.id}&limit={limit}")
    assert status == 200
    assert len(body["messages"]) == min(limit, 2)
    assert body["has_more"] is (limit == 1)


@pytest.mark.parametrize("query", ["", "with=1&group=1", "limit=5"])
def test_history_needs_exactly_one_of_with_and_group(make_user, live_server, query):
    """History without `with` or `group`, or with both, answers 400 invalid."""
    alice = make_user()
    assert_error(live_server, "GET", f"/api/messages?{query}", 400, "invalid",
                 token=alice.token)


def test_history_pages_through_120_messages_exactly_once(make_user, live_server):
    """Paging with limit=50 and before walks all 120 messages, each exactly once."""
    alice, bob = make_user(), make_user()
    ids = []
    for i in range(120):
        sender, receiver = (alice, bob) if i % 2 == 0 else (bob, alice)
        status, body = post_message(live_server, sender, f"m{i}", to=receiver.id)
        assert status == 201
        ids.append(body["id"])
    pages, before = [], None
    while True:
        query = f"with={bob.id}&limit=50" + (f"&before={before}" if before else "")
        status, body = history(live_server, alice, query)
        assert status == 200
        pages.append(body)
        if not body["has_more"]:
            break
        before = body["messages"][0]["id"]
        assert len(pages) < 10
    assert [len(p["messages"]) for p in pages] == [50, 50, 20]
    walked = [m["id"] for p in reversed(pages) for m in p["messages"]]
    assert walked == ids
    assert [m["body"] for p in reversed(pages) for m in p["messages"]] == [
        f"m{i}" for i in range(120)]


# ---------------------------------------------------------------------------
# the error envelope
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/nope", "/api/nope", "/api/users/1/x", "/api/groups/abc"])
def test_unknown_route_answers_404_json(make_user, live_server, path):
    """An unknown route answers 404 not_found in the JSON envelope, never HTML."""
    user = make_user()
    assert_error(live_server, "GET", path, 404, "not_found", token=user.token)


@pytest.mark.parametrize("method,path", [("DELETE", "/api/users"), ("PUT", "/api/tokens"),
                                         ("DELETE", "/api/me"), ("POST", "/healthz")])
def test_wrong_method_answers_405_json(live_server, method, path):
    """A known route with the wrong method answers 405 in the JSON envelope."""
    assert_error(live_server, method, path, 405, None,
                 raw=b"{}" if method in ("POST", "PUT") else None)


def test_body_over_max_content_length_answers_413_json(make_user, live_server, app):
    """A 300 KB request body answers 413 in the JSON envelope."""
    assert app.config["MAX_CONTENT_LENGTH"] == 256 * 1024
    user = make_user()
    big = json.dumps({"username": "x" * (300 * 1024), "password": "password123"}).encode()
    assert_error(live_server, "POST", "/api/users", 413, "too_large", raw=big)
    big = json.dumps({"to": user.id, "body": "x" * (300 * 1024)}).encode()
    assert_error(live_server, "POST", "/api/messages", 413, "too_large", raw=big,
                 token=user.token)


@pytest.mark.parametrize("path", ["/api/users", "/api/messages", "/api/groups"])
def test_malformed_json_answers_400_json(make_user, live_server, path):
    """A malformed JSON body answers 400 invalid in the JSON envelope."""
    user = make_user()
    assert_error(live_server, "POST", path, 400, "invalid", raw=b'{"to": 1, "body": "x',
                 token=user.token)


def test_unauthorized_answers_are_json(live_server):
    """A 401 is in the JSON envelope too, with Content-Type application/json."""
    assert_error(live_server, "GET", "/api/me", 401, "unauthorized",
                 headers={"Accept": "text/html"})


# ---------------------------------------------------------------------------
# /healthz and /metrics
# ---------------------------------------------------------------------------


def test_healthz_answers_ok(live_server):
    """GET /healthz answers 200 {"status": "ok"} in JSON."""
    status, hdrs, payload = call(live_server, "GET", "/healthz")
    assert status == 200
    assert hdrs.get_content_type() == "application/json"
    assert json.loads(payload) == {"status": "ok"}


def test_metrics_expose_the_contract_names(live_server):
    """GET /metrics is Prometheus text holding the three contract metrics."""
    status, hdrs, payload = call(live_server, "GET", "/metrics")
    assert status == 200
    assert hdrs.get_content_type() == "text/plain"
    text = payload.decode()
    assert "# TYPE imserver_connections gauge" in text
    assert "# TYPE imserver_messages_total counter" in text
    assert "# TYPE imserver_deliveries_total counter" in text
    for name in ["imserver_connections", "imserver_messages_total",
                 "imserver_deliveries_total"]:
        assert re.search(rf"^{name} \S+$", text, re.MULTILINE), name


def test_metrics_count_messages_deliveries_and_connections(make_user, live_server):
    """imserver_messages_total, _deliveries_total and _connections follow the traffic."""
    alice, bob = make_user(), make_user()
    messages = metric(live_server, "imserver_messages_total")
    deliveries = metric(live_server, "imserver_deliveries_total")
    assert metric(live_server, "imserver_connections") == 0
    post_message(live_server, alice, "offline", to=bob.id, cid="m1")
    assert metric(live_server, "imserver_messages_total") == messages + 1
    # A resent cid is not a new message.
    post_message(live_server, alice, "offline", to=bob.id, cid="m1")
    assert metric(live_server, "imserver_messages_total") == messages + 1
    ws = bob.connect()
    try:
        ws.recv_type("message")
        assert metric(live_server, "imserver_connections") == 1
        post_message(live_server, alice, "online", to=bob.id, cid="m2")
        ws.recv_type("message")
        assert metric(live_server, "imserver_messages_total") == messages + 2
        assert metric(live_server, "imserver_deliveries_total") == deliveries + 1
    finally:
        ws.close()
    wait_until(lambda: metric(live_server, "imserver_connections") == 0,
               message="the connection gauge to drop")


def test_users_can_be_looked_up_by_id_and_by_name(live_server):
    """GET /api/users/<id> and ?username= name people; unknown ones are 404."""
    alice, bob = live_server.user(), live_server.user()
    assert live_server.request("GET", f"/api/users/{bob.id}", token=alice.token) == (
        200, {"id": bob.id, "username": bob.name})
    assert live_server.request("GET", f"/api/users?username={bob.name}",
                               token=alice.token) == (200, {"id": bob.id, "username": bob.name})
    for path in ["/api/users/999999", "/api/users?username=nobody",
                 "/api/users?username=bad%20name", "/api/users"]:
        status, body = live_server.request("GET", path, token=alice.token)
        assert (status, body["error"]["code"]) == (404, "not_found"), path
    status, body = live_server.request("GET", f"/api/users/{bob.id}")
    assert (status, body["error"]["code"]) == (401, "unauthorized")
