"""Group chat against a live server: groups and members over HTTP, group
messages over the WebSocket and HTTP, group history, presence, and a 500
member fan-out past a member that never reads.

Every call goes over a real socket to ``live_server``; receivers are real
``websockets`` clients (and one raw socket that never reads). Nothing
sleeps: tests wait on a frame or poll with ``wait_until``.
"""

import base64
import itertools
import json
import os
import socket
import sqlite3
import time

import pytest

from conftest import T
from conftest import User
from conftest import wait_until
from imserver.auth import issue_token

_fast_names = itertools.count(1)


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


@pytest.fixture
def make_user(live_server, app):
    """Return a factory of signed-in users made without password hashing (fast)."""

    def make(name=None):
        name = name or f"g{next(_fast_names)}"
        row = live_server.hub.store.create_user(name, "!no-password")
        with app.app_context():
            token, _ = issue_token(row["id"])
        return User(row["id"], name, token, live_server)

    return make


def create_group(server, owner, members, name="team"):
    """POST /api/groups as ``owner``; return ``(status, body)``."""
    return server.request("POST", "/api/groups",
                          {"name": name, "members": [m.id for m in members]},
                          token=owner.token)


def new_group(server, owner, members, name="team"):
    """Create a group and return its id."""
    status, body = create_group(server, owner, members, name)
    assert status == 201, body
    return body["id"]


def add_member(server, caller, group_id, user_id):
    return server.request("POST", f"/api/groups/{group_id}/members", {"user_id": user_id},
                          token=caller.token)


def remove_member(server, caller, group_id, user_id):
    return server.request("DELETE", f"/api/groups/{group_id}/members/{user_id}",
                          token=caller.token)


def show_group(server, caller, group_id):
    return server.request("GET", f"/api/groups/{group_id}", token=caller.token)


def post_group(server, sender, group_id, body="hi", cid=None):
    """POST a group message; return the 201 message."""
    payload = {"group": group_id, "body": body}
    if cid is not None:
        payload["cid"] = cid
    status, message = server.request("POST", "/api/messages", payload, token=sender.token)
    assert status == 201, message
    return message


def post_direct(server, sender, to, body="hi"):
    """POST a one-to-one message; return the 201 message."""
    status, message = server.request("POST", "/api/messages", {"to": to.id, "body": body},
                                     token=sender.token)
    assert status == 201, message
    return message


def group_history(server, user, group_id, query=""):
    return server.request("GET", f"/api/messages?group={group_id}{query}", token=user.token)


def assert_error(result, status, code):
    """Check ``(status, body)`` is the JSON error envelope with ``code``."""
    got, body = result
    assert got == status, body
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code, body


def entry(seq, message):
    """The frame a recipient gets for ``message`` as inbox entry ``seq``."""
    return {"type": "message", "seq": seq, **message}


def assert_nothing_more(ws):
    """Prove nothing else is queued for ``ws``: a ping is answered by the next frame."""
    ws.send({"type": "ping"})
    assert ws.recv() == {"type": "pong"}


def presence(server, user, ids):
    return server.request("GET", "/api/presence?ids=" + ids, token=user.token)


# ---------------------------------------------------------------------------
# create, list, show
# ---------------------------------------------------------------------------


def test_create_group_makes_caller_owner_and_member(live_server, make_user):
    """POST /api/groups answers 201 {id, name, owner, members ascending} with the caller in it."""
    alice, bob, carol = make_user(), make_user(), make_user()
    status, body = create_group(live_server, alice, [carol, bob], name="friends")
    assert status == 201
    assert set(body) == {"id", "name", "owner", "members"}
    assert type(body["id"]) is int and body["id"] > 0
    assert body["name"] == "friends"
    assert body["owner"] == alice.id
    assert body["members"] == sorted([alice.id, bob.id, carol.id])


def test_create_group_with_duplicates_and_caller_lists_each_member_once(live_server, make_user):
    """Members named twice, or the caller named too, appear once."""
    alice, bob = make_user(), make_user()
    status, body = live_server.request(
        "POST", "/api/groups", {"name": "dups", "members": [bob.id, alice.id, bob.id]},
        token=alice.token)
    assert status == 201, body
    assert body["members"] == sorted([alice.id, bob.id])


@pytest.mark.parametrize("payload", [{"name": "solo", "members": []}, {"name": "solo"}])
def test_create_group_without_members_has_only_the_owner(live_server, make_user, payload):
    """A group created with no members (or no members field) holds only its owner."""
    alice = make_user()
    status, body = live_server.request("POST", "/api/groups", payload, token=alice.token)
    assert status == 201, body
    assert body["members"] == [alice.id] and body["owner"] == alice.id


def test_create_group_with_unknown_member_is_refused_404(live_server, make_user):
    """An unknown member id answers 404 not_found and creates no group."""
    alice, bob = make_user(), make_user()
    result = live_server.request("POST", "/api/groups",
                                 {"name": "x", "members": [bob.id, 999999]}, token=alice.token)
    assert_error(result, 404, "not_found")
    assert live_server.request("GET", "/api/groups", token=alice.token) == (
        200, {"groups": []})


@pytest.mark.parametrize("payload", [
    {"members": []},
    {"name": "", "members": []},
    {"name": "   ", "members": []},
    {"name": "n" * 65, "members": []},
    {"name": 5, "members": []},
    {"name": None, "members": []},
    {"name": "x", "members": "1,2"},
    {"name": "x", "members": ["2"]},
    {"name": "x", "members": [0]},
    {"name": "x", "members": [-4]},
    {"name": "x", "members": [True]},
    {"name": "x", "members": [1.0]},
    {"name": "x", "members": {"1": 1}},
], ids=lambda p: json.dumps(p)[:40])
def test_create_group_with_bad_body_is_refused_400_invalid(live_server, make_user, payload):
    """A missing or bad name, or members that are not a list of ids, answers 400 invalid."""
    alice = make_user()
    assert_error(live_server.request("POST", "/api/groups", payload, token=alice.token),
                 400, "invalid")


@pytest.mark.parametrize("config_overrides", [{"MAX_GROUP_MEMBERS": 3}])
def test_create_group_past_max_members_is_refused_400_group_full(live_server, make_user):
    """A group of MAX_GROUP_MEMBERS is created; one more member answers 400 group_full."""
    alice, bob, carol, dave = make_user(), make_user(), make_user(), make_user()
    status, body = create_group(live_server, alice, [bob, carol])
    assert status == 201 and len(body["members"]) == 3
    assert_error(create_group(live_server, alice, [bob, carol, dave]), 400, "group_full")
    # The owner counts: the owner plus three others is four.
    assert_error(create_group(live_server, dave, [alice, bob, carol]), 400, "group_full")


def test_list_groups_answers_only_the_callers_groups(live_server, make_user):
    """GET /api/groups answers {"groups": [...]} with exactly the caller's groups."""
    alice, bob, carol = make_user(), make_user(), make_user()
    one = create_group(live_server, alice, [bob], name="one")[1]
    two = create_group(live_server, alice, [], name="two")[1]
    three = create_group(live_server, carol, [], name="three")[1]
    assert live_server.request("GET", "/api/groups", token=alice.token) == (
        200, {"groups": [one, two]})
    assert live_server.request("GET", "/api/groups", token=bob.token) == (
        200, {"groups": [one]})
    assert live_server.request("GET", "/api/groups", token=carol.token) == (
        200, {"groups": [three]})
    dave = make_user()
    assert live_server.request("GET", "/api/groups", token=dave.token) == (
        200, {"groups": []})


def test_show_group_answers_the_group_to_a_member(live_server, make_user):
    """GET /api/groups/<gid> answers the group to each of its members."""
    alice, bob = make_user(), make_user()
    status, group = create_group(live_server, alice, [bob])
    for member in (alice, bob):
        assert show_group(live_server, member, group["id"]) == (200, group)


def test_show_group_to_non_member_is_refused_403(live_server, make_user):
    """A non-member asking for a group gets 403 forbidden."""
    alice, bob, eve = make_user(), make_user(), make_user()
    group_id = new_group(live_server, alice, [bob])
    assert_error(show_group(live_server, eve, group_id), 403, "forbidden")


def test_show_unknown_group_is_refused_404(live_server, make_user):
    """An unknown group id answers 404 not_found."""
    alice = make_user()
    assert_error(show_group(live_server, alice, 999999), 404, "not_found")


# ---------------------------------------------------------------------------
# add and remove members
# ---------------------------------------------------------------------------


def test_owner_adds_member_with_204(live_server, make_user):
    """The owner adds a member: 204 with no body, and the member list shows it ascending."""
    alice, bob, carol = make_user(), make_user(), make_user()
    group_id = new_group(live_server, alice, [carol])
    assert add_member(live_server, alice, group_id, bob.id) == (204, None)
    status, group = show_group(live_server, bob, group_id)
    assert status == 200
    assert group["members"] == sorted([alice.id, bob.id, carol.id])
    assert group["owner"] == alice.id
    # Adding a member again changes nothing.
    assert add_member(live_server, alice, group_id, bob.id) == (204, None)
    assert show_group(live_server, bob, group_id)[1] == group


def test_non_owner_adding_member_is_refused_403(live_server, make_user):
    """A member who is not the owner, or a non-member, cannot add: 403 forbidden."""
    alice, bob, carol, eve = make_user(), make_user(), make_user(), make_user()
    group_id = new_group(live_server, alice, [bob])
    assert_error(add_member(live_server, bob, group_id, carol.id), 403, "forbidden")
    assert_error(add_member(live_server, eve, group_id, eve.id), 403, "forbidden")
    assert show_group(live_server, alice, group_id)[1]["members"] == sorted(
        [alice.id, bob.id])


def test_adding_to_unknown_group_or_unknown_user_is_refused_404(live_server, make_user):
    """Adding to an unknown group, or an unknown user, answers 404 not_found."""
    alice, bob = make_user(), make_user()
    group_id = new_group(live_server, alice, [])
    assert_error(add_member(live_server, alice, 999999, bob.id), 404, "not_found")
    assert_error(add_member(live_server, alice, group_id, 999999), 404, "not_found")


@pytest.mark.parametrize("user_id", [None, "2", 0, -1, True, 2.0, [2]])
def test_adding_member_with_bad_user_id_is_refused_400(live_server, make_user, user_id):
    """A user_id that is not a positive integer answers 400 invalid."""
    alice = make_user()
    group_id = new_group(live_server, alice, [])
    assert_error(add_member(live_server, alice, group_id, user_id), 400, "invalid")


@pytest.mark.parametrize("config_overrides", [{"MAX_GROUP_MEMBERS": 3}])
def test_adding_member_past_max_members_is_refused_400_group_full(live_server, make_user):
    """Adding a member to a group at MAX_GROUP_MEMBERS answers 400 group_full."""
    alice, bob, carol, dave = make_user(), make_user(), make_user(), make_user()
    group_id = new_group(live_server, alice, [bob])
    assert add_member(live_server, alice, group_id, carol.id) == (204, None)
    assert_error(add_member(live_server, alice, group_id, dave.id), 400, "group_full")
    assert show_group(live_server, alice, group_id)[1]["members"] == sorted(
        [alice.id, bob.id, carol.id])
    # Room made by a removal can be used again.
    assert remove_member(live_server, alice, group_id, bob.id) == (204, None)
    assert add_member(live_server, alice, group_id, dave.id) == (204, None)


def test_owner_removes_any_member_with_204(live_server, make_user):
    """The owner removes another member: 204, and the member is gone."""
    alice, bob, carol = make_user(), make_user(), make_user()
    group_id = new_group(live_server, alice, [bob, carol])
    assert remove_member(live_server, alice, group_id, bob.id) == (204, None)
    assert show_group(live_server, alice, group_id)[1]["members"] == sorted(
        [alice.id, carol.id])
    assert_error(show_group(live_server, bob, group_id), 403, "forbidden")
    assert live_server.request("GET", "/api/groups", token=bob.token) == (
        200, {"groups": []})


def test_member_removes_itself_with_204(live_server, make_user):
    """A member leaves a group by removing itself: 204."""
    alice, bob, carol = make_user(), make_user(), make_user()
    group_id = new_group(live_server, alice, [bob, carol])
    assert remove_member(live_server, bob, group_id, bob.id) == (204, None)
    assert show_group(live_server, alice, group_id)[1]["members"] == sorted(
        [alice.id, carol.id])


def test_member_removing_another_member_is_refused_403(live_server, make_user):
    """A member who is not the owner cannot remove another member: 403 forbidden."""
    alice, bob, carol, eve = make_user(), make_user(), make_user(), make_user()
    group_id = new_group(live_server, alice, [bob, carol])
    assert_error(remove_member(live_server, bob, group_id, carol.id), 403, "forbidden")
    assert_error(remove_member(live_server, bob, group_id, alice.id), 403, "forbidden")
    assert_error(remove_member(live_server, eve, group_id, carol.id), 403, "forbidden")
    assert show_group(live_server, alice, group_id)[1]["members"] == sorted(
        [alice.id, bob.id, carol.id])


def test_removing_from_unknown_group_is_refused_404(live_server, make_user):
    """Removing a member of an unknown group answers 404 not_found."""
    alice = make_user()
    assert_error(remove_member(live_server, alice, 999999, alice.id), 404, "not_found")


# ---------------------------------------------------------------------------
# group messages
# ---------------------------------------------------------------------------


def test_group_message_over_websocket_reaches_every_other_member_once(live_server,
                                                                     make_user):
    """A WebSocket group send gives every member but the sender one entry, seq 1, 2, 3."""
    alice, bob, carol, dave = make_user(), make_user(), make_user(), make_user()
    group_id = new_group(live_server, alice, [bob, carol, dave])
    sender, b_ws, c_ws = alice.connect(), bob.connect(), carol.connect()
    try:
        cids = [sender.send_to(group=group_id, body=f"hello {i}") for i in range(3)]
        sent = [sender.recv_type("sent") for _ in cids]
        assert [s["cid"] for s in sent] == cids
        assert all(set(s) == {"type", "cid", "id", "ts"} for s in sent)
        messages = [{"id": s["id"], "from": alice.id, "group": group_id,
                     "body": f"hello {i}", "ts": s["ts"], "cid": s["cid"]}
                    for i, s in enumerate(sent)]
        for ws in (b_ws, c_ws):
            assert [ws.recv_type("message") for _ in range(3)] == [
                entry(i + 1, m) for i, m in enumerate(messages)]
            assert_nothing_more(ws)
        # The sender gets no entry of its own messages.
        assert_nothing_more(sender)
        # An offline member gets them on connect.
        d_ws = dave.connect()
        try:
            assert [d_ws.recv_type("message") for _ in range(3)] == [
                entry(i + 1, m) for i, m in enumerate(messages)]
            assert_nothing_more(d_ws)
        finally:
            d_ws.close()
    finally:
        for ws in (sender, b_ws, c_ws):
            ws.close()


def test_group_message_over_http_answers_201_and_reaches_members(live_server, make_user):
    """POST /api/messages with group answers 201 {id, from, group, body, ts, cid}, delivered live."""
    alice, bob, carol = make_user(), make_user(), make_user()
    group_id = new_group(live_server, alice, [bob, carol])
    b_ws = bob.connect()
    try:
        message = post_group(live_server, carol, group_id, "over http", cid="h1")
        assert set(message) == {"id", "from", "group", "body", "ts", "cid"}
        assert message["from"] == carol.id and message["group"] == group_id
        assert message["body"] == "over http" and message["cid"] == "h1"
        assert b_ws.recv_type("message") == entry(1, message)
        assert_nothing_more(b_ws)
        # The same cid again answers the same message and delivers nothing twice.
        assert post_group(live_server, carol, group_id, "over http", cid="h1") == message
        assert_nothing_more(b_ws)
    finally:
        b_ws.close()
    a_ws = alice.connect()
    try:
        assert a_ws.recv_type("message") == entry(1, message)
        assert_nothing_more(a_ws)
    finally:
        a_ws.close()


def test_offline_member_gets_group_and_direct_entries_interleaved_in_seq_order(live_server,
                                                                              make_user):
    """On connect an offline member gets its direct and group entries in one dense seq order."""
    alice, bob, carol, dave = make_user(), make_user(), make_user(), make_user()
    group_id = new_group(live_server, alice, [bob, carol, dave])
    expected = [
        post_direct(live_server, alice, dave, "direct from alice"),
        post_group(live_server, alice, group_id, "group from alice"),
        post_direct(live_server, bob, dave, "direct from bob"),
        post_group(live_server, carol, group_id, "group from carol"),
        post_group(live_server, bob, group_id, "group from bob"),
        post_direct(live_server, carol, dave, "direct from carol"),
    ]
    ws = dave.connect()
    try:
        frames = [ws.recv_type("message") for _ in expected]
        assert frames == [entry(i + 1, m) for i, m in enumerate(expected)]
        assert_nothing_more(ws)
    finally:
        ws.close()
    # Bob's own inbox: the group messages of others only, seq 1, 2.
    ws = bob.connect()
    try:
        assert [ws.recv_type("message") for _ in range(2)] == [
            entry(1, expected[1]), entry(2, expected[3])]
        assert_nothing_more(ws)
    finally:
        ws.close()


def test_non_member_sending_to_group_is_refused_forbidden(live_server, make_user):
    """A non-member's group send gets error forbidden (with its cid) or 403, and nothing is stored."""
    alice, bob, eve = make_user(), make_user(), make_user()
    group_id = new_group(live_server, alice, [bob])
    ws = eve.connect()
    try:
        cid = ws.send_to(group=group_id, body="let me in")
        frame = ws.recv_type("error")
        assert frame["code"] == "forbidden" and frame["cid"] == cid
        assert set(frame) == {"type", "code", "message", "cid"}
        # The connection stays open.
        assert_nothing_more(ws)
    finally:
        ws.close()
    result = live_server.request("POST", "/api/messages", {"group": group_id, "body": "x"},
                                 token=eve.token)
    assert_error(result, 403, "forbidden")
    assert group_history(live_server, alice, group_id) == (
        200, {"messages": [], "has_more": False})
    b_ws = bob.connect()
    try:
        assert_nothing_more(b_ws)
    finally:
        b_ws.close()


def test_sending_to_unknown_group_is_refused_not_found(live_server, make_user):
    """A send to an unknown group gets error not_found (with its cid) or 404."""
    alice = make_user()
    ws = alice.connect()
    try:
        cid = ws.send_to(group=999999, body="anyone?")
        frame = ws.recv_type("error")
        assert frame["code"] == "not_found" and frame["cid"] == cid
        assert_nothing_more(ws)
    finally:
        ws.close()
    result = live_server.request("POST", "/api/messages", {"group": 999999, "body": "x"},
                                 token=alice.token)
    assert_error(result, 404, "not_found")


def test_removed_member_keeps_its_entries_and_gets_nothing_after(live_server, make_user):
    """A removed member keeps the entries it had (live and offline) and gets no later message."""
    alice, bob, carol, dave = make_user(), make_user(), make_user(), make_user()
    group_id = new_group(live_server, alice, [bob, carol, dave])
    b_ws, d_ws = bob.connect(), dave.connect()
    try:
        before = post_group(live_server, alice, group_id, "before")
        assert b_ws.recv_type("message") == entry(1, before)
        assert d_ws.recv_type("message") == entry(1, before)
        assert remove_member(live_server, alice, group_id, bob.id) == (204, None)
        assert remove_member(live_server, carol, group_id, carol.id) == (204, None)
        after = post_group(live_server, alice, group_id, "after")
        # Dave, still a member, gets it; the removed bob gets nothing.
        assert d_ws.recv_type("message") == entry(2, after)
        assert_nothing_more(b_ws)
    finally:
        b_ws.close()
        d_ws.close()
    # Bob never acked: its entry is sent again, and nothing else.
    b_ws = bob.connect()
    try:
        assert b_ws.recv_type("message") == entry(1, before)
        assert_nothing_more(b_ws)
    finally:
        b_ws.close()
    # Carol was offline throughout: she gets what she had, not what came after.
    c_ws = carol.connect()
    try:
        assert c_ws.recv_type("message") == entry(1, before)
        assert_nothing_more(c_ws)
    finally:
        c_ws.close()
    # A former member cannot read the group's history any more.
    assert_error(group_history(live_server, bob, group_id), 403, "forbidden")
    # Nor send to it.
    result = live_server.request("POST", "/api/messages", {"group": group_id, "body": "x"},
                                 token=carol.token)
    assert_error(result, 403, "forbidden")


def test_member_added_later_gets_nothing_from_before(live_server, make_user):
    """A member added after some messages gets only later ones, by replay and by history."""
    alice, bob, erin = make_user(), make_user(), make_user()
    group_id = new_group(live_server, alice, [bob])
    early = [post_group(live_server, alice, group_id, f"early {i}") for i in range(2)]
    assert add_member(live_server, alice, group_id, erin.id) == (204, None)
    late = post_group(live_server, bob, group_id, "late")
    ws = erin.connect()
    try:
        assert ws.recv_type("message") == entry(1, late)
        assert_nothing_more(ws)
    finally:
        ws.close()
    assert group_history(live_server, erin, group_id) == (
        200, {"messages": [late], "has_more": False})
    # Older members still see everything.
    assert group_history(live_server, alice, group_id) == (
        200, {"messages": early + [late], "has_more": False})


def test_member_added_later_history_is_exact_within_the_join_millisecond(live_server,
                                                                        make_user, tmp_path):
    """Messages stored in the very millisecond of a join show only if sent after it."""
    alice, bob, erin = make_user(), make_user(), make_user()
    group_id = new_group(live_server, alice, [bob])
    early = post_group(live_server, alice, group_id, "early")
    assert add_member(live_server, alice, group_id, erin.id) == (204, None)
    late = post_group(live_server, bob, group_id, "late")
    own = post_group(live_server, erin, group_id, "own")
    # Put all three messages and the join in one millisecond, as a fast
    # server can: only the inbox (and the sender) tell before from after.
    tie = late["ts"]
    db = sqlite3.connect(str(tmp_path / "im.sqlite3"))
    try:
        with db:
            db.execute("UPDATE messages SET ts = ? WHERE group_id = ?", (tie, group_id))
            db.execute("UPDATE group_members SET joined_at = ? WHERE group_id = ?"
                       " AND user_id = ?", (tie, group_id, erin.id))
    finally:
        db.close()
    early, late, own = ({**m, "ts": tie} for m in (early, late, own))
    assert group_history(live_server, erin, group_id) == (
        200, {"messages": [late, own], "has_more": False})
    assert group_history(live_server, bob, group_id) == (
        200, {"messages": [early, late, own], "has_more": False})


def test_group_message_seqs_are_dense_across_many_senders(live_server, make_user):
    """Messages from several members at once give each recipient seq 1..n, each message once."""
    users = [make_user() for _ in range(4)]
    group_id = new_group(live_server, users[0], users[1:])
    sockets = [u.connect() for u in users]
    try:
        per_sender = 10
        sent_ids = {}
        for ws, user in zip(sockets, users):
            for i in range(per_sender):
                ws.send_to(group=group_id, body=f"{user.id}:{i}")
        frames = {u.id: [] for u in users}
        expected_entries = 3 * per_sender
        deadline = time.monotonic() + 2 * T
        for ws, user in zip(sockets, users):
            sent_seen = 0
            while sent_seen < per_sender or len(frames[user.id]) < expected_entries:
                frame = ws.recv(max(0.1, deadline - time.monotonic()))
                if frame["type"] == "sent":
                    sent_ids[(user.id, sent_seen)] = frame["id"]
                    sent_seen += 1
                else:
                    assert frame["type"] == "message", frame
                    frames[user.id].append(frame)
        for user in users:
            got = frames[user.id]
            assert [f["seq"] for f in got] == list(range(1, expected_entries + 1))
            assert len({f["id"] for f in got}) == expected_entries
            assert all(f["from"] != user.id for f in got)
            # Each sender's messages arrive in the order it sent them.
            for other in users:
                if other is not user:
                    bodies = [f["body"] for f in got if f["from"] == other.id]
                    assert bodies == [f"{other.id}:{i}" for i in range(per_sender)]
        for ws in sockets:
            assert_nothing_more(ws)
    finally:
        for ws in sockets:
            ws.close()


# ---------------------------------------------------------------------------
# group history
# ---------------------------------------------------------------------------


def test_group_history_is_for_members_only(live_server, make_user):
    """GET /api/messages?group= answers 403 to a non-member and 404 for an unknown group."""
    alice, bob, eve = make_user(), make_user(), make_user()
    group_id = new_group(live_server, alice, [bob])
    message = post_group(live_server, alice, group_id, "secret")
    assert group_history(live_server, bob, group_id) == (
        200, {"messages": [message], "has_more": False})
    assert_error(group_history(live_server, eve, group_id), 403, "forbidden")
    assert_error(group_history(live_server, eve, 999999), 404, "not_found")


def test_group_history_pages_with_before_limit_and_has_more(live_server, make_user):
    """Group history answers the newest `limit` below `before`, ascending, with has_more."""
    alice, bob, carol = make_user(), make_user(), make_user()
    group_id = new_group(live_server, alice, [bob, carol])
    other_group = new_group(live_server, alice, [bob])
    senders = [alice, bob, carol]
    messages = []
    for i in range(7):
        messages.append(post_group(live_server, senders[i % 3], group_id, f"m{i}"))
        # Noise that must not show: another group, and a direct message.
        post_group(live_server, bob, other_group, f"other {i}")
        post_direct(live_server, alice, bob, f"direct {i}")
    ids = [m["id"] for m in messages]

    def page(query):
        status, body = group_history(live_server, carol, group_id, query)
        assert status == 200, body
        return [m["id"] for m in body["messages"]], body["has_more"]

    assert group_history(live_server, carol, group_id)[1] == {
        "messages": messages, "has_more": False}
    assert page("&limit=3") == (ids[4:], True)
    assert page(f"&limit=3&before={ids[4]}") == (ids[1:4], True)
    assert page(f"&limit=3&before={ids[1]}") == (ids[:1], False)
    assert page("&limit=7") == (ids, False)
    assert page("&limit=6") == (ids[1:], True)
    walked, before = [], None
    while True:
        got, more = page("&limit=2" + (f"&before={before}" if before else ""))
        walked = got + walked
        if not more:
            break
        before = got[0]
    assert walked == ids


@pytest.mark.parametrize("query", ["&limit=0", "&limit=101", "&limit=abc", "&before=x"])
def test_group_history_with_bad_query_is_refused_400(live_server, make_user, query):
    """Group history with a bad limit or before answers 400 invalid."""
    alice = make_user()
    group_id = new_group(live_server, alice, [])
    assert_error(group_history(live_server, alice, group_id, query), 400, "invalid")


# ---------------------------------------------------------------------------
# presence
# ---------------------------------------------------------------------------


def test_presence_flips_on_connect_and_back_after_close(live_server, make_user):
    """GET /api/presence shows a user online while connected and offline after it closes."""
    alice, bob, carol = make_user(), make_user(), make_user()
    ids = f"{alice.id},{bob.id},{carol.id}"
    assert presence(live_server, alice, ids) == (
        200, {"online": {str(alice.id): False, str(bob.id): False, str(carol.id): False}})
    ws = bob.connect()
    try:
        wait_until(lambda: presence(live_server, alice, ids)[1]["online"][str(bob.id)],
                   message="bob online")
        assert presence(live_server, carol, ids) == (
            200, {"online": {str(alice.id): False, str(bob.id): True, str(carol.id): False}})
    finally:
        ws.close()
    wait_until(lambda: not presence(live_server, alice, ids)[1]["online"][str(bob.id)],
               message="bob offline")
    assert presence(live_server, alice, ids) == (
        200, {"online": {str(alice.id): False, str(bob.id): False, str(carol.id): False}})


def test_presence_of_unknown_user_is_false(live_server, make_user):
    """An id that is no user is reported offline."""
    alice = make_user()
    assert presence(live_server, alice, "999999") == (200, {"online": {"999999": False}})


@pytest.mark.parametrize("ids", ["", "abc", "1,x", "0", "-1", "1.5", ",", "1;2",
                                 ",".join(["1"] * 501)])
def test_presence_with_bad_ids_is_refused_400_invalid(live_server, make_user, ids):
    """ids that are not a comma-separated list of positive integers answer 400 invalid."""
    alice = make_user()
    assert_error(presence(live_server, alice, ids), 400, "invalid")


def test_presence_without_ids_is_refused_400_invalid(live_server, make_user):
    """GET /api/presence with no ids parameter answers 400 invalid."""
    alice = make_user()
    assert_error(live_server.request("GET", "/api/presence", token=alice.token),
                 400, "invalid")


# ---------------------------------------------------------------------------
# fan-out past a member that never reads
# ---------------------------------------------------------------------------


def raw_ws_that_never_reads(server, token, rcvbuf=4096):
    """Open a WebSocket over a raw socket with a tiny receive window, read only the 101."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        # Set before connect so that the advertised window stays small.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(T)
        sock.connect(("127.0.0.1", server.port))
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall((
            f"GET /ws?token={token} HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{server.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            byte = sock.recv(1)  # one byte at a time: never read past the headers
            assert byte, "connection closed during the handshake"
            head += byte
        assert head.startswith(b"HTTP/1.1 101"), head
        return sock
    except BaseException:
        sock.close()
        raise


def drain_until_closed(sock, timeout):
    """Read a raw socket until the server closes or resets it; return the bytes read."""
    sock.settimeout(timeout)
    received = 0
    try:
        while True:
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            received += len(chunk)
    except ConnectionResetError:
        pass
    return received


@pytest.mark.parametrize("config_overrides", [
    # Only the bound on queued bytes can close it (SEND_TIMEOUT is past the
    # deadline); 512 KiB leaves live readers slowed by a loaded machine room.
    {"SEND_TIMEOUT": 60, "MAX_OUTBUF_BYTES": 512 * 1024, "SOCKET_SEND_BUFFER": 16 * 1024},
    # Only SEND_TIMEOUT can close it (200 messages fit in MAX_OUTBUF_BYTES).
    {"SEND_TIMEOUT": 1, "MAX_OUTBUF_BYTES": 4 * 1024 * 1024,
     "SOCKET_SEND_BUFFER": 16 * 1024},
], ids=["outbuf-full", "send-timeout"])
def test_group_fan_out_to_500_members_goes_on_past_one_that_never_reads(live_server, app):
    """200 large messages to a 500-member group reach ~60 live members in order while one
    that never reads is dropped, and that one gets its entries back on reconnect."""
    hub = live_server.hub
    count, online, messages, body_size = 500, 60, 200, 3000
    rows = [hub.store.create_user(f"fan{next(_fast_names)}", "!no-password")
            for _ in range(count)]
    with app.app_context():
        users = [User(r["id"], r["username"], issue_token(r["id"])[0], live_server)
                 for r in rows]
    owner, stuck, readers = users[0], users[1], users[2:online]
    status, group = create_group(live_server, owner, users[1:], name="everyone")
    assert status == 201, group
    assert len(group["members"]) == count

    sockets = []
    raw = None
    try:
        sender = owner.connect()
        sockets.append(sender)
        for user in readers:
            # Unbounded client queue: each client's own thread keeps reading.
            sockets.append(user.connect(max_queue=None))
        # SOCKET_SEND_BUFFER (16 KiB here) keeps the kernel from holding
        # the 600 KB itself, as it would on loopback with autotuning.
        raw = raw_ws_that_never_reads(live_server, stuck.token)
        wait_until(lambda: hub.conns.is_online(stuck.id), message="the stuck member online")

        bodies = [f"{i:04d}:" + "x" * (body_size - 5) for i in range(messages)]
        started = time.monotonic()
        cids = [sender.send_to(group=group["id"], body=b, cid=f"fan-{i}")
                for i, b in enumerate(bodies)]
        deadline = started + 6 * T
        sent = [sender.recv_type("sent", timeout=max(0.1, deadline - time.monotonic()))
                for _ in cids]
        sent_after = time.monotonic() - started
        assert [s["cid"] for s in sent] == cids
        ids = [s["id"] for s in sent]
        assert ids == sorted(ids)

        # Every live reader gets all 200, seq 1..200, in order, within the deadline.
        for user, ws in zip(readers, sockets[1:]):
            frames = [ws.recv_type("message", timeout=max(0.1, deadline - time.monotonic()))
                      for _ in range(messages)]
            assert [f["seq"] for f in frames] == list(range(1, messages + 1)), user.id
            assert [f["id"] for f in frames] == ids, user.id
            assert [f["body"] for f in frames] == bodies, user.id
        assert sent_after < 3 * T, f"sent answers took {sent_after:.1f}s"

        # The member that never reads is closed (SEND_TIMEOUT / MAX_OUTBUF_BYTES).
        wait_until(lambda: not hub.conns.is_online(stuck.id), timeout=6 * T,
                   message="the stuck member dropped")
        got = drain_until_closed(raw, T)
        assert got < messages * body_size, "the stuck member was never stuck"
        raw.close()
        raw = None
        assert presence(live_server, owner, str(stuck.id)) == (
            200, {"online": {str(stuck.id): False}})

        # The sender and the readers are still connected and answer.
        for ws in sockets:
            assert_nothing_more(ws)

        # Its entries waited in its inbox: a fresh connection replays all 200.
        again = stuck.connect(max_queue=None)
        try:
            frames = [again.recv_type("message") for _ in range(messages)]
            assert [f["seq"] for f in frames] == list(range(1, messages + 1))
            assert [f["id"] for f in frames] == ids
            assert [f["body"] for f in frames] == bodies
            assert_nothing_more(again)
        finally:
            again.close()
    finally:
        if raw is not None:
            raw.close()
        for ws in sockets:
            ws.close()
