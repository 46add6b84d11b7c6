"""Accounts and tokens: ``POST /api/users``, ``POST /api/tokens``, ``GET /api/me``."""

import logging

from flask import Blueprint
from flask import g

from imserver.auth import check_credentials_shape
from imserver.auth import hash_password
from imserver.auth import issue_token
from imserver.auth import token_required
from imserver.auth import verify_password
from imserver.errors import BadCredentials
from imserver.errors import Invalid
from imserver.errors import NotFound
from imserver.http_util import json_body
from imserver.hub import current_hub

logger = logging.getLogger(__name__)

bp = Blueprint("accounts", __name__, url_prefix="/api")


@bp.post("/users")
def register():
    """Create an account."""
    username, password = check_credentials_shape(json_body())
    user = current_hub().store.create_user(username, hash_password(password))
    logger.info("registered user_id=%s", user["id"])
    return user, 201


@bp.post("/tokens")
def login():
    """Exchange a username and password for a signed token."""
    try:
        username, password = check_credentials_shape(json_body())
    except Invalid:
        # A malformed login is a failed login: no hint about the rules.
        raise BadCredentials() from None
    row = current_hub().store.find_user(username)
    if not verify_password(row[2] if row else None, password):
        logger.info("login failed")
        raise BadCredentials()
    token, expires_at = issue_token(row[0])
    return {"token": token, "user_id": row[0], "expires_at": expires_at}


@bp.get("/me")
@token_required
def me():
    """Show the signed-in user."""
    user = current_hub().store.get_user(g.user_id)
    if user is None:
        raise NotFound("no such user")
    return {"id": user["id"], "username": user["username"]}
