"""The admin API, for users with the admin flag (``imserver admin grant USER``).

``GET /api/admin/stats``: connections per worker (each worker's
``ConnManager.count()``) and the total. ``POST /api/admin/users/<id>/kick``:
the Go ``CloseAndDeleteConn`` for one user, wherever the user is connected.
"""

import logging

from flask import Blueprint
from flask import g

from imserver.auth import token_required
from imserver.errors import Forbidden
from imserver.errors import NotFound
from imserver.hub import current_hub

logger = logging.getLogger(__name__)

bp = Blueprint("admin", __name__, url_prefix="/api/admin")


@bp.before_request
@token_required
def require_admin():
    """Refuse everyone but admins, with 403."""
    user = current_hub().store.get_user(g.user_id)
    if user is None or not user["is_admin"]:
        logger.warning("refused admin call user_id=%s", g.user_id)
        raise Forbidden("admins only")


@bp.get("/stats")
def stats():
    """Show the connections of every worker."""
    workers = current_hub().broker.stats()
    return {"workers": workers, "connections": sum(w["connections"] for w in workers)}


@bp.post("/users/<int:user_id>/kick")
def kick(user_id):
    """Close a user's connection with a close frame, wherever it is."""
    if not current_hub().broker.kick(user_id, 1000, "kicked"):
        raise NotFound(f"user {user_id} is not connected")
    logger.info("kicked user_id=%s by admin user_id=%s", user_id, g.user_id)
    return "", 204
