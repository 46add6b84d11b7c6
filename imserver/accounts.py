"""Accounts and tokens: ``POST /api/users``, ``POST /api/tokens``, ``GET /api/me``."""

import logging

from flask import Blueprint
from flask import g
from flask import request

from imserver.auth import USERNAME_RE
from imserver.auth import check_credentials_shape
from imserver.auth import hash_password
from imserver.auth import issue_token
from imserver.auth import token_required
from imserver.auth import verify_password
from imserver.errors import BadCredentials
from imserver.errors import Invalid
from imserver.errors import NotFound
from imserver.errors import RateLimited
from imserver.http_util import json_body
from imserver.hub import current_hub
from imserver.protocol import MAX_ID

logger = logging.getLogger(__name__)

bp = Blueprint("accounts", __name__, url_prefix="/api")


def _limit_attempts() -> None:
    """Refuse with 429 a client address making too many attempts.

    Guards registration and login against password guessing and mass sign-up.
    """
    hub = current_hub()
    if not hub.auth_limiter.allow(request.remote_addr):
        logger.warning("refused auth attempt addr=%s: too many", request.remote_addr)
        raise RateLimited("too many attempts, try again later")


@bp.post("/users")
def register():
    """Create an account."""
    _limit_attempts()
    username, password = check_credentials_shape(json_body())
    user = current_hub().store.create_user(username, hash_password(password))
    logger.info("registered user_id=%s", user["id"])
    return user, 201


@bp.post("/tokens")
def login():
    """Exchange a username and password for a signed token."""
    _limit_attempts()
    try:
        username, password = check_credentials_shape(json_body())
    except Invalid:
        # A malformed login is a failed login: no hint about the rules.
        raise BadCredentials() from None
    hub = current_hub()
    if not hub.login_failures.allow(username, cost=0):
        # This username has failed too often lately: guessing, not typing.
        logger.warning("refused login user=%s: too many failures", username)
        raise RateLimited("too many failed logins, try again later")
    row = hub.store.find_user(username)
    if not verify_password(row[2] if row else None, password):
        hub.login_failures.allow(username)
        logger.info("login failed addr=%s", request.remote_addr)
        raise BadCredentials()
    token, expires_at = issue_token(row[0])
    return {"token": token, "user_id": row[0], "expires_at": expires_at}


@bp.get(f"/users/<int(max={MAX_ID}):user_id>")  # past a 64-bit id: 404, not 500
@token_required
def show_user(user_id):
    """Show another user's name (the contract names people by id only)."""
    user = current_hub().store.get_user(user_id)
    if user is None:
        raise NotFound(f"no user {user_id}")
    return {"id": user["id"], "username": user["username"]}


@bp.get("/users")
@token_required
def find_user():
    """Find a user by exact username: ``GET /api/users?username=alice``."""
    username = request.args.get("username", "")
    row = current_hub().store.find_user(username) if USERNAME_RE.fullmatch(username) \
        else None
    if row is None:
        raise NotFound("no such user")
    return {"id": row[0], "username": row[1]}


@bp.get("/me")
@token_required
def me():
    """Show the signed-in user."""
    user = current_hub().store.get_user(g.user_id)
    if user is None:
        raise NotFound("no such user")
    return {"id": user["id"], "username": user["username"]}
