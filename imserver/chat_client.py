"""Chat with an imserver from a terminal: the `imserver chat` command.

The client speaks the public contract (docs: protocol v1): it logs in with
POST /api/tokens, opens `/ws?token=...`, sends `send` frames with a fresh `cid`,
prints `message` frames as they arrive and acks them cumulatively, and uses the
HTTP API for history, groups and presence. Beyond the contract it names people:
`UserDirectory` turns typed usernames into ids (GET /api/users?username=) and
ids into usernames for display (GET /api/users/<id>), caching both ways; a
server without those endpoints still works by id.

It is built in three layers so that most of it is testable without a network:

- pure functions: `parse_command` turns a typed line into an action, the
  `format_*` functions turn frames and API answers into lines of text, and
  `InboxTracker` decides what to print and what to ack; names come in as
  injected lookups (a dict, or a callable such as `UserDirectory.id_for`);
- `Api` (urllib only), `UserDirectory` (the name cache over `Api`) and
  `ChatSession` (one WebSocket, a reader thread);
- `run_chat`, the interactive loop over injected streams, and `chat_command`,
  the click front end.

Imports: stdlib, click and simple_websocket only; never the server's modules,
so the client keeps working against any server that keeps the contract.
"""

import collections
import datetime
import json
import logging
import math
import queue
import re
import shlex
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any
from typing import Callable
from typing import NamedTuple

import click
import simple_websocket

logger = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:5000"
HISTORY_LIMIT = 20

#: Exit status of `run_chat` after /quit, end of input, or Ctrl-C.
EXIT_OK = 0
#: Exit status after a dropped connection or a failed start.
EXIT_FAILURE = 1
#: Exit status when a newer connection of the same user replaced this one
#: (close 4001 `replaced`): the user chose to chat elsewhere, not a failure.
EXIT_REPLACED = 0

CLOSE_REPLACED = 4001

HELP = """\
commands (<user>: a username or a numeric user id; @<name> forces a name, as @42):
  /to <user> <text>           send <text> to that user; /to <user> alone selects them
  /group <gid> <text>         send <text> to group <gid>; /group <gid> alone selects it
  <text>                      send to the last /to or /group target (//text sends /text)
  /history <user>             last 20 messages with that user
  /history g<gid>             last 20 messages of group <gid>
  /groups                     list your groups
  /newgroup <name> <user,..>  create a group with those members (quote a name with spaces)
  /online <user,user>         who of those users is online
  /help                       this text
  /quit                       leave (also Ctrl-D)"""

_USAGE = {
    "to": "usage: /to <username|id> <text>",
    "group": "usage: /group <gid> <text>",
    "history": "usage: /history <username|id> | /history g<gid>",
    "newgroup": "usage: /newgroup <name> <username|id,...>",
    "online": "usage: /online <username|id,...>",
}

#: Why a name cannot be resolved when the client has no way to look it up.
UNKNOWN_NAME = "unknown user name; use the numeric id"

#: Seconds before a failed id -> name lookup (other than 404) is tried again.
NAME_RETRY_SECONDS = 30.0

# C0/C1 controls except tab and newline, and the bidi overrides: a peer could use
# them to rewrite the terminal or disguise a message, so they are shown escaped.
_UNSAFE_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_ID = re.compile(r"[0-9]+")
# The contract's usernames: 1 to 32 of A-Z a-z 0-9 _ . - (case-sensitive).
_USERNAME = re.compile(r"[A-Za-z0-9_.-]{1,32}")
_ID_SEPARATORS = re.compile(r"[\s,]+")


class ChatError(Exception):
    """Report a problem to the user as one line of text.

    Raised for anything the client cannot do (server unreachable, bad input);
    `run_chat` prints it instead of a traceback.
    """


class ApiError(ChatError):
    """Carry an HTTP error answer of the contract's error envelope.

    Keeping status, code and message apart lets callers react to a code
    (`bad_credentials`) while the user sees all three.
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


#: Looks up the username of a user id; None when unknown (the id is shown).
NameOf = Callable[[int], str | None]
#: What `parse_command` resolves typed names with: a name -> id mapping, or a
#: callable that returns the id or raises ValueError (unknown) / ChatError.
Names = dict[str, int] | Callable[[str], int] | None


class Target(NamedTuple):
    """Name a conversation: a user (`kind` "to") or a group (`kind` "group").

    `kind` is the very key a `send` frame uses, so a frame is `{kind: id}`.
    """

    kind: str
    id: int

    def describe(self, name_of: NameOf | None = None) -> str:
        """Render the target for the user, as the message lines do.

        A user is shown by the name `name_of` gives for the id, else the id.
        """
        if self.kind == "group":
            return f"group {self.id}"
        return _who(self.id, None, name_of)


# ---------------------------------------------------------------------------
# Parsing typed lines (pure)
# ---------------------------------------------------------------------------


def parse_id(text: str) -> int:
    """Parse a positive integer id, raising ValueError with a user-facing text.

    The contract's ids are positive integers; rejecting anything else here
    spares a round trip that would only answer `bad_frame`.
    """
    if not _ID.fullmatch(text) or int(text) <= 0:
        raise ValueError(f"not an id: {text!r} (ids are positive integers)")
    return int(text)


def parse_id_list(text: str) -> list[int]:
    """Parse ids separated by commas and/or spaces, keeping order, dropping repeats.

    Users type "1,2,3" or "1, 2 3"; the API wants a clean list.
    """
    ids: list[int] = []
    for part in _ID_SEPARATORS.split(text.strip()):
        if part:
            value = parse_id(part)
            if value not in ids:
                ids.append(value)
    return ids


def parse_user_list(text: str, names: Names = None) -> list[int]:
    """Parse user references (ids or usernames) separated by commas and/or
    spaces into ids, keeping order and dropping repeats."""
    ids: list[int] = []
    for part in _ID_SEPARATORS.split(text.strip()):
        if part:
            value = resolve_user(part, names)
            if value not in ids:
                ids.append(value)
    return ids


def resolve_user(text: str, names: Names = None) -> int:
    """Turn a typed user reference into an id, raising ValueError if impossible.

    Digits alone are an id; anything else is a username, and "@name" forces a
    username (for names made of digits). `names` resolves usernames: a dict
    (names the client was told), or a callable such as `UserDirectory.id_for`
    (which asks the server). Without it only ids resolve.
    """
    if text.startswith("@"):
        name = text[1:]
    elif _ID.fullmatch(text):
        return parse_id(text)
    else:
        name = text
    if callable(names):
        return names(name)
    if names and name in names:
        return names[name]
    raise ValueError(UNKNOWN_NAME)


def _parse_group_id(text: str) -> int:
    """Parse a group id typed as "3" or "g3", as /history spells groups."""
    if text[:1] in ("g", "G"):
        text = text[1:]
    return parse_id(text)


def parse_command(
    line: str,
    last_target: Target | None,
    names: Names = None,
) -> tuple[str, dict[str, Any]]:
    """Turn one typed line into `(action, args)` without side effects.

    Keeping the parser pure lets it be tested line by line and keeps the loop
    in `run_chat` a plain dispatch. The one outside call is `names`, when it
    is a callable that looks typed usernames up (see `resolve_user`); its
    ValueError or ChatError becomes an "error" action. Actions and their args:

    - "send": target (Target), body (str)
    - "select": target (Target), to change the default target only
    - "history": with (int) or group (int)
    - "groups", "help", "quit", "noop": no args
    - "newgroup": name (str), members (list of int)
    - "online": ids (list of int)
    - "error": message (str), for the user; nothing is sent
    """
    text = line.rstrip("\r\n")
    stripped = text.strip()
    if not stripped:
        return "noop", {}
    if stripped.startswith("//"):
        # An escaped slash: the text is a message that starts with "/".
        return _plain_text(stripped[1:], last_target)
    if not stripped.startswith("/"):
        return _plain_text(text, last_target)

    parts = stripped.split(None, 1)
    command = parts[0][1:].lower()
    rest = parts[1] if len(parts) > 1 else ""
    try:
        return _parse_slash_command(command, rest, names)
    except (ValueError, ChatError) as exc:
        return "error", {"message": str(exc)}


def _plain_text(body: str, last_target: Target | None) -> tuple[str, dict[str, Any]]:
    """Send plain text to the last target, or explain how to pick one."""
    if last_target is None:
        return "error", {
            "message": "no conversation yet: start one with /to <username|id> <text> "
            "or /group <gid> <text>"
        }
    return "send", {"target": last_target, "body": body}


def _parse_slash_command(
    command: str, rest: str, names: Names
) -> tuple[str, dict[str, Any]]:
    """Parse the arguments of one slash command; raise ValueError on bad input."""
    if command in ("to", "group"):
        bits = rest.split(None, 1)
        if not bits:
            raise ValueError(_USAGE[command])
        if command == "to":
            target = Target("to", resolve_user(bits[0], names))
        else:
            target = Target("group", _parse_group_id(bits[0]))
        if len(bits) == 1:
            return "select", {"target": target}
        return "send", {"target": target, "body": bits[1]}
    if command == "history":
        bits = rest.split()
        if len(bits) != 1:
            raise ValueError(_USAGE["history"])
        if bits[0][:1] in ("g", "G") and _ID.fullmatch(bits[0][1:]):
            return "history", {"group": parse_id(bits[0][1:])}
        return "history", {"with": resolve_user(bits[0], names)}
    if command == "groups":
        return "groups", {}
    if command == "newgroup":
        try:
            bits = shlex.split(rest)
        except ValueError as exc:
            raise ValueError(f"{_USAGE['newgroup']} ({exc})") from None
        if not bits or not bits[0].strip():
            raise ValueError(_USAGE["newgroup"])
        members = parse_user_list(" ".join(bits[1:]), names)
        return "newgroup", {"name": bits[0], "members": members}
    if command == "online":
        ids = parse_user_list(rest, names)
        if not ids:
            raise ValueError(_USAGE["online"])
        return "online", {"ids": ids}
    if command in ("help", "?"):
        return "help", {}
    if command in ("quit", "exit"):
        return "quit", {}
    raise ValueError(f"unknown command /{command}; type /help")


# ---------------------------------------------------------------------------
# Frames out (pure)
# ---------------------------------------------------------------------------


def new_cid() -> str:
    """Make a client id for one outgoing message.

    The server answers a repeated `cid` with the first message's id and stores
    nothing twice, so every distinct message needs its own (uuid4: 32 chars,
    within the contract's 1..64).
    """
    return uuid.uuid4().hex


def build_send_frame(target: Target, body: str, cid: str) -> dict[str, Any]:
    """Build the `send` frame for a message to a user or a group."""
    return {"type": "send", "cid": cid, target.kind: target.id, "body": body}


def build_ack_frame(seq: int) -> dict[str, Any]:
    """Build a cumulative ack: every inbox entry up to `seq` has been shown."""
    return {"type": "ack", "seq": seq}


# ---------------------------------------------------------------------------
# Formatting (pure)
# ---------------------------------------------------------------------------


def sanitize(text: str) -> str:
    """Escape control and bidi-override characters in text from other users.

    A message body is printed straight to a terminal; escape sequences in it
    could move the cursor, recolour or hide text.
    """
    return _UNSAFE_CHARS.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def format_time(ts: Any, tz: datetime.tzinfo | None = None) -> str:
    """Render a contract timestamp (ms since the epoch) as HH:MM:SS.

    `tz` defaults to the local zone; tests pass UTC to stay deterministic.
    """
    if isinstance(ts, bool) or not isinstance(ts, (int, float)):
        return "--:--:--"
    try:
        moment = datetime.datetime.fromtimestamp(ts / 1000, tz)
    except (OverflowError, OSError, ValueError):
        return "--:--:--"
    return moment.strftime("%H:%M:%S")


def format_body(body: Any) -> str:
    """Render a body safely, indenting continuation lines under the first."""
    text = sanitize(body if isinstance(body, str) else json.dumps(body))
    return text.replace("\n", "\n    ")


def _who(user_id: Any, me: int | None, name_of: NameOf | None = None) -> str:
    """Name a user as the lines show it: "me" for this user, else the username
    `name_of` gives for the id, else the id."""
    if me is not None and user_id == me:
        return "me"
    name = None
    if name_of is not None and isinstance(user_id, int) and not isinstance(user_id, bool):
        name = name_of(user_id)
    return sanitize(name if isinstance(name, str) and name else str(user_id))


def format_message(
    msg: dict[str, Any],
    me: int | None,
    tz: datetime.tzinfo | None = None,
    name_of: NameOf | None = None,
) -> str:
    """Render a message (live frame or history entry) as one readable line.

    `[12:01:03] bob -> me: hello`, `[12:01:04] bob -> group 3: hi`; the same
    form serves history, where `me -> bob` shows what this user sent. People
    are named by `name_of` (id -> username or None); unknown ones by id.
    """
    sender = _who(msg.get("from"), me, name_of)
    if msg.get("group") is not None:
        receiver = f"group {sanitize(str(msg['group']))}"
    else:
        receiver = _who(msg.get("to"), me, name_of)
    when = format_time(msg.get("ts"), tz)
    return f"[{when}] {sender} -> {receiver}: {format_body(msg.get('body', ''))}"


def format_sent(
    frame: dict[str, Any], target: Target | None = None, name_of: NameOf | None = None
) -> str:
    """Render a `sent` confirmation briefly: it only says the server has it."""
    where = f" to {target.describe(name_of)}" if target is not None else ""
    return f"  (sent #{frame.get('id')}{where})"


def format_error(
    frame: dict[str, Any], target: Target | None = None, name_of: NameOf | None = None
) -> str:
    """Render an `error` frame with its code and message.

    When the frame names a `cid` we sent, say which message was refused, since
    the error may arrive after the user typed more.
    """
    code = sanitize(str(frame.get("code", "error")))
    message = sanitize(str(frame.get("message", "")))
    if target is not None:
        return f"! not sent to {target.describe(name_of)}: {code}: {message}"
    suffix = f" (cid {sanitize(str(frame['cid']))})" if frame.get("cid") else ""
    return f"! error {code}: {message}{suffix}"


def format_ready(frame: dict[str, Any], username: str | None = None) -> str:
    """Render the `ready` frame: the connection is up and replay follows."""
    name = f"{sanitize(username)}, " if username else ""
    return (
        f"connected as {name}user {frame.get('user_id')}; "
        "type /help for commands"
    )


def format_frame(
    frame: dict[str, Any],
    me: int | None,
    tz: datetime.tzinfo | None = None,
    target: Target | None = None,
    name_of: NameOf | None = None,
) -> str | None:
    """Render any server frame as a line, or None for frames not worth showing.

    `target` is the conversation of the `cid` a `sent`/`error` answers, if known.
    """
    kind = frame.get("type")
    if kind == "message":
        return format_message(frame, me, tz, name_of)
    if kind == "sent":
        return format_sent(frame, target, name_of)
    if kind == "error":
        return format_error(frame, target, name_of)
    if kind == "ready":
        return format_ready(frame)
    if kind in ("pong", "ping"):
        return None
    return f"? unknown frame type {sanitize(str(kind))!r}"


def format_group(
    group: dict[str, Any], me: int | None = None, name_of: NameOf | None = None
) -> str:
    """Render a group as `#3 name (owner me): members me, bob, 5`."""
    members = ", ".join(_who(m, me, name_of) for m in group.get("members", []))
    return (
        f"#{group.get('id')} {sanitize(str(group.get('name', '')))} "
        f"(owner {_who(group.get('owner'), me, name_of)}): members {members}"
    )


def format_presence(online: dict[str, Any], name_of: NameOf | None = None) -> str:
    """Render GET /api/presence's `online` map as `bob online, 2 offline`."""
    if not online:
        return "(nobody asked about)"
    return ", ".join(
        f"{_who(int(uid) if _ID.fullmatch(str(uid)) else uid, None, name_of)} "
        f"{'online' if up else 'offline'}"
        for uid, up in online.items()
    )


def describe_close(code: Any, reason: Any) -> tuple[str, int]:
    """Explain why the server's side of the socket closed, with an exit status.

    4001 `replaced` is the contract's "you connected elsewhere"; every other
    close ends the session unexpectedly and exits non-zero.
    """
    reason_text = f" ({sanitize(str(reason))})" if reason else ""
    if isinstance(code, int):
        code = int(code)  # simple-websocket hands out CloseReason enum members
    if code == CLOSE_REPLACED:
        return "replaced by another connection", EXIT_REPLACED
    if code == 1001:
        return f"server is going away{reason_text}", EXIT_FAILURE
    if code == 1009:
        return f"frame too large for the server{reason_text}", EXIT_FAILURE
    if code in (None, 1005, 1006):
        return f"connection lost{reason_text}", EXIT_FAILURE
    return f"connection closed by the server: {code}{reason_text}", EXIT_FAILURE


# ---------------------------------------------------------------------------
# Inbox bookkeeping (pure state)
# ---------------------------------------------------------------------------


class InboxTracker:
    """Decide, per `message` frame, whether to show it and what to ack.

    At least once delivery means a message may come again (a replay of what
    was not acked); the contract says clients drop duplicates by `id`. Acks
    are cumulative, so only a `seq` above the last acked one is worth sending.
    Not thread-safe: only the reader thread uses it.
    """

    def __init__(self, memory: int = 10000) -> None:
        self.acked = 0
        self._memory = memory
        # Ids shown so far, oldest first, capped at `memory` entries so a long
        # session does not grow without bound; ids grow with time, so old ones
        # are the least likely to repeat.
        self._seen: collections.OrderedDict[Any, None] = collections.OrderedDict()

    def accept(self, frame: dict[str, Any]) -> tuple[bool, int | None]:
        """Return (show it?, seq to ack or None) for one `message` frame."""
        message_id = frame.get("id")
        fresh = message_id is None or message_id not in self._seen
        if fresh and message_id is not None:
            self._seen[message_id] = None
            if len(self._seen) > self._memory:
                self._seen.popitem(last=False)
        seq = frame.get("seq")
        if isinstance(seq, int) and not isinstance(seq, bool) and seq > self.acked:
            self.acked = seq
            return fresh, seq
        return fresh, None


# ---------------------------------------------------------------------------
# HTTP (urllib only)
# ---------------------------------------------------------------------------


def normalize_base_url(base_url: str) -> str:
    """Give a bare `host:port` a scheme and drop a trailing slash."""
    if "://" not in base_url:
        base_url = "http://" + base_url
    return base_url.rstrip("/")


def api_url(base_url: str, path: str, query: dict[str, Any] | None = None) -> str:
    """Join the base URL, an API path and a query (commas left readable)."""
    url = normalize_base_url(base_url) + path
    if query:
        url += "?" + urllib.parse.urlencode(query, safe=",")
    return url


def ws_url(base_url: str, token: str) -> str:
    """Derive the WebSocket URL `ws[s]://host/ws?token=...` from the base URL.

    The token goes in the query because the contract accepts it there and
    simple-websocket's client is meant to send no custom headers.
    """
    parts = urllib.parse.urlsplit(normalize_base_url(base_url))
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(
        parts.scheme.lower()
    )
    if scheme is None:
        raise ChatError(f"unsupported URL scheme {parts.scheme!r}; use http or https")
    query = urllib.parse.urlencode({"token": token})
    path = parts.path + "/ws"
    return urllib.parse.urlunsplit((scheme, parts.netloc, path, query, ""))


def parse_error_body(status: int, raw: bytes, reason: str = "") -> ApiError:
    """Build an ApiError from an error answer, envelope or not.

    The contract promises `{"error": {"code", "message"}}`, but a proxy or a
    crash may answer HTML; the user still gets the status and some text.
    """
    try:
        data = json.loads(raw.decode("utf-8")) if raw else None
    except (UnicodeDecodeError, ValueError):
        data = None
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        error = data["error"]
        return ApiError(
            status,
            sanitize(str(error.get("code", f"http_{status}"))),
            sanitize(str(error.get("message", reason))),
        )
    text = raw.decode("utf-8", "replace").strip()[:200] if raw else reason
    return ApiError(status, f"http_{status}", sanitize(text or reason))


class Api:
    """Call the HTTP half of the contract with urllib.

    Each call is its own request and changes nothing on the object, so the
    main loop (commands) and the reader thread (`UserDirectory` naming the
    senders of incoming messages) share one.
    """

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 10.0):
        self.base_url = normalize_base_url(base_url)
        self.token = token
        self.timeout = timeout

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: dict[str, Any] | None = None,
    ) -> Any:
        """Send one request and return the decoded JSON answer (None if empty).

        Raises ApiError for an error status and ChatError when the server
        cannot be reached or answers something that is not JSON.
        """
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        url = api_url(self.base_url, path, query)
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        logger.debug("http %s %s", method, path)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            try:
                raw_error = exc.read()
            finally:
                exc.close()
            raise parse_error_body(exc.code, raw_error, str(exc.reason)) from None
        except urllib.error.URLError as exc:
            raise ChatError(f"cannot reach {self.base_url}: {exc.reason}") from None
        except OSError as exc:
            raise ChatError(f"cannot reach {self.base_url}: {exc}") from None
        if not raw:
            return None
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise ChatError(f"{method} {path}: the server answered non-JSON") from None


def login(base_url: str, username: str, password: str, timeout: float = 10.0) -> dict:
    """Exchange a username and password for a token (POST /api/tokens)."""
    return Api(base_url, timeout=timeout).call(
        "POST", "/api/tokens", {"username": username, "password": password}
    )


class UserDirectory:
    """Name people: usernames to ids and back, asked of the server once each.

    The contract names people by id only; this server adds GET /api/users/<id>
    and GET /api/users?username=<name> (both answer `{"id", "username"}`, 404
    for nobody). Usernames never change, so answers are kept for the session,
    both ways. A failed id lookup leaves the id on screen: after a 404 it is
    not asked again, after any other failure not before `retry_after` seconds.

    The main loop resolves typed names (`id_for`) and the reader thread names
    senders (`name_for`), so the maps are guarded by a lock, never held during
    a request (two threads may ask for the same id at once; both answers agree).
    """

    def __init__(
        self,
        api: Any,
        retry_after: float = NAME_RETRY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._api = api
        self._retry_after = retry_after
        self._clock = clock
        # Guards the three maps below.
        self._lock = threading.Lock()
        self._names: dict[int, str] = {}
        self._ids: dict[str, int] = {}
        # id -> clock time before which not to ask again (math.inf after a 404).
        self._failed: dict[int, float] = {}

    def remember(self, user_id: Any, username: Any) -> None:
        """Record that `user_id` is `username` (an answer, or /api/me)."""
        if not _is_id(user_id) or not isinstance(username, str) or not username:
            return
        with self._lock:
            self._names[user_id] = username
            self._ids[username] = user_id
            self._failed.pop(user_id, None)

    def known_name(self, user_id: Any) -> str | None:
        """Return the cached username of `user_id`, asking nobody."""
        with self._lock:
            return self._names.get(user_id)

    def name_for(self, user_id: Any) -> str | None:
        """Return the username of `user_id`, looking it up once; None if unknown.

        Never raises: a name is cosmetic, and this runs in the reader thread,
        which must not die over one.
        """
        if not _is_id(user_id):
            return None
        with self._lock:
            if user_id in self._names:
                return self._names[user_id]
            if self._clock() < self._failed.get(user_id, -math.inf):
                return None
        try:
            answer = self._api.call("GET", f"/api/users/{user_id}")
        except ApiError as exc:
            self._failed_lookup(user_id, math.inf if exc.status == 404 else None)
            logger.debug("no name for user_id=%s: %s", user_id, exc)
            return None
        except Exception:  # noqa: BLE001 - see the docstring
            self._failed_lookup(user_id, None)
            logger.warning("name lookup for user_id=%s failed", user_id, exc_info=True)
            return None
        if (not isinstance(answer, dict) or answer.get("id") != user_id
                or not isinstance(answer.get("username"), str) or not answer["username"]):
            self._failed_lookup(user_id, None)
            logger.warning("unexpected answer to the name lookup of user_id=%s", user_id)
            return None
        self.remember(user_id, answer["username"])
        return answer["username"]

    def _failed_lookup(self, user_id: int, until: float | None) -> None:
        with self._lock:
            self._failed[user_id] = (
                until if until is not None else self._clock() + self._retry_after
            )

    def id_for(self, name: str) -> int:
        """Return the id of the user called exactly `name`, looking it up once.

        Raises ValueError (shown to the user) for a malformed or unknown name,
        and ChatError when the server cannot answer.
        """
        if not _USERNAME.fullmatch(name):
            raise ValueError(f"not a user id or username: {sanitize(name)!r}")
        with self._lock:
            if name in self._ids:
                return self._ids[name]
        try:
            answer = self._api.call("GET", "/api/users", query={"username": name})
        except ApiError as exc:
            if exc.status == 404:
                raise ValueError(f"{exc.code}: {exc.message}: {name}") from None
            raise
        if not isinstance(answer, dict) or not _is_id(answer.get("id")):
            raise ChatError(f"unexpected answer to the lookup of user {name}")
        username = answer.get("username")
        self.remember(answer["id"], username if isinstance(username, str) else name)
        with self._lock:
            self._ids[name] = answer["id"]
        return answer["id"]


def _is_id(value: Any) -> bool:
    """Tell whether `value` is a contract id (a positive int, not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


# ---------------------------------------------------------------------------
# The WebSocket session
# ---------------------------------------------------------------------------


class Console:
    """Write whole lines to the output stream from any thread.

    The reader thread prints incoming frames while the main thread prints
    command results; the lock keeps their lines from interleaving.
    """

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        # Serializes writes to `_stream` so each line lands whole.
        self._lock = threading.Lock()

    def line(self, text: str) -> None:
        """Print one line and flush, so a pipe reader sees it at once."""
        with self._lock:
            try:
                self._stream.write(text + "\n")
            except UnicodeEncodeError:
                encoding = getattr(self._stream, "encoding", None) or "ascii"
                safe = text.encode(encoding, "replace").decode(encoding)
                self._stream.write(safe + "\n")
            flush = getattr(self._stream, "flush", None)
            if flush is not None:
                flush()


class ChatSession:
    """Own one WebSocket: send frames, and read, print and ack in a thread.

    It guarantees that after `stop()` returns the socket is closed and the
    reader thread has ended (or is a daemon about to end on its next wake-up).
    """

    def __init__(
        self,
        ws: Any,
        console: Console,
        me: int | None = None,
        username: str | None = None,
        tz: datetime.tzinfo | None = None,
        ping_interval: float = 25.0,
        poll_interval: float = 0.25,
        on_close: Callable[[], None] | None = None,
        names: UserDirectory | None = None,
    ) -> None:
        self.ws = ws
        self.console = console
        # Names the people in printed lines (looked up lazily, from this
        # thread); without it they are shown by id.
        self.names = names
        self.name_of: NameOf | None = names.name_for if names is not None else None
        # Set once by the reader from `ready` (also seeded from /api/me); read
        # by the main thread only after `ready` is set, so no lock is needed.
        self.me = me
        self.username = username
        self.tz = tz
        self.ping_interval = ping_interval
        self.poll_interval = poll_interval
        self._on_close = on_close
        self.inbox = InboxTracker()
        # Set when the server's `ready` frame arrived (or the session ended).
        self.ready = threading.Event()
        # Set when the connection is gone, whoever closed it.
        self.closed = threading.Event()
        # Set by `stop()`: a close seen after it is ours, not the server's.
        self._stopping = threading.Event()
        # Serializes our writes to the socket: the reader thread acks and pings
        # while the main thread sends messages (simple-websocket's send is not
        # thread-safe).
        self._send_lock = threading.Lock()
        # Guards `_pending` (cid -> Target of messages without `sent`/`error`
        # yet), written by both threads; `stop()` waits on it to drain.
        self._pending_cond = threading.Condition()
        self._pending: dict[str, Target] = {}
        # Written by the reader thread before it sets `closed`; read after.
        self.close_code: Any = None
        self.close_reason: Any = None
        self._last_sent = time.monotonic()
        self._thread = threading.Thread(
            target=self._read_loop, name="imserver-chat-reader", daemon=True
        )

    def start(self) -> None:
        """Start the reader thread."""
        self._thread.start()

    # -- sending ----------------------------------------------------------

    def send_frame(self, frame: dict[str, Any]) -> bool:
        """Send one frame; return False if the connection is gone.

        A send can fail at any moment the server drops us; the reader thread
        sees the close and reports why, so here it is enough to say so.
        """
        text = json.dumps(frame)
        with self._send_lock:
            try:
                self.ws.send(text)
            except (simple_websocket.ConnectionClosed, OSError) as exc:
                logger.debug("send failed: %s", exc)
                return False
            self._last_sent = time.monotonic()
        logger.debug("sent frame type=%s", frame.get("type"))
        return True

    def send_message(self, target: Target, body: str) -> str | None:
        """Send a message with a fresh cid; return the cid, or None if not sent."""
        cid = new_cid()
        with self._pending_cond:
            self._pending[cid] = target
        if not self.send_frame(build_send_frame(target, body, cid)):
            self._resolve(cid)
            return None
        return cid

    def pending_count(self) -> int:
        """Count messages the server has neither confirmed nor refused yet."""
        with self._pending_cond:
            return len(self._pending)

    def wait_pending(self, timeout: float) -> int:
        """Wait until every sent message is answered, the socket closes, or timeout.

        Quitting right after typing should not lose the `sent` answer (or an
        error) for the last line; returns how many are still unanswered.
        """
        deadline = time.monotonic() + timeout
        with self._pending_cond:
            while self._pending and not self.closed.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._pending_cond.wait(remaining)
            return len(self._pending)

    def _pending_target(self, cid: Any) -> Target | None:
        """Look up the target of a pending cid without forgetting it."""
        if not isinstance(cid, str):
            return None
        with self._pending_cond:
            return self._pending.get(cid)

    def _resolve(self, cid: Any) -> Target | None:
        """Forget a pending cid, returning its target if it was ours."""
        if not isinstance(cid, str):
            return None
        with self._pending_cond:
            target = self._pending.pop(cid, None)
            self._pending_cond.notify_all()
        return target

    # -- receiving ----------------------------------------------------------

    def handle_text(self, text: Any) -> None:
        """Print one incoming frame and do what it asks (ack, pong, bookkeeping)."""
        if not isinstance(text, str):
            self.console.line("? binary frame ignored")
            return
        try:
            frame = json.loads(text)
        except ValueError:
            frame = None
        if not isinstance(frame, dict):
            logger.warning("unreadable frame from server")
            self.console.line("? unreadable frame from the server")
            return
        kind = frame.get("type")
        logger.debug("received frame type=%s", kind)
        if kind == "message":
            show, ack = self.inbox.accept(frame)
            if show:
                # The sender's name may need a lookup: in order, before the ack.
                self.console.line(format_message(frame, self.me, self.tz, self.name_of))
            # Ack after printing: the ack promises the entry has been shown.
            if ack is not None:
                self.send_frame(build_ack_frame(ack))
            return
        if kind == "ready":
            if isinstance(frame.get("user_id"), int):
                self.me = frame["user_id"]
            # Printed here, not by the main thread, so that it comes before
            # the replayed inbox entries that follow `ready` on the wire.
            self.console.line(format_ready(frame, self.username))
            self.ready.set()
            return
        if kind == "ping":
            self.send_frame({"type": "pong"})
            return
        answers = kind in ("sent", "error")
        target = self._pending_target(frame.get("cid")) if answers else None
        line = format_frame(frame, self.me, self.tz, target, self.name_of)
        if line is not None:
            self.console.line(line)
        if answers:
            # Resolve only after printing, so whoever waits in wait_pending()
            # prints its own lines after this answer, not before.
            self._resolve(frame.get("cid"))

    def _read_loop(self) -> None:
        """Receive until the socket closes, heartbeating while idle."""
        try:
            while True:
                try:
                    data = self.ws.receive(timeout=self.poll_interval)
                except simple_websocket.ConnectionClosed as exc:
                    self._finish(exc.reason, exc.message)
                    return
                if data is not None:
                    self.handle_text(data)
                elif self._stopping.is_set():
                    self._finish(None, None)
                    return
                self._heartbeat()
        except Exception:
            # A reader that dies silently would leave the user typing into a
            # dead session; log, record, and let the main loop end it.
            logger.exception("chat reader failed")
            self._finish(1011, "client reader failed")

    def _heartbeat(self) -> None:
        """Send an application ping when we have been quiet for ping_interval.

        The server closes connections from which nothing arrives for
        IDLE_TIMEOUT; a `ping` frame counts as something on any server.
        """
        if self.ping_interval and not self._stopping.is_set():
            if time.monotonic() - self._last_sent >= self.ping_interval:
                self.send_frame({"type": "ping"})

    def _finish(self, code: Any, reason: Any) -> None:
        """Record why the connection ended and wake everyone waiting on it."""
        self.close_code = code
        self.close_reason = reason
        logger.info("chat connection closed code=%s", code)
        self.closed.set()
        self.ready.set()
        with self._pending_cond:
            self._pending_cond.notify_all()
        if self._on_close is not None:
            self._on_close()

    def closed_by_server(self) -> bool:
        """Tell whether the connection ended without our asking."""
        return self.closed.is_set() and not self._stopping.is_set()

    def stop(self, join_timeout: float = 2.0) -> None:
        """Close the socket (idempotent) and wait briefly for the reader to end."""
        self._stopping.set()
        with self._send_lock:
            try:
                self.ws.close()
            except (simple_websocket.ConnectionClosed, OSError) as exc:
                logger.debug("close: %s", exc)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(join_timeout)


# ---------------------------------------------------------------------------
# The interactive loop
# ---------------------------------------------------------------------------

_EOF = object()
_CLOSED = object()


def _read_lines(stdin: Any, events: "queue.Queue[Any]") -> None:
    """Feed typed lines into `events`, then `_EOF`; runs in a daemon thread.

    Reading stdin in its own thread lets the main loop notice a server close
    while the user is idle, which a blocking readline() would hide. A plain
    readline() (no readline module) leaves line editing to the terminal and
    never changes the terminal's modes, so exiting mid-line is harmless.
    """
    try:
        for line in iter(stdin.readline, ""):
            events.put(line)
    except (OSError, ValueError) as exc:
        # ValueError: the stream was closed under us.
        logger.debug("input ended: %s", exc)
    finally:
        events.put(_EOF)


def _run_action(
    action: str,
    args: dict[str, Any],
    session: ChatSession,
    api: Any,
    console: Console,
) -> None:
    """Carry out one parsed command that is neither a send nor a quit."""
    me = session.me
    name_of = session.name_of
    if action == "history":
        if "group" in args:
            query = {"group": args["group"], "limit": HISTORY_LIMIT}
            title = f"history of group {args['group']}"
        else:
            query = {"with": args["with"], "limit": HISTORY_LIMIT}
            title = f"history with {Target('to', args['with']).describe(name_of)}"
        answer = api.call("GET", "/api/messages", query=query)
        if not isinstance(answer, dict):
            answer = {}
        messages = answer.get("messages") or []
        more = " (older messages exist)" if answer.get("has_more") else ""
        console.line(f"-- {title}{more}")
        for msg in messages:
            console.line(format_message(msg, me, session.tz, name_of))
        if not messages:
            console.line("(no messages)")
        console.line("--")
    elif action == "groups":
        answer = api.call("GET", "/api/groups")
        groups = answer.get("groups", []) if isinstance(answer, dict) else []
        for group in groups:
            console.line(format_group(group, me, name_of))
        if not groups:
            console.line("(no groups)")
    elif action == "newgroup":
        group = api.call(
            "POST", "/api/groups", {"name": args["name"], "members": args["members"]}
        )
        if isinstance(group, dict):
            console.line("created " + format_group(group, me, name_of))
        else:
            console.line(f"created group {sanitize(args['name'])}")
    elif action == "online":
        ids = ",".join(str(i) for i in args["ids"])
        answer = api.call("GET", "/api/presence", query={"ids": ids})
        online = answer.get("online", {}) if isinstance(answer, dict) else {}
        console.line(format_presence(online, name_of))
    elif action == "help":
        console.line(HELP)
    elif action == "error":
        console.line("! " + args["message"])


def run_chat(
    base_url: str,
    token: str,
    stdin: Any = None,
    stdout: Any = None,
    *,
    connect: Callable[[str], Any] | None = None,
    api: Any = None,
    tz: datetime.tzinfo | None = None,
    ready_timeout: float = 10.0,
    drain_timeout: float = 5.0,
    ping_interval: float = 25.0,
) -> int:
    """Run an interactive chat on the given streams and return an exit status.

    Streams are injected so a test can drive the client: `stdin` needs only
    `readline()` (returning "" at the end), `stdout` only `write()`. Input ends
    with /quit or end of input; the function then waits up to `drain_timeout`
    for the server to answer the messages already sent, closes the socket and
    returns EXIT_OK. A close by the server returns EXIT_REPLACED for 4001 and
    EXIT_FAILURE otherwise. `connect` and `api` replace the WebSocket factory
    and the HTTP client in tests.
    """
    stdin = sys.stdin if stdin is None else stdin
    console = Console(sys.stdout if stdout is None else stdout)
    api = api if api is not None else Api(base_url, token)
    connect = connect if connect is not None else simple_websocket.Client.connect

    # Check the token over HTTP first: it gives a clear 401 message and our
    # own username.
    names = UserDirectory(api)
    try:
        me_info = api.call("GET", "/api/me")
        url = ws_url(base_url, token)
    except ChatError as exc:
        console.line(f"! cannot start: {exc}")
        return EXIT_FAILURE
    me = me_info.get("id") if isinstance(me_info, dict) else None
    username = me_info.get("username") if isinstance(me_info, dict) else None
    names.remember(me, username)

    try:
        ws = connect(url)
    except simple_websocket.ConnectionError as exc:
        _close_abandoned_sockets(exc)
        console.line(f"! WebSocket refused (HTTP {exc.status_code})")
        return EXIT_FAILURE
    except OSError as exc:
        _close_abandoned_sockets(exc)
        console.line(f"! cannot connect the WebSocket: {exc}")
        return EXIT_FAILURE

    # One queue feeds the main loop: typed lines, end of input, and the
    # reader's "connection closed", so the loop wakes for whichever comes first.
    events: "queue.Queue[Any]" = queue.Queue()
    session = ChatSession(
        ws,
        console,
        me=me,
        username=username,
        tz=tz,
        ping_interval=ping_interval,
        on_close=lambda: events.put(_CLOSED),
        names=names,
    )
    session.start()
    try:
        return _interact(
            session, api, console, stdin, events, names, ready_timeout, drain_timeout
        )
    finally:
        session.stop()


def _close_abandoned_sockets(exc: BaseException) -> None:
    """Close the socket a failed `Client.connect` leaves open.

    simple-websocket raises from its constructor (refused handshake, refused
    TCP connect) without closing the socket it made, which would surface later
    as a ResourceWarning; the socket is only reachable through the traceback.
    """
    tb = exc.__traceback__
    while tb is not None:
        frame_locals = tb.tb_frame.f_locals
        owner = frame_locals.get("self")
        for candidate in (frame_locals.get("sock"), getattr(owner, "sock", None)):
            if isinstance(candidate, socket.socket):
                candidate.close()
        tb = tb.tb_next


def _interact(
    session: ChatSession,
    api: Any,
    console: Console,
    stdin: Any,
    events: "queue.Queue[Any]",
    names: UserDirectory,
    ready_timeout: float,
    drain_timeout: float,
) -> int:
    """Wait for `ready`, then dispatch typed lines until quit or a close."""
    try:
        # The server replays the offline inbox right after `ready`; waiting
        # for it keeps "connected" first in the output, before any reply.
        if not session.ready.wait(ready_timeout):
            console.line("! no ready frame from the server yet; carrying on")
        if session.closed.is_set():
            return _report_close(session, console)
        reader = threading.Thread(
            target=_read_lines,
            args=(stdin, events),
            name="imserver-chat-input",
            daemon=True,
        )
        reader.start()
        last_target: Target | None = None
        while True:
            item = events.get()
            if item is _CLOSED or session.closed.is_set():
                return _report_close(session, console)
            if item is _EOF:
                break
            action, args = parse_command(item, last_target, names.id_for)
            if action == "quit":
                break
            if action in ("send", "select"):
                last_target = args["target"]
            if action == "select":
                console.line(f"now talking to {last_target.describe(names.name_for)}")
            elif action == "send":
                if session.send_message(args["target"], args["body"]) is None:
                    # The reader thread is about to see the close and say why.
                    session.closed.wait(session.poll_interval * 4)
                    return _report_close(session, console)
            elif action != "noop":
                try:
                    _run_action(action, args, session, api, console)
                except ChatError as exc:
                    console.line(f"! {exc}")
        left = session.wait_pending(drain_timeout)
    except KeyboardInterrupt:
        console.line("")
        left = session.pending_count()
    if session.closed_by_server():
        return _report_close(session, console)
    if left:
        console.line(f"! {left} message(s) not confirmed by the server")
    console.line("bye")
    return EXIT_OK


def _report_close(session: ChatSession, console: Console) -> int:
    """Print why the server ended the session and return the exit status."""
    text, status = describe_close(session.close_code, session.close_reason)
    console.line(("! " if status else "") + text)
    return status


# ---------------------------------------------------------------------------
# The click command
# ---------------------------------------------------------------------------


@click.command("chat")
@click.option(
    "--url",
    default=DEFAULT_URL,
    show_default=True,
    envvar="IMSERVER_URL",
    help="Server base URL (env IMSERVER_URL).",
)
@click.option(
    "--user", "username", metavar="NAME", help="Log in as NAME (asks the password)."
)
@click.option(
    "--token",
    envvar="IMSERVER_TOKEN",
    help="Use this token instead of logging in (env IMSERVER_TOKEN).",
)
def chat_command(url: str, username: str | None, token: str | None) -> None:
    """Chat from the terminal: send, receive and browse messages.

    Logs in (or uses a token), opens the WebSocket and reads commands from
    stdin; type /help once connected.
    """
    if not token:
        if not username:
            raise click.UsageError("give --user NAME, or --token / IMSERVER_TOKEN")
        password = click.prompt(f"Password for {username}", hide_input=True)
        try:
            answer = login(url, username, password)
        except ChatError as exc:
            raise click.ClickException(f"login failed: {exc}") from None
        token = answer.get("token") if isinstance(answer, dict) else None
        if not token:
            raise click.ClickException("login failed: no token in the answer")
    status = run_chat(url, token, sys.stdin, sys.stdout)
    if status:
        raise SystemExit(status)
