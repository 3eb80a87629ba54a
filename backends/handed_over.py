"""What a broker backend handed on lately, so that a redelivery of it is not handed on twice.

When a connection goes, the broker redelivers to the next one whatever it had
not seen acknowledged (or settled), including messages this instance had
already handed to the router, whose ack went with the connection. Bodies hold
a unique message id, so a body names its message: a redelivery whose body is
here is only acknowledged. The broker holds at most a prefetch window or two
unacknowledged, so that many of the latest bodies are enough to remember.
Shared by the amqp091, STOMP and AMQP 1.0 backends.
"""

from __future__ import annotations

import hashlib
from collections import deque


class HandedOver:
    """The last ``size`` bodies handed on (as 16-byte digests with ``digests``,
    where one is kept per key and bodies would add up)."""

    def __init__(self, size: int, *, digests: bool = False) -> None:
        self._order: deque[bytes] = deque(maxlen=size)
        self._members: set[bytes] = set()
        self._digests = digests

    def _key(self, body: bytes) -> bytes:
        return hashlib.blake2b(body, digest_size=16).digest() if self._digests else body

    def add(self, body: bytes) -> None:
        key = self._key(body)
        if len(self._order) == self._order.maxlen:
            if not self._order:
                return  # a window of 0
            self._members.discard(self._order[0])  # the one the append pushes out
        self._order.append(key)
        self._members.add(key)

    def __contains__(self, body: bytes) -> bool:
        return self._key(body) in self._members
