"""Messages over HTTP and presence.

``POST /api/messages`` goes the same way as a WebSocket ``send``
(``delivery.submit``) and answers 201 only after the commit;
``GET /api/messages`` pages through the history of a conversation;
``GET /api/presence`` asks the broker who is online.
"""

from flask import Blueprint
from flask import g
from flask import request

from imserver import delivery
from imserver.auth import token_required
from imserver.errors import BadFrame
from imserver.errors import Forbidden
from imserver.errors import Invalid
from imserver.errors import NotFound
from imserver.http_util import id_list
from imserver.http_util import json_body
from imserver.http_util import query_int
from imserver.hub import current_hub
from imserver.protocol import MAX_CID_CHARS
from imserver.protocol import is_text

bp = Blueprint("messages", __name__, url_prefix="/api")

# Seconds an HTTP send waits for its commit before answering 503.
COMMIT_WAIT = 30


@bp.post("/messages")
@token_required
def post_message():
    """Send a message to a user or a group; 201 once it is stored."""
    data = json_body()
    to = data.get("to")
    if to is None and "to" in request.args:
        to = query_int("to")
    cid = data.get("cid")
    if cid is not None and not (isinstance(cid, str) and 1 <= len(cid) <= MAX_CID_CHARS
                                and is_text(cid)):
        raise BadFrame("'cid' must be a string of 1 to 64 characters")
    pending = delivery.submit(current_hub(), g.user_id, data.get("body"), cid, to=to,
                             group=data.get("group"))
    return pending.result(COMMIT_WAIT).message, 201


@bp.get("/messages")
@token_required
def get_messages():
    """Page through a conversation, newest ``limit`` below ``before``, ascending."""
    store = current_hub().store
    before = query_int("before")
    limit = query_int("limit", default=50, high=100)
    with_id = query_int("with")
    group_id = query_int("group")
    if (with_id is None) == (group_id is None):
        raise Invalid("exactly one of 'with' and 'group' is required")
    if with_id is not None:
        messages, has_more = store.history_direct(g.user_id, with_id, before, limit)
    else:
        member = store.is_member(group_id, g.user_id)
        if member is None:
            raise NotFound(f"no group {group_id}")
        if not member:
            raise Forbidden("you are not a member of this group")
        messages, has_more = store.history_group(group_id, before, limit,
                                                 member=g.user_id)
    return {"messages": messages, "has_more": has_more}


@bp.get("/presence")
@token_required
def presence():
    """Tell which of the given users are online."""
    ids = id_list(request.args.get("ids", ""), "ids")
    online = current_hub().broker.online(ids)
    return {"online": {str(user_id): bool(online[user_id]) for user_id in ids}}
