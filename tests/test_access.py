"""No user reads, sends as, acks for or learns the groups of another."""

import os
import stat

from conftest import base_config

from imserver import create_app


def test_a_frame_cannot_name_another_sender(live_server):
    """from/user_id fields in a send frame are ignored: the token names the sender."""
    alice, bob, mallory = live_server.user(), live_server.user(), live_server.user()
    wm, wb = mallory.connect(), bob.connect()
    wm.send({"type": "send", "cid": "x", "to": bob.id, "body": "trust me",
             "from": alice.id, "user_id": alice.id, "sender": alice.id})
    wm.recv_type("sent")
    message = wb.recv_type("message")
    assert message["from"] == mallory.id
    wm.close()
    wb.close()


def test_an_http_message_cannot_name_another_sender(live_server):
    """POST /api/messages stores the token's user as the sender, whatever the body says."""
    alice, bob, mallory = live_server.user(), live_server.user(), live_server.user()
    status, message = live_server.request(
        "POST", "/api/messages", {"to": bob.id, "body": "hi", "from": alice.id},
        token=mallory.token)
    assert status == 201 and message["from"] == mallory.id


def test_an_ack_moves_only_the_own_cursor(live_server):
    """An ack naming another user moves only the sender's own cursor."""
    alice, bob = live_server.user(), live_server.user()
    wa, wb = alice.connect(), bob.connect()
    wa.send_to(bob.id, "one")
    wa.recv_type("sent")
    wb.recv_type("message")
    wb.send({"type": "ack", "seq": 1, "user_id": alice.id})
    wb.send({"type": "ping"})
    assert wb.recv() == {"type": "pong"}
    hub = live_server.hub
    from conftest import wait_until

    wait_until(lambda: hub.store.cursor(bob.id)[0] == 1, message="bob's cursor")
    assert hub.store.cursor(alice.id)[0] == 0
    wa.close()
    wb.close()


def test_nobody_reads_a_conversation_between_two_others(live_server):
    """History with=X answers only the caller's own conversation with X."""
    alice, bob, mallory = live_server.user(), live_server.user(), live_server.user()
    live_server.request("POST", "/api/messages", {"to": bob.id, "body": "secret"},
                        token=alice.token)
    for other in (alice.id, bob.id):
        status, page = live_server.request("GET", f"/api/messages?with={other}",
                                           token=mallory.token)
        assert status == 200 and page["messages"] == []


def test_nobody_learns_or_reads_the_groups_of_another(live_server):
    """A non-member sees no group in its list, gets 403 on it, its history and members."""
    alice, bob, mallory = live_server.user(), live_server.user(), live_server.user()
    status, group = live_server.request("POST", "/api/groups",
                                        {"name": "private", "members": [bob.id]},
                                        token=alice.token)
    gid = group["id"]
    live_server.request("POST", "/api/messages", {"group": gid, "body": "members only"},
                        token=alice.token)
    assert live_server.request("GET", "/api/groups", token=mallory.token) == (
        200, {"groups": []})
    for method, path, body in [
        ("GET", f"/api/groups/{gid}", None),
        ("GET", f"/api/messages?group={gid}", None),
        ("POST", f"/api/groups/{gid}/members", {"user_id": mallory.id}),
        ("DELETE", f"/api/groups/{gid}/members/{bob.id}", None),
        ("POST", "/api/messages", {"group": gid, "body": "let me in"}),
    ]:
        status, answer = live_server.request(method, path, body, token=mallory.token)
        assert (status, answer["error"]["code"]) == (403, "forbidden"), path
    # Mallory's socket cannot post there either.
    wm = mallory.connect()
    wm.send_to(group=gid, body="let me in", cid="m1")
    error = wm.recv_type("error")
    assert (error["code"], error["cid"]) == ("forbidden", "m1")
    wm.close()
    status, group = live_server.request("GET", f"/api/groups/{gid}", token=alice.token)
    assert group["members"] == sorted([alice.id, bob.id])


def test_secret_key_is_generated_once_and_kept_private(tmp_path):
    """Without SECRET_KEY a key is generated into the instance folder, 0600, and reused."""
    config = base_config(tmp_path)
    del config["SECRET_KEY"]
    instance = tmp_path / "instance"

    def make():
        return create_app(config, instance_path=str(instance))

    first = make()
    key = first.config["SECRET_KEY"]
    first.extensions["imserver"].shutdown()
    path = instance / "secret_key"
    assert path.read_text().strip() == key and len(key) >= 40
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    second = make()
    assert second.config["SECRET_KEY"] == key
    second.extensions["imserver"].shutdown()
