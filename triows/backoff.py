"""Reconnect delays: capped exponential backoff with full jitter.

Every backend that reconnects to a broker uses this one helper, so all of them
wait the same way: the first retry comes quickly, later ones spread out up to a
cap, and the random jitter keeps many instances that lost the same broker at
the same moment from reconnecting in lock-step when it returns.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

import anyio

from triows.logs import log_event

DEFAULT_INITIAL_DELAY = 0.1
"""Seconds; the upper bound of the first delay."""


@dataclass
class Backoff:
    """Delays for successive reconnect attempts.

    The n-th delay (from 0) is drawn uniformly from
    ``[0, min(max_delay, initial * 2**n)]`` ("full jitter"). Call :meth:`reset`
    once a connection has succeeded so that the next loss starts small again.
    """

    max_delay: float
    initial: float = DEFAULT_INITIAL_DELAY
    rng: random.Random = field(default_factory=random.Random, repr=False)
    _attempt: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.initial <= 0 or self.max_delay <= 0:
            raise ValueError("backoff delays must be positive")

    def next_delay(self) -> float:
        """Return the delay before the next attempt, and count the attempt."""
        # The exponent is capped so that 2**n cannot overflow a float after
        # days of failed attempts.
        ceiling = min(self.max_delay, self.initial * 2 ** min(self._attempt, 64))
        self._attempt += 1
        return self.rng.uniform(0, ceiling)

    @property
    def attempts(self) -> int:
        """Delays handed out since the last :meth:`reset`."""
        return self._attempt

    def reset(self) -> None:
        """Start again from the smallest delay (call after a successful connect)."""
        self._attempt = 0

    async def wait_after_loss(self, broker: str, error: BaseException) -> None:
        """Log the lost broker as one ``broker_unavailable`` event, then wait the next delay.

        Every backend reports a lost or unreachable broker with this same
        event, so an operator can alert on one name whatever the protocol.
        """
        delay = self.next_delay()
        log_event(
            "broker_unavailable",
            logging.WARNING,
            broker=broker,
            error=str(error) or repr(error),
            retry_in=round(delay, 3),
        )
        await anyio.sleep(delay)
