"""One writer per rollout: the owner of the last committed weight update keeps the rollout to
itself for a lease that each of its updates renews, until it releases it (its run ended)."""

from __future__ import annotations

import logging
import time

from topd_client.errors import PreconditionError

log = logging.getLogger(__name__)


class OwnerLease:
    """Who may send weight updates now. Callers hold the updates' lock."""

    def __init__(self, lease_s: float) -> None:
        self.lease_s = lease_s
        self.owner = ""
        self._seen = 0.0

    def check(self, sender: str) -> None:
        """Refuse another sender while the owner's lease runs; the owner's own update renews it."""
        age = time.monotonic() - self._seen
        if self.owner and sender != self.owner and age < self.lease_s:
            raise PreconditionError(
                f"rollout is owned by {self.owner!r} (its last update {age:.0f} s ago); it takes updates from one "
                f"trainer: this one ({sender or 'no owner'}) may write once the owner has sent nothing for "
                f"{self.lease_s:.0f} s, or after a restart of the rollout")
        if sender and sender == self.owner:
            self._seen = time.monotonic()

    def committed(self, sender: str) -> None:
        """A committed update makes its sender the owner (an anonymous one claims nothing)."""
        if sender:
            self.owner, self._seen = sender, time.monotonic()

    def release(self, sender: str) -> bool:
        if sender and sender == self.owner:
            log.info("weight-update owner %s released the rollout", sender)
            self.owner = ""
            return True
        return False
