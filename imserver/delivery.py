"""Store, then fan out: the one path of a message, for the WebSocket and HTTP.

``submit`` checks what the sender may do (rate limit, body, target) and
queues the message to the store's writer. It returns a ``Pending`` that
resolves to the ``Stored`` message once it is committed, or calls
``callback`` in the writer then. Fan-out happens after the commit, in the
writer, through the broker (see ``Hub._on_commit``): one inbox entry per
recipient, written at once to whoever is online, waiting in the inbox for
the others. New messages are counted in the metrics by the writer, once per
batch.

Imports: ``imserver.store``, ``imserver.protocol``, ``imserver.errors``.
"""

from imserver.errors import RateLimited
from imserver.protocol import check_body
from imserver.protocol import check_target
from imserver.store import Pending


def submit(hub, sender: int, body, cid, to=None, group=None, callback=None) -> Pending:
    """Queue one message from ``sender``; raise the contract's error if refused.

    Rate limited messages are refused before anything is stored.
    """
    to, group = check_target(to, group)
    body = check_body(body, hub.config["MAX_BODY_CHARS"])
    if not hub.limiter.allow(sender):
        hub.metrics.rate_limited.inc()
        raise RateLimited(f"more than {hub.limiter.rate} messages a second")
    return hub.store.send(sender, body, cid, to=to, group=group, callback=callback)
