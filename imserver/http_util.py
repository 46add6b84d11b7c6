"""Small helpers shared by the HTTP blueprints: JSON bodies and query ints.

Every malformed input becomes an ``Invalid`` (400) in the contract's
envelope, never a 500 or an HTML page.
"""

from flask import request

from imserver.errors import Invalid
from imserver.protocol import MAX_ID


def json_body() -> dict:
    """Return the request's JSON object body, or raise ``Invalid``."""
    try:
        data = request.get_json(force=True, silent=True)
    except RecursionError:
        # ``silent`` covers ValueError only; hostile nesting depth is invalid too.
        raise Invalid("the body is nested too deeply") from None
    if not isinstance(data, dict):
        raise Invalid("the body must be a JSON object")
    return data


def query_int(name: str, default=None, low: int = 1, high: int = MAX_ID):
    """Return query parameter ``name`` as an int in ``[low, high]``."""
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isascii() or not raw.isdigit() or len(raw) > 19:
        raise Invalid(f"'{name}' must be an integer")
    value = int(raw)
    if not low <= value <= high:
        raise Invalid(f"'{name}' must be between {low} and {high}")
    return value


def id_list(raw: str, name: str, most: int = 500) -> list[int]:
    """Parse ``1,2,3`` into ids; raise ``Invalid`` on anything else."""
    parts = [p.strip() for p in raw.split(",") if p.strip()] if raw else []
    if not parts:
        raise Invalid(f"'{name}' must be a comma-separated list of ids")
    if len(parts) > most:
        raise Invalid(f"at most {most} ids in '{name}'")
    ids = []
    for part in parts:
        if not part.isascii() or not part.isdigit() or len(part) > 19:
            raise Invalid(f"'{name}' must be a comma-separated list of ids")
        value = int(part)
        if not 1 <= value <= MAX_ID:
            raise Invalid(f"'{name}' must be a comma-separated list of ids")
        ids.append(value)
    return ids
