"""Groups over HTTP: create, list mine, show one, add and remove members.

A group is ``{"id", "name", "owner", "members": [ids, ascending]}``. The
caller of ``POST /api/groups`` is its owner and always a member; only the
owner adds members; the owner removes anyone, a member removes itself.
"""

from flask import Blueprint
from flask import current_app
from flask import g

from imserver.auth import token_required
from imserver.errors import Forbidden
from imserver.errors import Invalid
from imserver.errors import NotFound
from imserver.http_util import json_body
from imserver.hub import current_hub
from imserver.protocol import MAX_ID
from imserver.protocol import is_id
from imserver.store import check_name

bp = Blueprint("groups", __name__, url_prefix="/api/groups")

# Ids in paths: past a 64-bit column they are unknown (404), never a database error.
_ID = f"int(max={MAX_ID})"


def _max_members() -> int:
    return current_app.config["MAX_GROUP_MEMBERS"]


@bp.post("")
@token_required
def create_group():
    """Create a group owned by the caller."""
    data = json_body()
    name = check_name(data.get("name"))
    members = data.get("members", [])
    if not isinstance(members, list) or not all(is_id(m) for m in members):
        raise Invalid("'members' must be a list of user ids")
    if len(members) > 10 * _max_members():
        raise Invalid("too many members")
    group = current_hub().store.create_group(g.user_id, name, members, _max_members())
    return group, 201


@bp.get("")
@token_required
def list_groups():
    """List the caller's groups."""
    return {"groups": current_hub().store.groups_of(g.user_id)}


@bp.get(f"/<{_ID}:group_id>")
@token_required
def show_group(group_id):
    """Show one group to one of its members."""
    group = current_hub().store.get_group(group_id)
    if group is None:
        raise NotFound(f"no group {group_id}")
    if g.user_id not in group["members"]:
        raise Forbidden("you are not a member of this group")
    return group


@bp.post(f"/<{_ID}:group_id>/members")
@token_required
def add_member(group_id):
    """Add a member; the owner only."""
    user_id = json_body().get("user_id")
    if not is_id(user_id):
        raise Invalid("'user_id' must be a user id")
    current_hub().store.add_member(group_id, g.user_id, user_id, _max_members())
    return "", 204


@bp.delete(f"/<{_ID}:group_id>/members/<{_ID}:user_id>")
@token_required
def remove_member(group_id, user_id):
    """Remove a member: the owner removes anyone, a member itself."""
    current_hub().store.remove_member(group_id, g.user_id, user_id)
    return "", 204
