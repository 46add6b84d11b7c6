"""Unit tests of the terminal client: parsing, formatting, bookkeeping, the
name directory, and the interactive loop over a fake WebSocket and a fake API
(no network)."""

import datetime
import io
import json
import queue
import threading
import time

import pytest
import simple_websocket
from click.testing import CliRunner

from imserver import chat_client
from imserver.chat_client import ApiError
from imserver.chat_client import InboxTracker
from imserver.chat_client import ChatError
from imserver.chat_client import Target
from imserver.chat_client import UNKNOWN_NAME
from imserver.chat_client import UserDirectory
from imserver.chat_client import parse_command

UTC = datetime.timezone.utc
T = 5.0  # seconds: an upper bound for waits that finish at once when all is well


# ---------------------------------------------------------------------------
# parse_command
# ---------------------------------------------------------------------------


def test_to_with_id_sends_to_user():
    """`/to 7 hello there` sends the rest of the line to user 7."""
    assert parse_command("/to 7 hello  there\n", None) == (
        "send",
        {"target": Target("to", 7), "body": "hello  there"},
    )


def test_to_with_unknown_name_explains_ids():
    """A name the client was never told fails with the agreed message."""
    assert parse_command("/to alice hi", None) == ("error", {"message": UNKNOWN_NAME})


def test_to_with_known_name_resolves_it():
    """A name the client knows (its own, from /api/me) resolves to its id."""
    action, args = parse_command("/to alice hi", None, {"alice": 3})
    assert (action, args["target"]) == ("send", Target("to", 3))


def test_names_can_be_a_lookup():
    """A callable resolves names (the client passes UserDirectory.id_for)."""
    asked = []

    def lookup(name):
        asked.append(name)
        return {"bob": 7}[name]

    assert parse_command("/to bob hi", None, lookup) == (
        "send", {"target": Target("to", 7), "body": "hi"})
    assert parse_command("/to 9 hi", None, lookup)[1]["target"] == Target("to", 9)
    assert asked == ["bob"]   # digits are an id: nothing looked up


def test_at_sign_forces_a_name():
    """`@123` is the user named "123", not id 123."""
    action, args = parse_command("/to @123 hi", None, {"123": 5})
    assert (action, args["target"]) == ("send", Target("to", 5))


@pytest.mark.parametrize("error", [ValueError("not_found: no such user: bob"),
                                   ChatError("cannot reach http://s: refused")])
def test_failed_lookup_is_an_error_line(error):
    """An unknown name, or a server that cannot answer, sends nothing."""

    def lookup(name):
        raise error

    assert parse_command("/to bob hi", None, lookup) == ("error", {"message": str(error)})


def test_names_work_in_history_newgroup_and_online():
    """Every command that takes a user takes a username too."""
    names = {"bob": 7, "carol": 8}
    assert parse_command("/history bob", None, names) == ("history", {"with": 7})
    assert parse_command("/newgroup team bob,3 carol,bob", None, names) == (
        "newgroup", {"name": "team", "members": [7, 3, 8]})
    assert parse_command("/online carol 7", None, names) == ("online", {"ids": [8, 7]})


@pytest.mark.parametrize("line", ["/to 0 hi", "/to -3 hi", "/group x1 hi"])
def test_bad_ids_are_errors(line):
    """Zero, negative and non-numeric ids are refused before anything is sent."""
    action, args = parse_command(line, None)
    assert action == "error"
    assert "positive integers" in args["message"] or args["message"] == UNKNOWN_NAME


def test_to_without_arguments_shows_usage():
    """`/to` alone answers with its usage line."""
    assert parse_command("/to", None) == (
        "error",
        {"message": "usage: /to <username|id> <text>"},
    )


def test_to_without_text_selects_the_target():
    """`/to 7` alone changes the default target and sends nothing."""
    assert parse_command("/to 7", None) == ("select", {"target": Target("to", 7)})


@pytest.mark.parametrize("gid", ["3", "g3"])
def test_group_sends_to_group(gid):
    """`/group 3 hi` (or g3) sends to group 3."""
    assert parse_command(f"/group {gid} hi all", None) == (
        "send",
        {"target": Target("group", 3), "body": "hi all"},
    )


def test_plain_text_repeats_last_target():
    """A line without a slash goes to the last /to or /group target."""
    last = Target("group", 3)
    assert parse_command("  more text\n", last) == (
        "send",
        {"target": last, "body": "  more text"},
    )


def test_plain_text_without_target_is_an_error():
    """Plain text before any /to or /group says how to start a conversation."""
    action, args = parse_command("hello", None)
    assert action == "error"
    assert "/to <username|id>" in args["message"]


def test_double_slash_sends_a_leading_slash():
    """`//shrug` sends the text "/shrug" instead of running a command."""
    last = Target("to", 7)
    assert parse_command("//shrug", last) == (
        "send",
        {"target": last, "body": "/shrug"},
    )


@pytest.mark.parametrize("line", ["", "   ", "\n"])
def test_blank_line_is_noop(line):
    """An empty line does nothing."""
    assert parse_command(line, Target("to", 7)) == ("noop", {})


def test_history_with_user():
    """`/history 7` asks for the conversation with user 7."""
    assert parse_command("/history 7", None) == ("history", {"with": 7})


def test_history_of_group():
    """`/history g3` asks for group 3's history."""
    assert parse_command("/history g3", None) == ("history", {"group": 3})


def test_history_without_argument_shows_usage():
    """`/history` alone answers with its usage line."""
    assert parse_command("/history", None)[0] == "error"


def test_newgroup_parses_name_and_members():
    """`/newgroup` takes a name (quotable) and ids separated by commas or spaces."""
    assert parse_command('/newgroup "night owls" 2,3 4,3', None) == (
        "newgroup",
        {"name": "night owls", "members": [2, 3, 4]},
    )


def test_newgroup_with_bad_member_is_an_error():
    """A member that is not an id is refused."""
    assert parse_command("/newgroup team 2,bob", None)[0] == "error"


def test_online_parses_ids():
    """`/online 1,2` asks about users 1 and 2."""
    assert parse_command("/online 1,2", None) == ("online", {"ids": [1, 2]})


def test_online_without_ids_shows_usage():
    """`/online` alone answers with its usage line."""
    assert parse_command("/online", None) == (
        "error",
        {"message": "usage: /online <username|id,...>"},
    )


@pytest.mark.parametrize(
    "line, action",
    [("/help", "help"), ("/quit", "quit"), ("/exit", "quit"), ("/GROUPS", "groups")],
)
def test_simple_commands(line, action):
    """Argument-less commands map to their action, case-insensitively."""
    assert parse_command(line, None) == (action, {})


def test_unknown_command_points_to_help():
    """An unknown slash command is an error that mentions /help."""
    assert parse_command("/frobnicate", None) == (
        "error",
        {"message": "unknown command /frobnicate; type /help"},
    )


# ---------------------------------------------------------------------------
# Outgoing frames
# ---------------------------------------------------------------------------


def test_send_frame_uses_target_kind_as_key():
    """A send frame carries `to` or `group` according to the target."""
    assert chat_client.build_send_frame(Target("group", 3), "hi", "c1") == {
        "type": "send",
        "cid": "c1",
        "group": 3,
        "body": "hi",
    }


def test_new_cid_is_unique_and_within_limits():
    """Every cid differs and fits the contract's 1..64 characters."""
    cids = {chat_client.new_cid() for _ in range(1000)}
    assert len(cids) == 1000
    assert all(1 <= len(cid) <= 64 for cid in cids)


def test_ack_frame():
    """An ack names the highest seq shown."""
    assert chat_client.build_ack_frame(4) == {"type": "ack", "seq": 4}


# ---------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------


def test_direct_message_to_me():
    """A one-to-one message to this user reads `[time] 7 -> me: text`."""
    msg = {"id": 1, "from": 7, "to": 2, "body": "hello", "ts": 43_263_000}
    assert chat_client.format_message(msg, 2, UTC) == "[12:01:03] 7 -> me: hello"


def test_group_message():
    """A group message reads `[time] 7 -> group 3: text`."""
    msg = {"id": 1, "from": 7, "group": 3, "body": "hi", "ts": 0}
    assert chat_client.format_message(msg, 2, UTC) == "[00:00:00] 7 -> group 3: hi"


def test_own_message_in_history():
    """A message this user sent reads `me -> 7`."""
    msg = {"id": 1, "from": 2, "to": 7, "body": "yo", "ts": 0}
    assert chat_client.format_message(msg, 2, UTC) == "[00:00:00] me -> 7: yo"


NAMES = {2: "alice", 7: "bob"}.get


def test_message_lines_name_people():
    """With a name lookup, people are shown by username; unknown ids stay ids."""
    msg = {"id": 1, "from": 7, "to": 2, "body": "hello", "ts": 0}
    assert chat_client.format_message(msg, 2, UTC, NAMES) == "[00:00:00] bob -> me: hello"
    mine = {"id": 2, "from": 2, "to": 7, "body": "yo", "ts": 0}
    assert chat_client.format_message(mine, 2, UTC, NAMES) == "[00:00:00] me -> bob: yo"
    group = {"id": 3, "from": 7, "group": 3, "body": "hi", "ts": 0}
    assert chat_client.format_message(group, 2, UTC, NAMES) == (
        "[00:00:00] bob -> group 3: hi")
    stranger = {"id": 4, "from": 9, "to": 2, "body": "?", "ts": 0}
    assert chat_client.format_message(stranger, 2, UTC, NAMES) == "[00:00:00] 9 -> me: ?"


def test_names_are_sanitized():
    """A name is printed as safely as a body."""
    msg = {"from": 7, "to": 2, "body": "x", "ts": 0}
    line = chat_client.format_message(msg, 2, UTC, lambda uid: "b\x1b[2Job")
    assert line == "[00:00:00] b\\u001b[2Job -> me: x"


def test_targets_groups_and_presence_name_people():
    """Sent lines, group listings and presence use names too."""
    assert Target("to", 7).describe(NAMES) == "bob"
    assert Target("to", 9).describe(NAMES) == "9"
    assert Target("group", 7).describe(NAMES) == "group 7"
    assert chat_client.format_sent({"id": 5}, Target("to", 7), NAMES) == "  (sent #5 to bob)"
    group = {"id": 3, "name": "owls", "owner": 7, "members": [2, 7, 9]}
    assert chat_client.format_group(group, 2, NAMES) == (
        "#3 owls (owner bob): members me, bob, 9")
    assert chat_client.format_presence({"7": True, "9": False}, NAMES) == (
        "bob online, 9 offline")


def test_body_control_characters_are_escaped():
    """Terminal escapes in a body are shown, not obeyed; newlines are indented."""
    msg = {"from": 7, "to": 2, "body": "a\x1b[2Jb\nc\u202e", "ts": 0}
    assert chat_client.format_message(msg, 2, UTC) == (
        "[00:00:00] 7 -> me: a\\u001b[2Jb\n    c\\u202e"
    )


def test_missing_timestamp_shows_dashes():
    """A frame without a usable ts still formats."""
    assert chat_client.format_time(None) == "--:--:--"
    assert chat_client.format_time("soon") == "--:--:--"


def test_sent_is_brief():
    """A `sent` confirmation shows the id and, if known, the target."""
    frame = {"type": "sent", "cid": "c", "id": 42, "ts": 0}
    assert chat_client.format_frame(frame, 2) == "  (sent #42)"
    assert chat_client.format_frame(frame, 2, target=Target("to", 7)) == (
        "  (sent #42 to 7)"
    )


def test_error_shows_code_and_message():
    """An `error` frame shows its code, message and cid."""
    frame = {"type": "error", "code": "bad_json", "message": "not JSON", "cid": "c9"}
    assert chat_client.format_frame(frame, 2) == "! error bad_json: not JSON (cid c9)"


def test_error_for_our_message_names_the_target():
    """An `error` answering one of our sends says which conversation failed."""
    frame = {"type": "error", "code": "forbidden", "message": "not a member"}
    line = chat_client.format_frame(frame, 2, target=Target("group", 3))
    assert line == "! not sent to group 3: forbidden: not a member"


def test_pong_is_not_shown():
    """Heartbeat answers print nothing."""
    assert chat_client.format_frame({"type": "pong"}, 2) is None


def test_unknown_frame_type_is_shown():
    """A frame type the client does not know is reported, not dropped silently."""
    assert chat_client.format_frame({"type": "wat"}, 2) == "? unknown frame type 'wat'"


def test_group_line():
    """A group shows id, name, owner and members."""
    group = {"id": 3, "name": "owls", "owner": 2, "members": [1, 2, 5]}
    assert chat_client.format_group(group, 2) == "#3 owls (owner me): members 1, me, 5"


def test_presence_line():
    """Presence reads `1 online, 2 offline`."""
    assert chat_client.format_presence({"1": True, "2": False}) == (
        "1 online, 2 offline"
    )


def test_close_4001_is_replaced():
    """Close 4001 says the connection was replaced and is not a failure."""
    assert chat_client.describe_close(4001, "replaced") == (
        "replaced by another connection",
        chat_client.EXIT_REPLACED,
    )


@pytest.mark.parametrize("code", [1001, 1005, 1006, 1009, 1011, None])
def test_other_closes_fail(code):
    """Any other close exits non-zero with a reason."""
    text, status = chat_client.describe_close(code, "why")
    assert status != 0
    assert text


# ---------------------------------------------------------------------------
# InboxTracker
# ---------------------------------------------------------------------------


def test_tracker_acks_each_new_seq():
    """Each new message is shown and acked with its seq."""
    tracker = InboxTracker()
    assert tracker.accept({"id": 10, "seq": 1}) == (True, 1)
    assert tracker.accept({"id": 11, "seq": 2}) == (True, 2)


def test_tracker_drops_duplicate_ids_but_acks_them():
    """A replayed id is not shown again, yet its higher seq is still acked."""
    tracker = InboxTracker()
    tracker.accept({"id": 10, "seq": 1})
    assert tracker.accept({"id": 10, "seq": 2}) == (False, 2)


def test_tracker_never_acks_backwards():
    """A seq at or below the last ack sends no ack."""
    tracker = InboxTracker()
    tracker.accept({"id": 10, "seq": 5})
    assert tracker.accept({"id": 9, "seq": 4}) == (True, None)


def test_tracker_memory_is_bounded():
    """Only the newest `memory` ids are remembered."""
    tracker = InboxTracker(memory=2)
    for seq, mid in enumerate([1, 2, 3], start=1):
        tracker.accept({"id": mid, "seq": seq})
    assert tracker.accept({"id": 1, "seq": 4})[0] is True
    assert tracker.accept({"id": 3, "seq": 5})[0] is False


# ---------------------------------------------------------------------------
# URLs and HTTP errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "base, expected",
    [
        ("http://127.0.0.1:5000", "ws://127.0.0.1:5000/ws?token=a%2Bb"),
        ("https://chat.example/", "wss://chat.example/ws?token=a%2Bb"),
        ("https://example.org/im", "wss://example.org/im/ws?token=a%2Bb"),
        ("localhost:5000", "ws://localhost:5000/ws?token=a%2Bb"),
    ],
)
def test_ws_url(base, expected):
    """The WebSocket URL follows the base URL's scheme, host and path."""
    assert chat_client.ws_url(base, "a+b") == expected


def test_ws_url_rejects_other_schemes():
    """A non-HTTP base URL is a clear error."""
    with pytest.raises(chat_client.ChatError):
        chat_client.ws_url("ftp://host", "t")


def test_api_url_keeps_commas():
    """Presence ids stay readable as `ids=1,2`."""
    url = chat_client.api_url("http://h:1/", "/api/presence", {"ids": "1,2"})
    assert url == "http://h:1/api/presence?ids=1,2"


def test_error_envelope_is_parsed():
    """An error answer's envelope gives code and message."""
    raw = json.dumps({"error": {"code": "not_found", "message": "no user 9"}}).encode()
    error = chat_client.parse_error_body(404, raw)
    assert (error.status, error.code, error.message) == (404, "not_found", "no user 9")
    assert str(error) == "404 not_found: no user 9"


def test_error_without_envelope_still_reports():
    """A non-JSON error answer still yields the status and some text."""
    error = chat_client.parse_error_body(502, b"<html>Bad Gateway</html>", "Bad")
    assert (error.status, error.code) == (502, "http_502")
    assert "Bad Gateway" in error.message


# ---------------------------------------------------------------------------
# run_chat over fakes
# ---------------------------------------------------------------------------


class FakeWebSocket:
    """Stand in for simple_websocket.Client: scripted frames in, sent frames kept."""

    def __init__(self, answer_sends=True):
        self.answer_sends = answer_sends
        self.sent = []  # frames the client sent, decoded, in order
        self._incoming = queue.Queue()
        self._next_id = 100
        self.connected = True
        self.close_code = 1005

    def push(self, item):
        """Queue a frame (dict) or a ConnectionClosed for the client to receive."""
        self._incoming.put(json.dumps(item) if isinstance(item, dict) else item)

    def send(self, text):
        if not self.connected:
            raise simple_websocket.ConnectionClosed(self.close_code, None)
        frame = json.loads(text)
        self.sent.append(frame)
        if self.answer_sends and frame["type"] == "send":
            self._next_id += 1
            answer = {"type": "sent", "cid": frame["cid"], "id": self._next_id}
            self.push(dict(answer, ts=0))

    def receive(self, timeout=None):
        try:
            item = self._incoming.get(timeout=timeout)
        except queue.Empty:
            if not self.connected:
                raise simple_websocket.ConnectionClosed(self.close_code, None) from None
            return None
        if isinstance(item, simple_websocket.ConnectionClosed):
            self.connected = False
            self.close_code = item.reason
            raise item
        return item

    def close(self, reason=None, message=None):
        if not self.connected:
            raise simple_websocket.ConnectionClosed(self.close_code, None)
        self.connected = False


class FakeApi:
    """Stand in for chat_client.Api: canned answers keyed by (method, path),
    and the user lookups (GET /api/users/<id>, GET /api/users?username=)
    answered from `users` (id -> name) as the server does, 404 for nobody."""

    def __init__(self, answers=None, users=None):
        self.answers = {("GET", "/api/me"): {"id": 2, "username": "alice"}}
        self.answers.update(answers or {})
        self.users = {2: "alice", 7: "bob"} if users is None else users
        self.calls = []

    def call(self, method, path, body=None, query=None):
        self.calls.append((method, path, body, query))
        if (method, path) in self.answers:
            answer = self.answers[(method, path)]
        elif (method, path) == ("GET", "/api/users"):
            wanted = (query or {}).get("username")
            found = [uid for uid, name in self.users.items() if name == wanted]
            answer = ({"id": found[0], "username": wanted} if found
                      else ApiError(404, "not_found", "no such user"))
        elif method == "GET" and path.startswith("/api/users/"):
            uid = int(path.rsplit("/", 1)[1])
            answer = ({"id": uid, "username": self.users[uid]} if uid in self.users
                      else ApiError(404, "not_found", f"no user {uid}"))
        else:
            raise AssertionError(f"unexpected call {method} {path}")
        if isinstance(answer, Exception):
            raise answer
        return answer

    def lookups(self):
        """The user lookups made so far, as ("id", 7) or ("name", "bob")."""
        found = []
        for method, path, _, query in self.calls:
            if (method, path) == ("GET", "/api/users"):
                found.append(("name", query["username"]))
            elif method == "GET" and path.startswith("/api/users/"):
                found.append(("id", int(path.rsplit("/", 1)[1])))
        return found


# ---------------------------------------------------------------------------
# UserDirectory
# ---------------------------------------------------------------------------


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_directory_names_an_id_once():
    """An id is looked up once; later calls use the cache."""
    api = FakeApi()
    names = UserDirectory(api)
    assert names.name_for(7) == "bob"
    assert names.name_for(7) == "bob"
    assert api.lookups() == [("id", 7)]
    assert names.known_name(7) == "bob"


def test_directory_gives_up_on_unknown_ids():
    """A 404 leaves the id unnamed and is not asked again."""
    api = FakeApi()
    names = UserDirectory(api)
    assert names.name_for(9) is None
    assert names.name_for(9) is None
    assert api.lookups() == [("id", 9)]


@pytest.mark.parametrize("failure", [ApiError(503, "unavailable", "database down"),
                                     ChatError("cannot reach http://s"),
                                     {"id": 8, "username": "someone else"}])
def test_directory_retries_other_failures_later(failure):
    """A server error, no server, or a wrong answer: the id stays unnamed,
    and is asked again only after `retry_after` seconds."""
    api = FakeApi({("GET", "/api/users/7"): failure})
    clock = FakeClock()
    names = UserDirectory(api, retry_after=30, clock=clock)
    assert names.name_for(7) is None
    clock.now += 29
    assert names.name_for(7) is None
    assert api.lookups() == [("id", 7)]
    clock.now += 2
    del api.answers[("GET", "/api/users/7")]
    assert names.name_for(7) == "bob"
    assert api.lookups() == [("id", 7), ("id", 7)]


def test_directory_never_raises_from_name_for():
    """Whatever goes wrong, naming a sender does not raise (it runs in the
    reader thread)."""

    class Broken:
        def call(self, *args, **kwargs):
            raise RuntimeError("boom")

    assert UserDirectory(Broken()).name_for(7) is None
    assert UserDirectory(Broken()).name_for("7") is None   # not an id: not asked


def test_directory_resolves_a_name_once_and_learns_both_ways():
    """A typed name is looked up once; its id's name is then known too."""
    api = FakeApi()
    names = UserDirectory(api)
    assert names.id_for("bob") == 7
    assert names.id_for("bob") == 7
    assert names.name_for(7) == "bob"
    assert api.lookups() == [("name", "bob")]


def test_directory_reports_unknown_and_malformed_names():
    """An unknown name is a ValueError with the server's error; a malformed
    one is refused without asking; other failures are ChatErrors."""
    api = FakeApi()
    names = UserDirectory(api)
    with pytest.raises(ValueError, match="^not_found: no such user: bobb$"):
        names.id_for("bobb")
    with pytest.raises(ValueError, match="not a user id or username"):
        names.id_for("bob smith")
    assert api.lookups() == [("name", "bobb")]
    api.answers[("GET", "/api/users")] = ApiError(503, "unavailable", "database down")
    with pytest.raises(ChatError, match="503 unavailable"):
        names.id_for("carol")


def test_directory_remembers_what_it_is_told():
    """remember() (our own name, from /api/me) answers both ways with no call."""
    api = FakeApi()
    names = UserDirectory(api)
    names.remember(2, "alice")
    assert (names.id_for("alice"), names.name_for(2)) == (2, "alice")
    assert api.lookups() == []


class BlockedStdin:
    """An input that stays silent until released, like an idle user."""

    def __init__(self):
        self.released = threading.Event()

    def readline(self):
        self.released.wait(T)
        return ""


def _run(ws, api, stdin, **kwargs):
    """Run the client on the fakes and return (exit status, output lines)."""
    out = io.StringIO()
    status = chat_client.run_chat(
        "http://server.test",
        "tok",
        stdin,
        out,
        connect=lambda url: ws,
        api=api,
        tz=UTC,
        ready_timeout=T,
        drain_timeout=T,
        ping_interval=0,
    )
    return status, out.getvalue().splitlines()


def test_run_chat_prints_acks_and_sends():
    """Incoming messages print once and are acked; sends get distinct cids."""
    ws = FakeWebSocket()
    ws.push({"type": "ready", "user_id": 2})
    ws.push({"type": "message", "seq": 1, "id": 10, "from": 7, "to": 2,
             "body": "hello", "ts": 0, "cid": "x"})
    ws.push({"type": "message", "seq": 2, "id": 10, "from": 7, "to": 2,
             "body": "hello", "ts": 0, "cid": "x"})
    ws.push({"type": "message", "seq": 3, "id": 11, "from": 7, "group": 3,
             "body": "hi", "ts": 0, "cid": None})
    stdin = io.StringIO("/to 7 hi back\nand more\n/quit\n")

    api = FakeApi()
    status, lines = _run(ws, api, stdin)

    assert status == 0
    assert lines == [
        "connected as alice, user 2; type /help for commands",
        "[00:00:00] bob -> me: hello",
        "[00:00:00] bob -> group 3: hi",
        "  (sent #101 to bob)",
        "  (sent #102 to bob)",
        "bye",
    ]
    assert api.lookups() == [("id", 7)]   # once, lazily, for the first message
    acks = [f["seq"] for f in ws.sent if f["type"] == "ack"]
    assert acks == [1, 2, 3]
    sends = [f for f in ws.sent if f["type"] == "send"]
    assert [(f["to"], f["body"]) for f in sends] == [(7, "hi back"), (7, "and more")]
    assert sends[0]["cid"] != sends[1]["cid"]
    assert not ws.connected


def test_run_chat_reports_refused_send():
    """An error frame for one of our sends names its target and does not hang quit."""
    ws = FakeWebSocket(answer_sends=False)
    ws.push({"type": "ready", "user_id": 2})

    original_send = ws.send

    def send(text):
        original_send(text)
        frame = json.loads(text)
        if frame["type"] == "send":
            ws.push({"type": "error", "code": "not_found", "message": "no such user",
                     "cid": frame["cid"]})

    ws.send = send
    status, lines = _run(ws, FakeApi(), io.StringIO("/to 9 hi\n"))

    assert status == 0
    assert lines[1:] == ["! not sent to 9: not_found: no such user", "bye"]


def test_run_chat_talks_to_people_by_name():
    """`/to bob ...` looks bob up once, sends to his id and names him in the
    lines; an unknown name sends nothing; senders are named lazily (once
    each), one whose name cannot be found is shown by id; /history takes a
    name."""
    ws = FakeWebSocket()
    ws.push({"type": "ready", "user_id": 2})
    stdin = QueuedStdin()
    out = io.StringIO()
    api = FakeApi({
        ("GET", "/api/messages"): {
            "messages": [{"id": 50, "from": 8, "to": 2, "body": "hi alice", "ts": 0},
                         {"id": 53, "from": 2, "to": 8, "body": "hi carol", "ts": 0}],
            "has_more": False,
        },
    }, users={2: "alice", 7: "bob", 8: "carol"})
    result = {}

    def run():
        result["status"] = chat_client.run_chat(
            "http://s", "t", stdin, out, connect=lambda url: ws, api=api, tz=UTC,
            ready_timeout=T, drain_timeout=T, ping_interval=0)

    def step(line, expect_last):
        """Type `line`, wait until the output ends with `expect_last`."""
        stdin.lines.put(line)
        assert wait_until(lambda: out.getvalue().endswith(expect_last + "\n")), (
            line, out.getvalue())

    runner = threading.Thread(target=run)
    runner.start()
    try:
        assert wait_until(lambda: "connected as" in out.getvalue())
        step("/to bob hi bob\n", "  (sent #101 to bob)")
        step("/to nobody hi\n", "! not_found: no such user: nobody")
        step("/to @bob\n", "now talking to bob")
        step("again\n", "  (sent #102 to bob)")
        for seq, (mid, sender, body) in enumerate(
                [(50, 8, "hi alice"), (51, 9, "who am i"), (52, 8, "still me")], start=1):
            ws.push({"type": "message", "seq": seq, "id": mid, "from": sender, "to": 2,
                     "body": body, "ts": 0})
        assert wait_until(lambda: {"type": "ack", "seq": 3} in ws.sent)
        step("/history carol\n", "--")
    finally:
        stdin.lines.put("")
        runner.join(T)

    assert result["status"] == 0
    assert out.getvalue().splitlines() == [
        "connected as alice, user 2; type /help for commands",
        "  (sent #101 to bob)",
        "! not_found: no such user: nobody",
        "now talking to bob",
        "  (sent #102 to bob)",
        "[00:00:00] carol -> me: hi alice",
        "[00:00:00] 9 -> me: who am i",
        "[00:00:00] carol -> me: still me",
        "-- history with carol",
        "[00:00:00] carol -> me: hi alice",
        "[00:00:00] me -> carol: hi carol",
        "--",
        "bye",
    ]
    sends = [(f["to"], f["body"]) for f in ws.sent if f["type"] == "send"]
    assert sends == [(7, "hi bob"), (7, "again")]
    # Each name or id asked once; our own name came with /api/me.
    assert api.lookups() == [("name", "bob"), ("name", "nobody"), ("id", 8), ("id", 9)]
    assert ("GET", "/api/messages", None, {"with": 8, "limit": 20}) in api.calls


def test_run_chat_exits_on_replaced():
    """Close 4001 prints the replaced notice and ends the session."""
    ws = FakeWebSocket()
    ws.push({"type": "ready", "user_id": 2})
    ws.push(simple_websocket.ConnectionClosed(4001, "replaced"))
    stdin = BlockedStdin()
    try:
        status, lines = _run(ws, FakeApi(), stdin)
    finally:
        stdin.released.set()

    assert status == chat_client.EXIT_REPLACED
    assert lines[-1] == "replaced by another connection"


def test_run_chat_fails_on_drop():
    """Any other close prints the reason and exits non-zero."""
    ws = FakeWebSocket()
    ws.push({"type": "ready", "user_id": 2})
    ws.push(simple_websocket.ConnectionClosed(1001, "shutdown"))
    stdin = BlockedStdin()
    try:
        status, lines = _run(ws, FakeApi(), stdin)
    finally:
        stdin.released.set()

    assert status == chat_client.EXIT_FAILURE
    assert lines[-1] == "! server is going away (shutdown)"


def test_run_chat_stops_on_rejected_token():
    """A 401 from /api/me ends before any WebSocket is opened."""
    api = FakeApi({("GET", "/api/me"): ApiError(401, "unauthorized", "bad token")})

    def connect(url):
        raise AssertionError("must not connect")

    out = io.StringIO()
    status = chat_client.run_chat("http://s", "t", io.StringIO(""), out,
                                  connect=connect, api=api)
    assert status == chat_client.EXIT_FAILURE
    assert out.getvalue() == "! cannot start: 401 unauthorized: bad token\n"


def test_run_chat_history_groups_and_presence():
    """HTTP commands hit the contract's endpoints and print their answers."""
    ws = FakeWebSocket()
    ws.push({"type": "ready", "user_id": 2})
    api = FakeApi({
        ("GET", "/api/messages"): {
            "messages": [{"id": 5, "from": 2, "to": 7, "body": "old", "ts": 0}],
            "has_more": False,
        },
        ("GET", "/api/groups"): {"groups": [
            {"id": 3, "name": "owls", "owner": 2, "members": [2, 7]}
        ]},
        ("POST", "/api/groups"): ApiError(404, "not_found", "no user 99"),
        ("GET", "/api/presence"): {"online": {"7": True}},
    })
    stdin = io.StringIO("/history 7\n/history g3\n/groups\n/newgroup x 99\n"
                        "/online 7\n/bogus\n")

    status, lines = _run(ws, api, stdin)

    assert status == 0
    assert lines[1:] == [
        "-- history with bob",
        "[00:00:00] me -> bob: old",
        "--",
        "-- history of group 3",
        "[00:00:00] me -> bob: old",
        "--",
        "#3 owls (owner me): members me, bob",
        "! 404 not_found: no user 99",
        "bob online",
        "! unknown command /bogus; type /help",
        "bye",
    ]
    assert api.calls[1:] == [
        ("GET", "/api/users/7", None, None),   # bob's name, once, for the title
        ("GET", "/api/messages", None, {"with": 7, "limit": 20}),
        ("GET", "/api/messages", None, {"group": 3, "limit": 20}),
        ("GET", "/api/groups", None, None),
        ("POST", "/api/groups", {"name": "x", "members": [99]}, None),
        ("GET", "/api/presence", None, {"ids": "7"}),
    ]


class QueuedStdin:
    """An input the test types into line by line; "" ends it."""

    def __init__(self):
        self.lines = queue.Queue()

    def readline(self):
        try:
            return self.lines.get(timeout=T)
        except queue.Empty:
            return ""


def wait_until(predicate, timeout=T):
    """Poll `predicate` until it is true or the deadline passes; return its value."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_run_chat_pings_when_idle():
    """An idle client sends `ping` frames, so the server's idle timeout spares it."""
    ws = FakeWebSocket()
    ws.push({"type": "ready", "user_id": 2})
    stdin = QueuedStdin()
    out = io.StringIO()
    result = {}

    def run():
        result["status"] = chat_client.run_chat(
            "http://s", "t", stdin, out, connect=lambda url: ws, api=FakeApi(),
            ping_interval=0.05,
        )

    runner = threading.Thread(target=run)
    runner.start()
    try:
        assert wait_until(lambda: {"type": "ping"} in ws.sent)
    finally:
        stdin.lines.put("/quit\n")
        runner.join(T)
    assert result["status"] == 0


def test_run_chat_reports_refused_websocket():
    """A refused WebSocket handshake is reported with its HTTP status."""

    def connect(url):
        assert url == "ws://s/ws?token=t"
        raise simple_websocket.ConnectionError(401)

    out = io.StringIO()
    status = chat_client.run_chat("http://s", "t", io.StringIO(""), out,
                                  connect=connect, api=FakeApi())
    assert status == chat_client.EXIT_FAILURE
    assert out.getvalue() == "! WebSocket refused (HTTP 401)\n"


# ---------------------------------------------------------------------------
# The click command
# ---------------------------------------------------------------------------


def test_command_needs_user_or_token(monkeypatch):
    """Without --user or a token the command is a usage error."""
    monkeypatch.delenv("IMSERVER_TOKEN", raising=False)
    result = CliRunner().invoke(chat_client.chat_command, [])
    assert result.exit_code == 2
    assert "--user" in result.output


def test_command_logs_in_with_prompted_password(monkeypatch):
    """--user prompts for the password, logs in, and runs the chat with the token."""
    monkeypatch.delenv("IMSERVER_TOKEN", raising=False)
    seen = {}

    def fake_login(url, username, password):
        seen["login"] = (url, username, password)
        return {"token": "tk", "user_id": 2, "expires_at": 0}

    def fake_run_chat(url, token, stdin, stdout):
        seen["run"] = (url, token)
        return 0

    monkeypatch.setattr(chat_client, "login", fake_login)
    monkeypatch.setattr(chat_client, "run_chat", fake_run_chat)
    result = CliRunner().invoke(
        chat_client.chat_command, ["--url", "http://h:1", "--user", "alice"],
        input="s3cret-pw\n",
    )
    assert result.exit_code == 0, result.output
    assert "s3cret-pw" not in result.output
    assert seen == {"login": ("http://h:1", "alice", "s3cret-pw"),
                    "run": ("http://h:1", "tk")}


def test_command_uses_token_from_env(monkeypatch):
    """IMSERVER_TOKEN skips the login, and a failing session exits non-zero."""
    monkeypatch.setenv("IMSERVER_TOKEN", "envtok")
    seen = {}

    def fake_run_chat(url, token, stdin, stdout):
        seen["token"] = token
        return 1

    monkeypatch.setattr(chat_client, "run_chat", fake_run_chat)
    result = CliRunner().invoke(chat_client.chat_command, ["--user", "alice"])
    assert result.exit_code == 1
    assert seen == {"token": "envtok"}
