"""The delivery seam: hand committed inbox entries to the connections.

``LocalBroker`` is the Go article's single-machine mode: every user's
connection is in this process's ``ConnManager``, so delivering is writing
to it, and presence is asking it. The scale-out mode (several processes on
Redis) is another broker with the same two methods, so neither the
WebSocket handler nor the store changes with it.

Imports: stdlib only. The app hands in ``deliver(entries)`` and
``is_online(user_id)`` callables; this module never imports the
``ConnManager``.
"""

import logging

logger = logging.getLogger(__name__)


class LocalBroker:
    """Deliver and answer presence within this one process."""

    def __init__(self, deliver, is_online) -> None:
        # deliver(entries): write (user_id, seq, frame) entries to local
        # connections; returns the set of user ids that were connected.
        self._deliver = deliver
        self._is_online = is_online

    def publish(self, entries: list) -> None:
        """Deliver committed entries, in commit order, to whoever is online."""
        self._deliver(entries)

    def online(self, user_ids) -> dict:
        """Return ``{user_id: bool}``: who has a live connection."""
        return {user_id: self._is_online(user_id) for user_id in user_ids}

    def healthy(self) -> bool:
        """Tell whether delivery works (always, within one process)."""
        return True

    def close(self) -> None:
        """Release resources (none here)."""
