"""Hostile input: generated frames, bodies, queries and tokens at a live server.

Property-based (hypothesis). Each test function gets one app (and, for the
WebSocket ones, one live server) that all its examples share, so the
properties are checked against a server that keeps running through hundreds
of hostile inputs:

- every WebSocket frame is answered by exactly one ``error`` frame with a
  contract code (or ``sent`` / ``pong`` / nothing when it happens to be valid),
  the ``cid`` is echoed only when the frame had a valid one, the connection
  stays open, and nothing is stored that should not be;
- protocol-level abuse (bad UTF-8 across fragments, oversized control frames,
  unmasked frames, reserved opcodes and bits, bad close codes, oversized
  frames) closes the connection, and the handler, its place and its threads
  are released;
- every HTTP endpoint answers generated bodies, content types, paths and
  queries with JSON in the error envelope and a contract status, never 500
  and never HTML;
- garbage tokens, in the header or in ``?token=``, always get 401
  ``unauthorized``, on ``/api/me`` and on the ``/ws`` handshake.
"""

import json
import logging
import os
import socket
import threading
import time
import urllib.parse
import uuid
from collections import Counter
from dataclasses import dataclass
from dataclasses import field

import pytest
from conftest import T
from conftest import RawClient
from conftest import wait_until
from hypothesis import HealthCheck
from hypothesis import assume
from hypothesis import example
from hypothesis import given
from hypothesis import note
from hypothesis import settings
from hypothesis import strategies as st

# Ids are positive integers that fit a signed 64-bit column.
MAX_ID = 2**63 - 1
MAX_BODY_CHARS = 4000
SOCKET_CODES = {"bad_json", "bad_frame", "unknown_type", "not_found", "forbidden",
                "body_too_long", "rate_limited", "internal"}
# What each HTTP error status may carry as its code.
HTTP_CODES = {
    400: {"invalid", "group_full", "bad_json", "bad_frame", "unknown_type",
          "body_too_long"},
    401: {"unauthorized", "bad_credentials"},
    403: {"forbidden"},
    404: {"not_found"},
    409: {"conflict", "username_taken"},
    413: {"too_large"},
    429: {"rate_limited"},
}
SUCCESS = {200, 201, 204}

HYPOTHESIS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                         HealthCheck.too_slow,
                                                         HealthCheck.data_too_large])


def _errors_logged(caplog):
    """Return the ERROR records logged so far (a handler crash, a 500)."""
    return [r for r in caplog.records if r.levelno >= logging.ERROR]


# -- JSON with literals Python cannot round-trip ------------------------------


@dataclass(frozen=True)
class Raw:
    """A JSON literal spliced verbatim into a frame.

    ``value`` is what the literal means (for the model); ``may_refuse`` marks
    literals a server may reasonably refuse as ``bad_json`` although they are
    valid JSON (integers of thousands of digits, absurd nesting).
    """

    text: str
    value: object
    may_refuse: bool = False

    def __repr__(self):
        text = self.text if len(self.text) < 40 else self.text[:20] + "..." + self.text[-10:]
        return f"Raw({text!r}, len={len(self.text)})"


def encode(obj) -> str:
    """Encode ``obj`` as JSON text (ASCII only), splicing ``Raw`` literals."""
    if isinstance(obj, Raw):
        return obj.text
    if isinstance(obj, dict):
        return "{" + ",".join(json.dumps(k) + ":" + encode(v) for k, v in obj.items()) + "}"
    if isinstance(obj, list):
        return "[" + ",".join(encode(v) for v in obj) + "]"
    return json.dumps(obj, allow_nan=False)


def value(obj):
    """Return what the server sees for ``obj`` (``Raw`` literals decoded)."""
    return obj.value if isinstance(obj, Raw) else obj


def _walk(obj):
    """Yield ``(node, depth)`` for every node, without recursion (deep input)."""
    stack = [(obj, 0)]
    while stack:
        node, level = stack.pop()
        yield node, level
        if isinstance(node, dict):
            stack.extend((v, level + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, level + 1) for v in node)


def may_refuse(obj) -> bool:
    """Tell whether ``obj`` holds a literal that may be refused as bad_json."""
    return any(isinstance(node, Raw) and node.may_refuse for node, _ in _walk(obj))


def depth(obj) -> int:
    """Return the nesting depth of a parsed JSON value."""
    return max(level for _, level in _walk(obj))


def is_text(s) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# -- strategies: values -------------------------------------------------------

surrogates = st.characters(categories=["Cs"])

texts = st.one_of(
    st.text(max_size=12),
    st.just(""),
    # Lone surrogates, escaped in JSON as "\ud800": not valid Unicode text.
    st.builds(lambda a, s, b: a + s + b, st.text(max_size=4), surrogates,
              st.text(max_size=4)),
    # Around the limits: cid (64), body (MAX_BODY_CHARS), and far past them.
    st.builds(lambda c, n: c * n, st.characters(max_codepoint=0xFFFF),
              st.sampled_from([63, 64, 65, 1000, MAX_BODY_CHARS - 1, MAX_BODY_CHARS,
                               MAX_BODY_CHARS + 1, 20000])),
    st.builds(lambda n: "\U0001F600" * n, st.sampled_from([64, 65, MAX_BODY_CHARS,
                                                           MAX_BODY_CHARS + 1])),
)

ints = st.one_of(
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, 2, 3, 4, -1, MAX_ID, MAX_ID + 1, 2**64, 2**64 + 1, -(2**63),
                     -(2**63) - 1, 10**30, -(10**30)]),
)

HUGE_DIGITS = 5000  # past Python's default int_max_str_digits (4300)

raw_numbers = st.sampled_from([
    Raw("-0", 0),
    Raw("-0.0", -0.0),
    Raw("0.0", 0.0),
    Raw("1.0", 1.0),
    Raw("2.0", 2.0),
    Raw("1e308", 1e308),
    Raw("-1e308", -1e308),
    Raw("1e400", float("inf")),
    Raw("-1e400", float("-inf")),
    Raw("1E2", 100.0),
    Raw("5e-324", 5e-324),
    Raw("1e-400", 0.0),
    Raw("9223372036854775807", MAX_ID),
    Raw("9223372036854775808", MAX_ID + 1),
    Raw("18446744073709551617", 2**64 + 1),
    Raw("1" + "0" * 400, 10**400),
    Raw("1" + "0" * HUGE_DIGITS, 10**HUGE_DIGITS, may_refuse=True),
    Raw("-" + "9" * HUGE_DIGITS, -(10**HUGE_DIGITS), may_refuse=True),
])


@st.composite
def deep_json(draw):
    """Nested arrays or objects, 1 to 100000 levels deep."""
    n = draw(st.one_of(st.integers(1, 100000),
                       st.sampled_from([1, 2, 50, 99, 100, 101, 500, 999, 1000, 1001,
                                        5000, 10000, 100000])))
    if draw(st.booleans()):
        text, meaning = "[" * n + "]" * n, []
    else:
        text, meaning = '{"a":' * n + "1" + "}" * n, {}
    # Python's own parser gives up past ~1000 levels; refusing absurd nesting
    # as bad_json is fair, so past 100 levels either answer is accepted.
    return Raw(text, meaning, may_refuse=n > 100)


plain_json = st.recursive(
    st.one_of(st.none(), st.booleans(), ints, st.floats(allow_nan=False, allow_infinity=False),
              st.text(max_size=5)),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c, max_size=3),
    max_leaves=4)
scalars = st.one_of(st.none(), st.booleans(), ints,
                    st.floats(allow_nan=False, allow_infinity=False), texts, raw_numbers)
keys = st.one_of(st.text(max_size=8),
                 st.builds(lambda a, s: a + s, st.text(max_size=3), surrogates))
json_values = st.one_of(
    st.recursive(scalars, lambda c: st.lists(c, max_size=3)
                 | st.dictionaries(keys, c, max_size=3), max_leaves=6),
    deep_json(),
)

INVALID_UTF8 = [b"\xff", b"\xfe", b"\x80", b"\xbf", b"\xc0\xaf", b"\xc1\xbf", b"\xc3\x28",
                b"\xe2\x82\x28", b"\xe0\x80\xaf", b"\xed\xa0\x80", b"\xed\xbf\xbf",
                b"\xf4\x90\x80\x80", b"\xf5\x80\x80\x80", b"\xf8\x88\x80\x80\x80",
                b"\xe2\x82", b"\xf0\x9f\x98"]


@st.composite
def invalid_utf8(draw):
    """Bytes that are not UTF-8: a bad sequence somewhere in ASCII."""
    before = draw(st.binary(max_size=16).map(lambda b: bytes(x & 0x7F for x in b)))
    after = draw(st.binary(max_size=16).map(lambda b: bytes(x & 0x7F for x in b)))
    return before + draw(st.sampled_from(INVALID_UTF8)) + after


# -- the model of a WebSocket frame --------------------------------------------


@dataclass
class World:
    """The users and groups of the frame test, from the sender's point of view."""

    me: int
    users: set
    groups: dict  # gid -> set of member ids


@dataclass
class Expect:
    """The answers a frame may get; exactly one of them must arrive."""

    codes: set = field(default_factory=set)  # acceptable error codes
    cid: str | None = None  # cid an error must echo (None: no cid key)
    send: tuple | None = None  # (cid, recipients) when `sent` is acceptable
    pong: bool = False
    silent: bool = False


def classify(obj, world: World) -> Expect:
    """Say how the contract answers a (parsed) frame ``obj``."""
    expect = _classify(obj, world)
    if may_refuse(obj):
        expect.codes.add("bad_json")
    return expect


def _classify(obj, world: World) -> Expect:
    obj = value(obj)
    if not isinstance(obj, dict):
        # Valid JSON but not an object: "bad_json" (not an object) or
        # "bad_frame" (no type) are both fair.
        return Expect(codes={"bad_json", "bad_frame"})
    cid = value(obj.get("cid"))
    good_cid = isinstance(cid, str) and 1 <= len(cid) <= 64 and is_text(cid)
    echo = cid if good_cid else None
    kind = value(obj.get("type"))
    if not isinstance(kind, str):
        return Expect(codes={"bad_frame"}, cid=echo)
    if kind == "ping":
        return Expect(pong=True, cid=echo)
    if kind == "ack":
        seq = value(obj.get("seq"))
        if type(seq) is not int or seq < 0:
            return Expect(codes={"bad_frame"}, cid=echo)
        if seq == 0:
            return Expect(silent=True, cid=echo)
        # Nothing was ever delivered to the sender: an ack past it may be
        # refused or ignored.
        return Expect(silent=True, codes={"bad_frame"}, cid=echo)
    if kind != "send":
        return Expect(codes={"unknown_type"}, cid=echo)
    codes = set()
    if not good_cid:
        codes.add("bad_frame")
    # null counts as absent, as in most JSON APIs.
    to, group = value(obj.get("to")), value(obj.get("group"))
    recipients = set()
    if (to is None) == (group is None):
        codes.add("bad_frame")
    else:
        target = to if to is not None else group
        if type(target) is not int or target < 1:
            codes.add("bad_frame")
        elif target > MAX_ID:
            codes |= {"bad_frame", "not_found"}
        elif to is not None:
            if to == world.me:
                codes.add("bad_frame")
            elif to not in world.users:
                codes.add("not_found")
            recipients = {to}
        elif group not in world.groups:
            codes.add("not_found")
        elif world.me not in world.groups[group]:
            codes.add("forbidden")
        else:
            recipients = world.groups[group] - {world.me}
    body = value(obj.get("body"))
    if not isinstance(body, str) or not body:
        codes.add("bad_frame")
    else:
        if len(body) > MAX_BODY_CHARS:
            codes.add("body_too_long")
        if not is_text(body):
            codes.add("bad_frame")
    if codes:
        return Expect(codes=codes, cid=echo)
    return Expect(send=(cid, frozenset(recipients)))


def classify_text(text: str, world: World) -> Expect:
    """Say how the contract answers a text frame given as raw text."""

    def no_constants(name):
        raise ValueError(f"{name} is not JSON")

    try:
        obj = json.loads(text, parse_constant=no_constants)
    except (ValueError, RecursionError):
        try:
            lenient = json.loads(text)  # NaN / Infinity: not JSON, may pass
        except (ValueError, RecursionError):
            return Expect(codes={"bad_json"})
        expect = classify(lenient, world)
        expect.codes.add("bad_json")
        return expect
    expect = classify(obj, world)
    if depth(obj) > 100:
        expect.codes.add("bad_json")
    return expect


# -- strategies: frames ---------------------------------------------------------

FRAME_FIELDS = ("type", "cid", "to", "group", "body", "seq")


def good_values(world_ids):
    """Valid values for each field of a frame."""
    a, b, c, g1, g2, g3 = world_ids
    return {
        "type": st.sampled_from(["send", "ack", "ping"]),
        "cid": st.one_of(st.uuids().map(str), st.text(min_size=1, max_size=64)),
        "to": st.sampled_from([b, c, a, 999_999]),
        "group": st.sampled_from([g1, g2, g3, 999_999]),
        "body": st.one_of(st.text(min_size=1, max_size=30), st.text(min_size=1, max_size=30),
                          st.builds(lambda ch, n: ch * n, st.characters(),
                                    st.sampled_from([MAX_BODY_CHARS, MAX_BODY_CHARS + 1]))),
        "seq": st.sampled_from([0, 1, 2]),
    }


def any_value(name, good):
    """A value for field ``name``: valid, of any type, null, or hostile text."""
    extra = {"type": st.sampled_from(["SEND", "send ", "Ping", "", "message", "sent",
                                      "error", "pong", "ready", "send\x00"])}
    return st.one_of(good[name], good[name], json_values, st.none(),
                     extra.get(name, texts))


@st.composite
def structured_frames(draw, world_ids):
    """A frame as an object: valid ones, then fields dropped, nulled, mistyped."""
    good = good_values(world_ids)
    kind = draw(st.sampled_from(["send_to", "send_group", "ack", "ping"]))
    if kind == "send_to":
        frame = {"type": "send", "cid": draw(good["cid"]), "to": draw(good["to"]),
                 "body": draw(good["body"])}
    elif kind == "send_group":
        frame = {"type": "send", "cid": draw(good["cid"]), "group": draw(good["group"]),
                 "body": draw(good["body"])}
    elif kind == "ack":
        frame = {"type": "ack", "seq": draw(good["seq"])}
    else:
        frame = {"type": "ping"}
    mode = draw(st.sampled_from(["as_is", "as_is", "drop_one", "null_one", "null_all",
                                 "mutate", "mutate"]))
    if mode == "drop_one":
        # Every required field missing in turn.
        del frame[draw(st.sampled_from(sorted(frame)))]
    elif mode == "null_one":
        frame[draw(st.sampled_from(FRAME_FIELDS))] = None
    elif mode == "null_all":
        frame = {k: None for k in draw(st.sets(st.sampled_from(FRAME_FIELDS), min_size=1))}
    elif mode == "mutate":
        for name in draw(st.sets(st.sampled_from(FRAME_FIELDS), min_size=1, max_size=2)):
            frame[name] = draw(any_value(name, good))
    # Unknown fields are ignored.
    extras = draw(st.dictionaries(keys.filter(lambda k: k not in FRAME_FIELDS),
                                  json_values, max_size=2))
    frame.update(extras)
    order = draw(st.permutations(list(frame)))
    return {k: frame[k] for k in order}


@st.composite
def hostile_frames(draw, world_ids):
    """``("text", obj_or_text)`` or ``("binary", bytes)``: one frame to send."""
    how = draw(st.sampled_from(["object"] * 6 + ["text", "truncated",
                                "trailing", "not_object", "deep", "binary"]))
    if how == "object":
        return "object", draw(structured_frames(world_ids))
    if how == "text":
        return "text", draw(st.text())
    if how == "truncated":
        text = encode(draw(structured_frames(world_ids)))
        return "text", text[:draw(st.integers(0, max(0, len(text) - 1)))]
    if how == "trailing":
        text = encode(draw(structured_frames(world_ids)))
        return "text", text + draw(st.sampled_from([" ", "\n", "x", "}", ",", "{}", "\x00",
                                                   " // c", "\ufeff"]))
    if how == "not_object":
        return "object", draw(json_values)
    if how == "deep":
        return "object", draw(deep_json())
    payload = draw(st.one_of(
        st.binary(max_size=64), invalid_utf8(),
        structured_frames(world_ids).map(lambda f: encode(f).encode())))
    return "binary", payload


# -- test 1: generated frames at a live socket -----------------------------------


class Conversation:
    """The sender's connection, opened again only if a previous example broke it."""

    def __init__(self, user):
        self.user = user
        self.client = None
        self.markers = 0

    def ws(self):
        if self.client is None:
            # No keepalive pings: websockets draws their payload from the global
            # `random`, which hypothesis forbids while it generates an example.
            self.client = self.user.connect(ping_interval=None)
        return self.client.ws

    def drop(self):
        if self.client is not None:
            self.client.close()
        self.client = None

    def marker(self):
        """Send a frame whose answer names it: an error with a fresh cid."""
        self.markers += 1
        cid = f"marker-{self.markers}"
        self.ws().send(json.dumps({"type": "marker", "cid": cid}))
        return {"type": "error", "code": "unknown_type", "cid": cid}

    def read_until(self, marker):
        """Return every frame before the marker's answer."""
        frames = []
        while True:
            frame = json.loads(self.ws().recv(timeout=T))
            if {k: frame.get(k) for k in marker} == marker:
                return frames
            frames.append(frame)


@pytest.mark.parametrize("config_overrides", [{"MAX_FRAME_BYTES": 8 << 20}])
def test_generated_frames_get_one_contract_answer_and_the_socket_stays_open(
        live_server, caplog):
    """Every frame: one error with a contract code (or sent/pong/nothing); open after."""
    a, b, c = live_server.user(), live_server.user(), live_server.user()
    status, g1 = live_server.request("POST", "/api/groups",
                                     {"name": "ab", "members": [b.id]}, token=a.token)
    assert status == 201
    status, g2 = live_server.request("POST", "/api/groups",
                                     {"name": "bc", "members": [c.id]}, token=b.token)
    assert status == 201
    status, g3 = live_server.request("POST", "/api/groups", {"name": "a"}, token=a.token)
    assert status == 201
    world = World(me=a.id, users={a.id, b.id, c.id},
                  groups={g1["id"]: {a.id, b.id}, g2["id"]: {b.id, c.id}, g3["id"]: {a.id}})
    store = live_server.hub.store
    conv = Conversation(a)
    stored = {}  # cid -> id of every message the server said it stored
    inbox = {b.id: 0, c.id: 0}  # entries each receiver must have

    def stored_by_a():
        with store.db.connection_context():
            return store.db.execute_sql("SELECT COUNT(*) FROM messages WHERE sender_id = ?",
                                        (a.id,)).fetchone()[0]

    ids = (a.id, b.id, c.id, g1["id"], g2["id"], g3["id"])
    seen = Counter()

    valid = {"type": "send", "cid": "fixed-1", "to": b.id, "body": "hi"}
    pinned = [
        # Every field of a send missing in turn, then null in turn.
        *[("object", {k: v for k, v in valid.items() if k != name}) for name in valid],
        *[("object", {**valid, name: None}) for name in valid],
        ("object", valid),
        ("object", {**valid, "to": 2**64}),
        ("object", {**valid, "to": Raw("-0", 0)}),
        ("object", {**valid, "to": Raw("1e308", 1e308)}),
        ("object", {**valid, "body": "\ud800"}),
        ("object", {**valid, "cid": "\udfff"}),
        ("object", {**valid, "cid": "x" * 65}),
        ("object", {**valid, "cid": ""}),
        ("object", {**valid, "body": ""}),
        ("object", {**valid, "body": "x" * (MAX_BODY_CHARS + 1)}),
        ("object", {"type": "ack", "seq": 2**63, "cid": "c"}),
        ("object", {"type": "ack", "seq": Raw("1" + "0" * HUGE_DIGITS, 10**HUGE_DIGITS,
                                              may_refuse=True)}),
        ("object", {"type": "\ud800", "cid": "c"}),
        ("object", Raw("[" * 100000 + "]" * 100000, [], may_refuse=True)),
        ("object", {**valid, "x": Raw('{"a":' * 100000 + "1" + "}" * 100000, {},
                                      may_refuse=True)}),
        ("binary", b'{"type":"ping"}'),
        ("binary", b"\xff\xfe\xed\xa0\x80"),
        ("text", ""),
        ("text", "null"),
    ]

    @settings(max_examples=400, **HYPOTHESIS)
    @given(hostile_frames(ids))
    def check(frame):
        caplog.clear()
        how, payload = frame
        if how == "object":
            expect = classify(payload, world)
            payload = encode(payload)
        elif how == "text":
            expect = classify_text(payload, world)
        else:
            expect = Expect(codes={"bad_frame"})
        note(f"expect={expect}")
        ws = conv.ws()
        try:
            ws.send(payload)
            ws.send('{"type":"ping"}')
            answers = conv.read_until(conv.marker())
            # The ping is answered: the connection is open and serving.
            assert {"type": "pong"} in answers, answers
            answers.remove({"type": "pong"})
            # `sent` and the store's refusals come after the commit.
            if not answers and (expect.send or expect.codes & {"not_found", "forbidden"}):
                answers.append(json.loads(ws.recv(timeout=T)))
            # Nothing else arrives after the answer.
            answers += conv.read_until(conv.marker())
        except Exception:
            conv.drop()
            raise
        note(f"answers={answers}")
        seen[" ".join(f.get("code", f["type"]) for f in answers) or "nothing"] += 1
        if expect.silent and not answers:
            pass
        else:
            assert len(answers) == 1, answers
            answer = answers[0]
            if answer == {"type": "pong"}:
                assert expect.pong, answer
            elif answer["type"] == "sent":
                assert expect.send, answer
                cid, recipients = expect.send
                assert set(answer) == {"type", "cid", "id", "ts"}, answer
                assert answer["cid"] == cid
                assert type(answer["id"]) is int and answer["id"] > 0
                assert type(answer["ts"]) is int
                if cid in stored:
                    # The same cid again: the same id, nothing delivered twice.
                    assert answer["id"] == stored[cid]
                else:
                    stored[cid] = answer["id"]
                    for uid in recipients:
                        inbox[uid] += 1
            else:
                assert answer["type"] == "error", answer
                assert answer["code"] in SOCKET_CODES
                assert answer["code"] in expect.codes, (answer, expect)
                assert isinstance(answer["message"], str)
                if answer["code"] == "bad_json" or expect.cid is None:
                    assert "cid" not in answer, answer
                else:
                    assert answer.get("cid") == expect.cid, answer
        # Nothing is stored that should not be.
        for uid, count in inbox.items():
            assert store.cursor(uid)[1] == count, (uid, count)
        assert stored_by_a() == len(stored)
        assert not _errors_logged(caplog)

    for frame in pinned:
        check = example(frame)(check)
    check()
    print("\nanswers:", dict(seen.most_common()))
    # The connection is still serving after them all.
    client = conv.client or a.connect()
    client.send({"type": "ping"})
    assert client.recv() == {"type": "pong"}
    conv.drop()
    wait_until(lambda: live_server.hub.conns.count() == 0, message="connection removed")


# -- test 1b: protocol-level abuse with raw frames --------------------------------


def build_frame(payload: bytes, opcode: int, fin=True, rsv=0, mask=True, length=None):
    """Build one frame by hand: any opcode, FIN and RSV bits, masked or not."""
    n = len(payload) if length is None else length
    header = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    bit = 0x80 if mask else 0
    if n < 126:
        header += bytes([bit | n])
    elif n < 65536:
        header += bytes([bit | 126]) + n.to_bytes(2, "big")
    else:
        header += bytes([bit | 127]) + n.to_bytes(8, "big")
    if not mask:
        return header + payload
    key = os.urandom(4)
    return header + key + bytes(x ^ key[i % 4] for i, x in enumerate(payload))


ascii_text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E),
                     max_size=40)


@st.composite
def abuse(draw):
    """``(kind, bytes to send)``: a protocol violation the server must close on."""
    kind = draw(st.sampled_from([
        "fragmented_bad_utf8", "bad_utf8_text", "big_control", "fragmented_control",
        "unmasked", "reserved_opcode", "rsv_bits", "bad_close_code", "close_1_byte",
        "close_bad_utf8_reason", "orphan_continuation", "interleaved_data",
        "oversized", "length_msb", "truncated_then_eof",
    ]))
    ping = b'{"type":"ping"}'
    if kind == "fragmented_bad_utf8":
        bad = draw(st.sampled_from(INVALID_UTF8))
        head = b'{"type":"send","cid":"x","to":1,"body":"' + draw(ascii_text).encode()
        tail = draw(ascii_text).encode() + b'"}'
        data = head + bad + tail
        # One cut inside or right at the bad sequence, more anywhere.
        cuts = {len(head) + draw(st.integers(0, len(bad)))}
        cuts |= set(draw(st.lists(st.integers(1, len(data) - 1), max_size=3)))
        cuts = sorted(x for x in cuts if 0 < x < len(data))
        if not cuts:
            cuts = [len(data) // 2]
        pieces = [data[i:j] for i, j in zip([0] + cuts, cuts + [len(data)])]
        out = b""
        for i, piece in enumerate(pieces):
            out += build_frame(piece, 0x1 if i == 0 else 0x0, fin=i == len(pieces) - 1)
        return kind, out
    if kind == "bad_utf8_text":
        return kind, build_frame(draw(invalid_utf8()), 0x1)
    if kind == "big_control":
        opcode = draw(st.sampled_from([0x8, 0x9, 0xA]))
        size = draw(st.integers(126, 70000))
        payload = (1000).to_bytes(2, "big") + b"x" * (size - 2) if opcode == 0x8 \
            else b"x" * size
        return kind, build_frame(payload, opcode)
    if kind == "fragmented_control":
        return kind, build_frame(b"hi", draw(st.sampled_from([0x8, 0x9, 0xA])), fin=False)
    if kind == "unmasked":
        return kind, build_frame(ping, draw(st.sampled_from([0x1, 0x2, 0x9])), mask=False)
    if kind == "reserved_opcode":
        opcode = draw(st.sampled_from([0x3, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xD, 0xE, 0xF]))
        return kind, build_frame(ping, opcode)
    if kind == "rsv_bits":
        return kind, build_frame(ping, draw(st.sampled_from([0x1, 0x2, 0x9])),
                                 rsv=draw(st.integers(1, 7)))
    if kind == "bad_close_code":
        code = draw(st.one_of(st.integers(0, 999), st.sampled_from([1004, 1005, 1006, 1015]),
                              st.integers(1016, 2999), st.integers(5000, 65535)))
        return kind, build_frame(code.to_bytes(2, "big") + draw(ascii_text).encode(), 0x8)
    if kind == "close_1_byte":
        return kind, build_frame(bytes([draw(st.integers(0, 255))]), 0x8)
    if kind == "close_bad_utf8_reason":
        return kind, build_frame((1000).to_bytes(2, "big") + draw(invalid_utf8()), 0x8)
    if kind == "orphan_continuation":
        return kind, build_frame(ping, 0x0, fin=draw(st.booleans()))
    if kind == "interleaved_data":
        # A new data frame while a fragmented message is unfinished.
        return kind, build_frame(b'{"type":', 0x1, fin=False) + build_frame(
            ping, draw(st.sampled_from([0x1, 0x2])))
    if kind == "oversized":
        # Past MAX_FRAME_BYTES (65536): the contract says close with 1009.
        size = draw(st.integers(65537, 200000))
        declared = draw(st.sampled_from([size, 2**40, 2**62]))
        return kind, build_frame(b"x" * size, draw(st.sampled_from([0x1, 0x2])),
                                 length=declared)
    if kind == "length_msb":
        # A 64-bit length with the most significant bit set is invalid.
        return kind, build_frame(b"x" * 16, 0x1, length=2**63 + 16)
    # A frame cut short, then the client's end of the socket is shut.
    frame = build_frame(ping, 0x1)
    return kind, frame[:draw(st.integers(1, len(frame) - 1))]


def _close_code(raw):
    """Read frames until the server ends the connection; return its close code."""
    code = "eof"
    try:
        while True:
            opcode, payload = raw.read_frame()
            if opcode == 0x8:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
    except (EOFError, ConnectionResetError):
        return code


def test_protocol_abuse_closes_the_connection_and_releases_everything(live_server, caplog):
    """Each violation: the server closes, the handler, place and threads are released."""
    user = live_server.user()
    hub = live_server.hub
    # Warm up: whatever the first connection starts lazily is running.
    user.connect().close()
    wait_until(lambda: hub.conns.count() == 0 and hub.open_connections == 0,
               message="warm-up connection released")
    baseline = threading.active_count()
    seen = Counter()

    @settings(max_examples=200, **HYPOTHESIS)
    @given(abuse())
    def check(case):
        caplog.clear()
        kind, data = case
        raw = RawClient(live_server.port, user.token)
        try:
            assert raw.status == 101
            opcode, payload = raw.read_frame()
            assert (opcode, json.loads(payload)) == (0x1, {"type": "ready", "user_id": user.id})
            wait_until(lambda: hub.conns.count() == 1, message="registered")
            try:
                raw.sock.sendall(data)
                if kind == "truncated_then_eof":
                    raw.sock.shutdown(socket.SHUT_WR)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server closed while we were still writing
            # The server ends the connection (a socket timeout fails the test).
            code = _close_code(raw)
        finally:
            raw.close()
        note(f"close code {code}")
        seen[f"{kind}: {code}"] += 1
        if kind == "oversized":
            assert code in (1009, "eof"), code
        wait_until(lambda: hub.conns.count() == 0, message=f"{kind}: handler removed")
        wait_until(lambda: hub.open_connections == 0, message=f"{kind}: place released")
        wait_until(lambda: threading.active_count() <= baseline + 2,
                   message=f"{kind}: threads back to {baseline} (+2)")
        assert not _errors_logged(caplog)

    check()
    print("\nclose code by kind:", dict(sorted(seen.items())))
    # The server still serves after all that.
    client = user.connect()
    client.send({"type": "ping"})
    assert client.recv() == {"type": "pong"}
    client.close()


# -- test 2: generated HTTP bodies, paths and queries ----------------------------

CONTENT_TYPES = [None, "application/json", "application/json; charset=utf-8",
                 "application/json; charset=latin-1", "application/json; charset=nope",
                 "text/plain", "text/html", "application/x-www-form-urlencoded",
                 "multipart/form-data", "multipart/form-data; boundary=x",
                 "application/octet-stream", "a/b;;;=", "", "application/xml",
                 "application/json; charset=utf-16"]

BODY_KEYS = ["username", "password", "to", "group", "body", "cid", "name", "members",
             "user_id"]


def _good_http_values(ids):
    a, b, c, g1, g2 = ids
    user_ids = st.sampled_from([a, b, c, 999_999])
    return {
        "username": st.one_of(st.from_regex(r"[A-Za-z0-9_.\-]{1,32}", fullmatch=True),
                              st.sampled_from(["alice", "a"])),
        "password": st.text(min_size=8, max_size=12),
        "to": user_ids,
        "group": st.sampled_from([g1, g2, 999_999]),
        "body": st.text(min_size=1, max_size=20),
        "cid": st.text(min_size=1, max_size=64),
        "name": st.text(min_size=1, max_size=64),
        "members": st.lists(user_ids, max_size=3),
        "user_id": user_ids,
    }


ENDPOINT_KEYS = {
    "/api/users": ["username", "password"],
    "/api/tokens": ["username", "password"],
    "/api/messages": ["to", "body", "cid"],
    "/api/groups": ["name", "members"],
    "/api/groups/{gid}/members": ["user_id"],
}


@st.composite
def http_bodies(draw, ids, path=None):
    """Raw request bodies: bytes, bad UTF-8, hostile JSON of every shape.

    With ``path``, JSON objects start from a valid body of that endpoint and
    get fields dropped, nulled or replaced by hostile values.
    """
    good = _good_http_values(ids)
    how = draw(st.sampled_from(["object"] * 6 + ["binary", "invalid_utf8", "value", "deep",
                                                 "huge_number", "utf16", "bom", "truncated",
                                                 "empty", "too_large"]))
    if how in ("object", "utf16", "bom", "truncated"):
        wanted = ENDPOINT_KEYS.get(path, [])
        if path == "/api/messages" and draw(st.booleans()):
            wanted = ["group", "body", "cid"]
        obj = {key: draw(good[key]) for key in wanted}
        fields = st.sampled_from(wanted or BODY_KEYS)
        for key in draw(st.sets(st.one_of(fields, fields, st.sampled_from(BODY_KEYS)),
                                max_size=2)):
            choice = draw(st.sampled_from(["drop", "null", "hostile", "surrogate", "any"]))
            if choice == "drop":
                obj.pop(key, None)
            elif choice == "null":
                obj[key] = None
            elif choice == "surrogate":
                # Escaped in JSON as "\ud800": valid JSON, not valid Unicode text.
                obj[key] = draw(st.builds(lambda a, x, b: a + x + b, st.text(max_size=9),
                                          surrogates, st.text(max_size=9)))
            else:
                obj[key] = draw(texts if choice == "hostile" else json_values)
        obj.update(draw(st.dictionaries(keys, json_values, max_size=2)))
        text = encode(obj)
        if how == "utf16":
            return text.encode("utf-16")
        if how == "bom":
            return b"\xef\xbb\xbf" + text.encode()
        if how == "truncated":
            return text.encode()[:draw(st.integers(0, max(0, len(text) - 1)))]
        return text.encode()
    if how == "binary":
        return draw(st.binary(max_size=64))
    if how == "invalid_utf8":
        return draw(invalid_utf8())
    if how == "value":
        return encode(draw(json_values)).encode()
    if how == "deep":
        return draw(deep_json()).text.encode()
    if how == "huge_number":
        return draw(raw_numbers).text.encode()
    if how == "empty":
        return b""
    return b" " * (256 * 1024 + 1) + b"{}"


segments = st.one_of(
    ints.map(str),
    st.sampled_from(["0", "-1", "1.5", "1e3", "", ".", "..", "%", "٣", "9" * 19, "9" * 30,
                     "9223372036854775807", "9223372036854775808", "00001", " 1"]),
    st.text(max_size=10),
)

query_values = st.one_of(
    st.text(max_size=10),
    ints.map(str),
    st.sampled_from(["", "0", "-1", "+1", " 1", "1 ", "1.0", "1e3", "٣", "²", "0x10",
                     "1,2", "9223372036854775807", "9223372036854775808", ",,,",
                     "1,,2", " , ", "9" * 4301, "true", "null", "[1]"]),
    st.lists(st.one_of(ints.map(str), st.text(max_size=3)), max_size=600).map(",".join),
)
query_keys = st.one_of(st.sampled_from(["with", "group", "before", "limit", "ids", "to",
                                        "token", "username"]), st.text(max_size=5))
query_strings = st.one_of(
    st.lists(st.tuples(query_keys, query_values), max_size=4).map(urllib.parse.urlencode),
    st.text(max_size=30).map(lambda t: urllib.parse.quote(t, safe="=&,")),
    st.sampled_from(["%ff%fe=%zz", "with=%ff", "ids=%00", "with=1&with=2", "limit=%2B5",
                     "&&&", "=", "ids", "with=1&group=1", "group=1&limit=101",
                     "with=2&before=0", "ids=" + ",".join(["1"] * 501)]),
)


def queries(ids):
    """Query strings: hostile ones, and valid ones with one hostile parameter."""
    a, b, c, g1, g2 = ids
    base = st.sampled_from([[("with", b)], [("with", c)], [("group", g1)], [("group", g2)],
                            [("ids", f"{a},{b},{c}")], [("ids", a)], [("to", b)],
                            [("username", "hb")]])
    extra = st.lists(st.tuples(st.sampled_from(["before", "limit", "with", "group", "ids"]),
                               st.one_of(st.integers(1, 120), query_values)), max_size=2)
    valid = st.builds(lambda x, y: urllib.parse.urlencode(x + y), base, extra)
    return st.one_of(query_strings, valid, valid)


def _check_http(resp):
    """The answer is JSON in the envelope with a contract status, or a success."""
    assert resp.status_code in SUCCESS | set(HTTP_CODES), (resp.status_code, resp.data[:300])
    if resp.status_code == 204:
        assert resp.data == b""
        return
    assert resp.mimetype == "application/json", (resp.status_code, resp.data[:300])
    body = json.loads(resp.data)
    if resp.status_code in SUCCESS:
        assert isinstance(body, dict)
        return
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] in HTTP_CODES[resp.status_code], (resp.status_code, body)
    assert isinstance(body["error"]["message"], str)


@pytest.fixture
def http_world(client):
    """Three users (a, b, c) and two groups (a+b owned by a, b+c owned by b)."""
    tokens = {}
    ids = {}
    for name in ("ha", "hb", "hc"):
        resp = client.post("/api/users", json={"username": name, "password": "password123"})
        assert resp.status_code == 201
        ids[name] = resp.get_json()["id"]
        resp = client.post("/api/tokens", json={"username": name, "password": "password123"})
        tokens[name] = resp.get_json()["token"]
    auth = {n: {"Authorization": f"Bearer {t}"} for n, t in tokens.items()}
    g1 = client.post("/api/groups", json={"name": "ab", "members": [ids["hb"]]},
                     headers=auth["ha"]).get_json()["id"]
    g2 = client.post("/api/groups", json={"name": "bc", "members": [ids["hc"]]},
                     headers=auth["hb"]).get_json()["id"]
    return (ids["ha"], ids["hb"], ids["hc"], g1, g2), auth


POST_ENDPOINTS = ["/api/users", "/api/tokens", "/api/messages", "/api/groups",
                  "/api/groups/{gid}/members"]


def test_generated_http_bodies_get_json_envelopes_never_500(client, http_world, caplog):
    """Every POST endpoint, any body and content type: JSON, a contract status."""
    ids, auth = http_world
    seen = Counter()
    world_ids = st.sampled_from([str(ids[3]), str(ids[4]), "999999"])

    @settings(max_examples=500, **HYPOTHESIS)
    @given(request=st.sampled_from(POST_ENDPOINTS).flatmap(
               lambda p: st.tuples(st.just(p), http_bodies(ids, p))),
           content_type=st.sampled_from(CONTENT_TYPES),
           gid=st.one_of(world_ids, segments),
           query=st.one_of(st.just(""), queries(ids)),
           who=st.sampled_from(["ha", "ha", "hb", None]))
    @example(request=("/api/groups", b'{"name": "\\ud800"}'), content_type=None,
             gid="1", query="", who="ha")
    @example(request=("/api/users", b"[" * 100000 + b"]" * 100000), content_type=None,
             gid="1", query="", who=None)
    @example(request=("/api/messages", b'{"a":' * 50000 + b"1" + b"}" * 50000),
             content_type="application/json", gid="1", query="", who="ha")
    @example(request=("/api/groups/{gid}/members", b'{"user_id": 1}'), content_type=None,
             gid=str(2**63), query="", who="ha")
    @example(request=("/api/groups/{gid}/members", b'{"user_id": 1}'), content_type=None,
             gid="", query="", who="ha")
    def check(request, content_type, gid, query, who):
        path, body = request
        caplog.clear()
        headers = dict(auth[who]) if who else {}
        if content_type is not None:
            headers["Content-Type"] = content_type
        url = path.format(gid=urllib.parse.quote(gid, safe=""))
        resp = client.open(url, method="POST", data=body, headers=headers,
                           query_string=query)
        note(f"{resp.status_code} {resp.data[:300]!r}")
        _check_http(resp)
        seen[f"{path} {resp.status_code}"] += 1
        assert not _errors_logged(caplog)

    check()
    print("\nstatuses:", dict(sorted(seen.items())))


QUERY_ENDPOINTS = [("GET", "/api/messages"), ("GET", "/api/presence"),
                   ("GET", "/api/groups"), ("GET", "/api/groups/{gid}"), ("GET", "/api/me"),
                   ("GET", "/api/users/{uid}"), ("GET", "/api/users"),
                   ("DELETE", "/api/groups/{gid}/members/{uid}"),
                   ("POST", "/api/groups/{gid}/members")]


def test_generated_paths_and_queries_get_json_envelopes_never_500(client, http_world,
                                                                  caplog):
    """GET /api/messages, presence, group paths, DELETE: JSON, a contract status."""
    ids, auth = http_world
    seen = Counter()
    gids = st.one_of(st.sampled_from([str(ids[3]), str(ids[4]), "999999"]), segments)
    uids = st.one_of(st.sampled_from([str(i) for i in ids[:3]]), segments)

    @settings(max_examples=800, **HYPOTHESIS)
    @given(endpoint=st.sampled_from(QUERY_ENDPOINTS), query=queries(ids),
           gid=gids, uid=uids, who=st.sampled_from(["ha", "ha", "hb", "hc", None]),
           body=st.one_of(st.just(b""), http_bodies(ids)))
    @example(endpoint=("GET", "/api/groups/{gid}"), query="", gid=str(2**63), uid="1",
             who="ha", body=b"")
    @example(endpoint=("DELETE", "/api/groups/{gid}/members/{uid}"), query="",
             gid=str(ids[3]), uid="9" * 30, who="ha", body=b"")
    @example(endpoint=("GET", "/api/users/{uid}"), query="", gid="1", uid=str(2**63),
             who="ha", body=b"")
    @example(endpoint=("GET", "/api/messages"), query="with=1&before=" + "9" * 4301,
             gid="1", uid="1", who="ha", body=b"")
    def check(endpoint, query, gid, uid, who, body):
        caplog.clear()
        method, path = endpoint
        url = path.format(gid=urllib.parse.quote(gid, safe=""),
                          uid=urllib.parse.quote(uid, safe=""))
        headers = dict(auth[who]) if who else {}
        resp = client.open(url, method=method, query_string=query, headers=headers,
                           data=body)
        note(f"{method} {url}?{query} -> {resp.status_code} {resp.data[:300]!r}")
        _check_http(resp)
        seen[f"{method} {path} {resp.status_code}"] += 1
        assert not _errors_logged(caplog)

    check()
    print("\nstatuses:", dict(sorted(seen.items())))


# -- test 3: garbage tokens -------------------------------------------------------

header_text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF,
                                             exclude_characters="\x7f"), max_size=60)
B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@st.composite
def garbage_tokens(draw, real_token, sign):
    """A token that must not pass: random, tampered, foreign, or badly signed."""
    how = draw(st.sampled_from(["text", "tampered", "truncated", "extended", "foreign",
                                "signed_garbage", "long", "jwt_like", "empty"]))
    if how == "text":
        return draw(header_text)
    if how == "tampered":
        # Any character but the last (the last one's low bits are padding).
        i = draw(st.integers(0, len(real_token) - 2))
        ch = draw(st.sampled_from(B64 + ".").filter(lambda x: x != real_token[i]))
        return real_token[:i] + ch + real_token[i + 1:]
    if how == "truncated":
        return real_token[:draw(st.integers(0, len(real_token) - 2))]
    if how == "extended":
        return real_token + draw(st.text(alphabet=B64 + ".", min_size=1, max_size=8))
    if how == "foreign":
        from itsdangerous import URLSafeSerializer

        return URLSafeSerializer("another-key", salt="imserver-token").dumps(
            {"u": 1, "e": 2**62})
    if how == "signed_garbage":
        payload = draw(st.one_of(
            st.fixed_dictionaries({"u": st.one_of(ints, plain_json),
                                   "e": st.one_of(ints, plain_json)}),
            st.lists(st.integers(), max_size=3), st.text(max_size=5), st.integers(),
            st.none()))
        return sign(payload)
    if how == "long":
        return "A" * draw(st.integers(1000, 8000))
    if how == "jwt_like":
        return ".".join(draw(st.lists(st.text(alphabet=B64, max_size=20), min_size=2,
                                      max_size=4)))
    return ""


def _usable_payload(payload, user_ids) -> bool:
    """Tell whether a signed payload is valid, or expires during the test."""
    if not isinstance(payload, dict):
        return False
    u, e = payload.get("u"), payload.get("e")
    if type(e) is int and abs(e - time.time() * 1000) < 86_400_000:
        return True  # expiring around now: the answer would depend on the clock
    return type(u) is int and u in user_ids and type(e) is int and e > time.time() * 1000


def _ws_handshake(port, query, headers):
    """Do a WebSocket opening handshake by hand; return ``(status, body)``."""
    import base64

    with socket.create_connection(("127.0.0.1", port), timeout=T) as sock:
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [f"GET /ws{query} HTTP/1.1", f"Host: 127.0.0.1:{port}",
                 "Upgrade: websocket", "Connection: Upgrade",
                 f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(4096)
            if not chunk:
                break
            buf += chunk
        head, _, body = buf.partition(b"\r\n\r\n")
        status = int(head.split()[1])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, val = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(val.strip())
        while len(body) < length:
            chunk = sock.recv(4096)
            if not chunk:
                break
            body += chunk
        return status, body


def test_garbage_tokens_get_401_unauthorized_on_api_and_ws(app, client, live_server, caplog):
    """Header or ?token=, on /api/me and the /ws handshake: always 401 unauthorized."""
    user = live_server.user()
    from imserver.auth import _serializer

    def sign(payload):
        with app.app_context():
            return _serializer().dumps(payload)

    user_ids = {user.id}
    seen = Counter()

    @settings(max_examples=400, **HYPOTHESIS)
    @given(token=garbage_tokens(user.token, sign),
           where=st.sampled_from(["bearer", "bearer_lower", "raw_header", "query",
                                  "query_and_bad_header", "basic"]),
           target=st.sampled_from(["me", "me", "ws"]),
           junk=st.sampled_from(["", "%ff", "%zz", "&token=", "&token=%00"]))
    @example(token=sign({"u": 2**63, "e": 2**62}), where="bearer", target="me", junk="")
    @example(token=sign({"u": 2**64, "e": 2**62}), where="query", target="ws", junk="")
    @example(token=sign({"u": True, "e": 2**62}), where="bearer", target="me", junk="")
    @example(token=sign({"u": user.id, "e": 1}), where="bearer", target="ws", junk="")
    def check(token, where, target, junk):
        caplog.clear()
        # Make sure a signed payload really is garbage.
        try:
            payload = _serializer_loads(app, token)
        except Exception:
            payload = None
        assume(not _usable_payload(payload, user_ids))
        headers, query = {}, ""
        if where == "bearer":
            headers["Authorization"] = f"Bearer {token}"
        elif where == "bearer_lower":
            headers["Authorization"] = f"bearer   {token}  "
        elif where == "raw_header":
            headers["Authorization"] = token
        elif where == "basic":
            headers["Authorization"] = f"Basic {token}"
        else:
            query = "?token=" + urllib.parse.quote(token, safe="")
            if where == "query_and_bad_header":
                headers["Authorization"] = "Bearer "
        if query or junk:
            query = (query or "?") + junk
        if target == "me":
            resp = client.get("/api/me" + query, headers=headers)
            note(f"{resp.status_code} {resp.data[:200]!r}")
            assert resp.status_code == 401
            assert resp.mimetype == "application/json"
            assert resp.get_json()["error"]["code"] == "unauthorized"
        else:
            status, body = _ws_handshake(live_server.port, query, headers)
            note(f"{status} {body[:200]!r}")
            assert status == 401
            assert json.loads(body)["error"]["code"] == "unauthorized"
        seen[f"{target} {where}"] += 1
        assert not _errors_logged(caplog)

    check()
    print("\n401 for:", dict(sorted(seen.items())))
    assert live_server.hub.open_connections == 0
    assert live_server.hub.conns.count() == 0


def _serializer_loads(app, token):
    from imserver.auth import _serializer

    with app.app_context():
        return _serializer().loads(token)


def test_fresh_cids_are_stored_once_each(live_server):
    """Sanity check of the frame model: a valid send is `sent` and lands in the inbox."""
    a, b = live_server.user(), live_server.user()
    world = World(me=a.id, users={a.id, b.id}, groups={})
    frame = {"type": "send", "cid": str(uuid.uuid4()), "to": b.id, "body": "hi"}
    expect = classify(frame, world)
    assert expect.send == (frame["cid"], frozenset({b.id}))
    client = a.connect()
    client.send(frame)
    assert client.recv()["type"] == "sent"
    wait_until(lambda: live_server.hub.store.cursor(b.id)[1] == 1, message="stored")
    client.close()
