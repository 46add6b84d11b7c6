"""Store, then fan out: the one path of a message, for the WebSocket and HTTP.

``submit`` checks what the sender may do (rate limit, body, target), queues
the message to the store's writer and returns a future that resolves to the
``Stored`` message once it is committed. Fan-out happens after the commit,
in the writer, through the broker (see ``Hub._on_commit``): one inbox entry
per recipient, written at once to whoever is online, waiting in the inbox
for the others.

Imports: ``imserver.store``, ``imserver.protocol``, ``imserver.errors``.
"""

import concurrent.futures

from imserver.errors import RateLimited
from imserver.protocol import check_body
from imserver.protocol import check_target


def submit(hub, sender: int, body, cid, to=None, group=None) -> concurrent.futures.Future:
    """Queue one message from ``sender``; raise the contract's error if refused.

    Rate limited messages are refused before anything is stored.
    """
    to, group = check_target(to, group)
    body = check_body(body, hub.config["MAX_BODY_CHARS"])
    if not hub.limiter.allow(sender):
        hub.metrics.rate_limited.inc()
        raise RateLimited(f"more than {hub.limiter.rate} messages a second")
    future = hub.store.send(sender, body, cid, to=to, group=group)
    future.add_done_callback(lambda f: _count(hub, f))
    return future


def _count(hub, future: concurrent.futures.Future) -> None:
    """Count a newly stored message (runs in the writer after the commit)."""
    if not future.cancelled() and future.exception() is None and future.result().new:
        hub.metrics.messages.inc()
