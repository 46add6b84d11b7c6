"""Passwords, signed tokens, and the check that every API call is signed in.

Passwords are kept only as salted scrypt hashes (werkzeug's
``generate_password_hash``). A token is the user id and an expiry, signed
with ``SECRET_KEY`` (itsdangerous, which Flask ships with): it cannot be
forged or altered without the key, and it expires after ``TOKEN_TTL``.

``SECRET_KEY``: from ``IMSERVER_SECRET_KEY`` when set; otherwise generated
once and kept in ``<instance>/secret_key`` (mode 0600), so that tokens
survive a restart and every worker of one host signs with the same key.
Hosts that share users must share a key: set ``IMSERVER_SECRET_KEY``.

Imports: flask, werkzeug, itsdangerous, ``imserver.errors``.
"""

import functools
import os
import re
import secrets
import time

from flask import current_app
from flask import g
from flask import request
from itsdangerous import BadSignature
from itsdangerous import URLSafeSerializer
from werkzeug.security import check_password_hash
from werkzeug.security import generate_password_hash

from imserver.errors import Invalid
from imserver.errors import Unauthorized

USERNAME_RE = re.compile(r"[A-Za-z0-9_.\-]{1,32}")
MIN_PASSWORD, MAX_PASSWORD = 8, 128

# Compared against when a username is unknown, so that a login takes as long
# whether or not the user exists (no user enumeration by timing).
_DUMMY_HASH = generate_password_hash("imserver-dummy-password")


def load_secret_key(instance_path: str) -> str:
    """Return the key kept in the instance folder, creating it on first start."""
    os.makedirs(instance_path, exist_ok=True)
    path = os.path.join(instance_path, "secret_key")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(48))
    for _ in range(50):
        with open(path) as f:
            key = f.read().strip()
        if key:
            return key
        # Another worker created the file and is writing it right now.
        time.sleep(0.01)
    raise RuntimeError(f"{path} is empty: delete it or set IMSERVER_SECRET_KEY")


def check_credentials_shape(data) -> tuple[str, str]:
    """Return ``(username, password)`` from a JSON body, or raise ``Invalid``."""
    if not isinstance(data, dict):
        raise Invalid("the body must be a JSON object")
    username, password = data.get("username"), data.get("password")
    if not isinstance(username, str) or not USERNAME_RE.fullmatch(username):
        raise Invalid("username: 1 to 32 of A-Z a-z 0-9 _ . -")
    if not isinstance(password, str) or not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise Invalid(f"password: {MIN_PASSWORD} to {MAX_PASSWORD} characters")
    try:
        password.encode("utf-8")
    except UnicodeEncodeError:
        raise Invalid("password is not valid Unicode") from None
    return username, password


def hash_password(password: str) -> str:
    """Return a salted slow hash of ``password``."""
    return generate_password_hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    """Check a password, taking as long when the user is unknown."""
    if password_hash is None:
        check_password_hash(_DUMMY_HASH, password)
        return False
    return check_password_hash(password_hash, password)


def _serializer() -> URLSafeSerializer:
    return URLSafeSerializer(current_app.config["SECRET_KEY"], salt="imserver-token")


def issue_token(user_id: int) -> tuple[str, int]:
    """Return a signed token for ``user_id`` and its expiry (ms since epoch)."""
    expires_at = int(time.time() * 1000) + int(current_app.config["TOKEN_TTL"]) * 1000
    return _serializer().dumps({"u": user_id, "e": expires_at}), expires_at


def user_id_from_token(token) -> int:
    """Return the user id a valid token names, or raise ``Unauthorized``."""
    if not isinstance(token, str) or not token or len(token) > 1024:
        raise Unauthorized("missing token")
    try:
        data = _serializer().loads(token)
    except BadSignature:
        raise Unauthorized("bad token") from None
    if not isinstance(data, dict):
        raise Unauthorized("bad token")
    user_id, expires_at = data.get("u"), data.get("e")
    if type(user_id) is not int or type(expires_at) is not int:
        raise Unauthorized("bad token")
    if not 0 < user_id <= 2**63 - 1:
        # Not an id (a 64-bit column): unknown, never a database error.
        raise Unauthorized("bad token")
    if expires_at <= int(time.time() * 1000):
        raise Unauthorized("token expired")
    return user_id


def bearer_token() -> str | None:
    """Return the token of this request: ``Authorization: Bearer`` or ``?token=``."""
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.args.get("token")


def authenticate() -> int:
    """Check this request's token and remember the user in ``g.user_id``."""
    from imserver.hub import current_hub

    user_id = user_id_from_token(bearer_token())
    # A token of a user that no longer exists (another database) is refused.
    if not current_hub().store.user_exists(user_id):
        raise Unauthorized("unknown user")
    g.user_id = user_id
    return user_id


def token_required(view):
    """Refuse the view with 401 unless the request carries a valid token."""

    @functools.wraps(view)
    def wrapped(*args, **kwargs):
        authenticate()
        return view(*args, **kwargs)

    return wrapped
