"""The WebSocket frames of the contract, without any I/O.

``parse_frame(text, max_body_chars)`` turns one incoming text frame into a
``Send``, ``Ack`` or ``Ping``, or raises the contract's error (``bad_json``,
``bad_frame``, ``unknown_type``, ``body_too_long``). The ``encode_*``
functions build the outgoing frames as JSON text. Nothing here knows about
sockets, threads or the database, so every rule can be tested on its own
(as in websockets' ``protocol.py``).

Imports: stdlib and ``imserver.errors`` only.
"""

import json
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _quote

from imserver.errors import BadFrame
from imserver.errors import BadJson
from imserver.errors import BodyTooLong
from imserver.errors import ImError
from imserver.errors import UnknownType

# Ids and seqs are positive integers that fit a signed 64-bit column.
MAX_ID = 2**63 - 1
MAX_CID_CHARS = 64


@dataclass(frozen=True)
class Send:
    """``{"type": "send", "cid", "to" | "group", "body"}``."""

    cid: str
    body: str
    to: int | None = None
    group: int | None = None


@dataclass(frozen=True)
class Ack:
    """``{"type": "ack", "seq"}``: every entry up to ``seq`` is received."""

    seq: int
    # The frame's cid, if it had a valid one: a later refusal echoes it.
    cid: str | None = None


@dataclass(frozen=True)
class Ping:
    """``{"type": "ping"}``: answered by ``{"type": "pong"}``."""


Frame = Send | Ack | Ping


def _refuse(error: ImError, cid: str | None) -> ImError:
    """Attach the frame's cid to an error, so the error frame can carry it."""
    error.cid = cid
    return error


def is_id(value) -> bool:
    """Tell whether ``value`` is a valid id: a positive int, not a bool."""
    return type(value) is int and 0 < value <= MAX_ID


def is_text(value: str) -> bool:
    """Tell whether a str can be stored and sent: no lone surrogates."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_body(body, max_body_chars: int) -> str:
    """Return ``body`` if it is a valid message body, else raise.

    Shared by the WebSocket and ``POST /api/messages`` so that both refuse
    the same bodies with the same codes.
    """
    if not isinstance(body, str) or not body:
        raise BadFrame("body must be a non-empty string")
    if len(body) > max_body_chars:
        raise BodyTooLong(f"body is longer than {max_body_chars} characters")
    if not is_text(body):
        raise BadFrame("body is not valid Unicode")
    return body


def check_target(to, group) -> tuple[int | None, int | None]:
    """Return ``(to, group)`` if exactly one is a valid id, else raise."""
    if (to is None) == (group is None):
        raise BadFrame("exactly one of 'to' and 'group' is required")
    if to is not None and not is_id(to):
        raise BadFrame("'to' must be a positive integer user id")
    if group is not None and not is_id(group):
        raise BadFrame("'group' must be a positive integer group id")
    return to, group


def parse_frame(text, max_body_chars: int) -> Frame:
    """Parse one incoming frame, or raise the contract's error for it.

    :param text: the frame as received: ``str`` for a text frame, ``bytes``
        for a binary one (always refused with ``bad_frame``).
    :param max_body_chars: the ``MAX_BODY_CHARS`` setting.
    :raises ImError: with ``.cid`` set to the frame's cid where it had one.
    """
    if not isinstance(text, str):
        raise _refuse(BadFrame("binary frames are not accepted"), None)
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        # ValueError covers bad JSON and ints past Python's digit limit;
        # RecursionError covers hostile nesting depth.
        raise _refuse(BadJson("the frame is not valid JSON"), None) from None
    if not isinstance(data, dict):
        raise _refuse(BadJson("the frame must be a JSON object"), None)
    cid = data.get("cid")
    if not (isinstance(cid, str) and 1 <= len(cid) <= MAX_CID_CHARS and is_text(cid)):
        cid = None
    kind = data.get("type")
    if not isinstance(kind, str):
        raise _refuse(BadFrame("'type' must be a string"), cid)
    if kind == "send":
        return _parse_send(data, cid, max_body_chars)
    if kind == "ack":
        seq = data.get("seq")
        if type(seq) is not int or not 0 <= seq <= MAX_ID:
            raise _refuse(BadFrame("'seq' must be a non-negative integer"), cid)
        return Ack(seq, cid)
    if kind == "ping":
        return Ping()
    raise _refuse(UnknownType(f"unknown frame type {kind[:32]!r}"), cid)


def _parse_send(data: dict, cid: str | None, max_body_chars: int) -> Send:
    """Validate the fields of a ``send`` frame."""
    if cid is None:
        raise _refuse(BadFrame("'cid' must be a string of 1 to 64 characters"), None)
    try:
        to, group = check_target(data.get("to"), data.get("group"))
        body = check_body(data.get("body"), max_body_chars)
    except ImError as error:
        raise _refuse(error, cid) from None
    return Send(cid=cid, body=body, to=to, group=group)


# -- outgoing frames --------------------------------------------------------

PONG = '{"type":"pong"}'


# One encoder for every frame: ``json.dumps`` with options builds a new one
# per call. ASCII-only output never fails to encode as UTF-8.
_ENCODER = json.JSONEncoder(separators=(",", ":"))


def _dumps(obj) -> str:
    """Encode compactly (``json.dumps(obj, separators=(",", ":"))``)."""
    return _ENCODER.encode(obj)


def _json_str(value: str | None) -> str:
    """Encode a str (or None) as ``json.dumps`` does: ASCII, escaped."""
    return "null" if value is None else _quote(value)


def encode_ready(user_id: int) -> str:
    """Build the ``ready`` frame, the first after the upgrade."""
    return '{"type":"ready","user_id":%d}' % user_id


def encode_sent(cid: str, message_id: int, ts: int) -> str:
    """Build the ``sent`` frame: the message with ``cid`` is stored durably.

    Formatted rather than encoded from a dict: this runs once per message,
    in the writer. The same text as ``_dumps`` of the frame's dict.
    """
    return '{"type":"sent","cid":%s,"id":%d,"ts":%d}' % (_json_str(cid), message_id, ts)


def encode_error(code: str, message: str, cid: str | None = None) -> str:
    """Build an ``error`` frame; ``cid`` only where the refused frame had one."""
    frame = {"type": "error", "code": code, "message": message}
    if cid is not None:
        frame["cid"] = cid
    return _dumps(frame)


def encode_message(message_id: int, sender: int, to: int | None, group: int | None,
                   body: str, ts: int, cid: str | None) -> str:
    """Encode the contract's message object once, to be framed for every recipient.

    The keys in the contract's order: ``id``, ``from``, ``group`` or
    ``to``, ``body``, ``ts``, ``cid``.
    """
    if group is not None:
        target = '"group":%d' % group
    else:
        target = '"to":%d' % to
    return '{"id":%d,"from":%d,%s,"body":%s,"ts":%d,"cid":%s}' % (
        message_id, sender, target, _quote(body), ts, _json_str(cid))


def encode_entry(seq: int, message_json: str) -> str:
    """Build a ``message`` frame for one inbox entry.

    ``message_json`` is the message encoded once by ``encode_message``;
    only ``seq`` differs between the recipients of a group message, so the
    frame is spliced instead of encoded again for each of them.
    """
    return '{"type":"message","seq":%d,%s' % (seq, message_json[1:])
