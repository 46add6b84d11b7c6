"""Operations endpoints: ``/healthz`` and ``/metrics``."""

import logging

from flask import Blueprint
from flask import Response

from imserver.hub import current_hub

logger = logging.getLogger(__name__)

bp = Blueprint("ops", __name__)


@bp.get("/healthz")
def healthz():
    """Answer 200 while the database (and the broker) answer, else 503."""
    hub = current_hub()
    try:
        hub.store.ping()
    except Exception as exc:
        logger.warning("health check: database unavailable: %s", exc.__class__.__name__)
        return {"status": "unavailable", "database": False}, 503
    ready = getattr(hub.store.db, "schema_ready", None)
    if ready is not None and not ready.is_set():
        # The database answers but the schema is not set up yet (it was
        # unreachable at start): nothing that needs a table would work.
        return {"status": "unavailable", "database": False}, 503
    if not hub.broker.healthy():
        return {"status": "unavailable", "broker": False}, 503
    return {"status": "ok"}


@bp.get("/metrics")
def metrics():
    """Expose the process's metrics in Prometheus text."""
    return Response(current_hub().metrics.render(),
                    mimetype="text/plain; version=0.0.4; charset=utf-8")
