"""A token bucket per user, for work a user asks of the broker across connections.

A WebSocket's frames (joins included) are paced on the connection itself
(``TRIOWS_SEND_RATE``, ``TRIOWS_SEND_BURST``). An event stream's rooms are all
asked for by its ``GET``, and every ``GET`` is a new connection, so a bound
per connection would bound nothing there: :class:`RatePerUser` keeps one
bucket per user instead, with the same rate and burst.
"""

from __future__ import annotations

# Buckets are looked through for full ones (and forgotten) once there are
# this many more than after the last look.
PRUNE_AFTER = 1024


class RatePerUser:
    """``rate`` tokens a second per user, at most ``burst`` saved up.

    A user with a full bucket has no entry: memory follows the users who took
    tokens in the last ``burst / rate`` seconds.
    """

    def __init__(self, rate: float, burst: int) -> None:
        self._rate = rate
        self._burst = float(burst)
        # user -> (tokens, when they were counted)
        self._buckets: dict[str, tuple[float, float]] = {}
        self._prune_at = PRUNE_AFTER

    def __len__(self) -> int:
        """Users remembered (those whose bucket is not full)."""
        return len(self._buckets)

    def take(self, user: str, count: int, now: float) -> float:
        """Take ``count`` tokens from ``user``'s bucket at time ``now``.

        Returns 0 when taken, or else (nothing taken) how many seconds until
        they would be there. More than ``burst`` tokens cost a full bucket.
        """
        tokens = self._tokens(user, now)
        cost = min(float(count), self._burst)
        if tokens < cost:
            return (cost - tokens) / self._rate
        self._buckets[user] = (tokens - cost, now)
        if len(self._buckets) >= self._prune_at:
            self._prune(now)
        return 0.0

    def _tokens(self, user: str, now: float) -> float:
        saved = self._buckets.get(user)
        if saved is None:
            return self._burst
        tokens, counted = saved
        return min(self._burst, tokens + (now - counted) * self._rate)

    def _prune(self, now: float) -> None:
        full = [user for user in self._buckets if self._tokens(user, now) >= self._burst]
        for user in full:
            del self._buckets[user]
        self._prune_at = len(self._buckets) + PRUNE_AFTER
