"""The error taxonomy: one class per contract error code.

Every refusal in imserver is an ``ImError``. The HTTP layer renders it as the
contract's envelope ``{"error": {"code", "message"}}`` with ``status``; the
WebSocket handler turns the same exception into an ``error`` frame.

- ImError (500, ``internal``)
  - Invalid (400, ``invalid``): a malformed HTTP body or query
    - GroupFull (400, ``group_full``)
  - BadJson (400, ``bad_json``): a frame that is not a JSON object
  - BadFrame (400, ``bad_frame``): a field missing or of the wrong type
  - UnknownType (400, ``unknown_type``)
  - BodyTooLong (400, ``body_too_long``)
  - Unauthorized (401, ``unauthorized``)
    - BadCredentials (401, ``bad_credentials``)
  - Forbidden (403, ``forbidden``)
  - NotFound (404, ``not_found``)
  - Conflict (409, ``conflict``)
    - UsernameTaken (409, ``username_taken``)
  - TooLarge (413, ``too_large``)
  - RateLimited (429, ``rate_limited``)
  - Unavailable (503, ``unavailable``)

Imports: stdlib only.
"""


class ImError(Exception):
    """A refusal with a contract code, an HTTP status and a human message."""

    code = "internal"
    status = 500
    default_message = "internal error"

    def __init__(self, message: str | None = None):
        super().__init__(message or self.default_message)
        self.message = message or self.default_message

    def to_dict(self) -> dict:
        """Return the contract's error envelope."""
        return {"error": {"code": self.code, "message": self.message}}


class Invalid(ImError):
    code, status, default_message = "invalid", 400, "invalid input"


class GroupFull(Invalid):
    code, default_message = "group_full", "the group is full"


class BadJson(ImError):
    code, status, default_message = "bad_json", 400, "not a JSON object"


class BadFrame(ImError):
    code, status, default_message = "bad_frame", 400, "malformed frame"


class UnknownType(ImError):
    code, status, default_message = "unknown_type", 400, "unknown frame type"


class BodyTooLong(ImError):
    code, status, default_message = "body_too_long", 400, "body too long"


class Unauthorized(ImError):
    code, status, default_message = "unauthorized", 401, "missing or bad token"


class BadCredentials(Unauthorized):
    code, default_message = "bad_credentials", "wrong username or password"


class Forbidden(ImError):
    code, status, default_message = "forbidden", 403, "not allowed"


class NotFound(ImError):
    code, status, default_message = "not_found", 404, "not found"


class Conflict(ImError):
    code, status, default_message = "conflict", 409, "conflict"


class UsernameTaken(Conflict):
    code, default_message = "username_taken", "that username is taken"


class TooLarge(ImError):
    code, status, default_message = "too_large", 413, "request body too large"


class RateLimited(ImError):
    code, status, default_message = "rate_limited", 429, "too many requests"


class Unavailable(ImError):
    code, status, default_message = "unavailable", 503, "service unavailable"
