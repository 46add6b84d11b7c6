"""protocol.py on its own: parsing and encoding frames, no sockets."""

import json

import pytest

from imserver import protocol
from imserver.errors import ImError


def parse(frame):
    return protocol.parse_frame(frame if isinstance(frame, (str, bytes)) else json.dumps(frame),
                                max_body_chars=10)


def test_send_to_user_parses():
    """A well-formed one-to-one send becomes a Send."""
    assert parse({"type": "send", "cid": "a", "to": 2, "body": "hi"}) == protocol.Send(
        cid="a", body="hi", to=2)


def test_send_to_group_parses_and_unknown_fields_are_ignored():
    """A group send parses; fields the contract does not name are ignored."""
    frame = parse({"type": "send", "cid": "a", "group": 3, "body": "hi", "x": [1]})
    assert frame == protocol.Send(cid="a", body="hi", group=3)


def test_ack_and_ping_parse():
    """ack and ping become Ack and Ping."""
    assert parse({"type": "ack", "seq": 0}) == protocol.Ack(0)
    assert parse({"type": "ping"}) == protocol.Ping()


@pytest.mark.parametrize("frame,code,cid", [
    ("{", "bad_json", None),
    ("1e999999", "bad_json", None),
    ("9" * 5000, "bad_json", None),
    ("[" * 5000 + "]" * 5000, "bad_json", None),
    (b"binary", "bad_frame", None),
    ({"type": "nope", "cid": "q"}, "unknown_type", "q"),
    ({"type": "send", "cid": "q", "to": 1, "body": "x" * 11}, "body_too_long", "q"),
    ({"type": "send", "cid": "q", "to": 1.0, "body": "x"}, "bad_frame", "q"),
    ({"type": "send", "cid": "q", "group": 0, "body": "x"}, "bad_frame", "q"),
    ({"type": "send", "cid": 5, "to": 1, "body": "x"}, "bad_frame", None),
    ({"type": "ack", "seq": True}, "bad_frame", None),
    ({"type": "ack", "seq": 2**64}, "bad_frame", None),
])
def test_bad_frames_raise_their_code_with_the_cid(frame, code, cid):
    """Each malformed frame raises its contract code, carrying the cid if valid."""
    with pytest.raises(ImError) as info:
        parse(frame)
    assert info.value.code == code
    assert info.value.cid == cid


def test_entry_frame_is_the_message_with_type_and_seq():
    """encode_entry splices type and seq in front of the encoded message."""
    message = {"id": 7, "from": 1, "to": 2, "body": "é \"q\"", "ts": 5, "cid": None}
    frame = json.loads(protocol.encode_entry(12, protocol.encode_message(
        7, 1, 2, None, "é \"q\"", 5, None)))
    assert frame == {"type": "message", "seq": 12, **message}


def test_error_frame_carries_cid_only_when_given():
    """encode_error omits cid unless the refused frame had one."""
    assert json.loads(protocol.encode_error("bad_json", "m")) == {
        "type": "error", "code": "bad_json", "message": "m"}
    assert json.loads(protocol.encode_error("forbidden", "m", "c"))["cid"] == "c"
