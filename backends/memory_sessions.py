"""Session queues of the embedded backend: held in this process, for its own connections.

They follow what a broker does with the same settings, so the server's session
code is the same over every backend: a queue per session bound to keys, at most
``prefetch`` deliveries unacknowledged, a full queue refusing new messages
(``x-overflow: reject-publish``), unacked deliveries back at the head, in
order, when the consumer goes, and a queue nobody consumed for the resume
window deleted (``x-expires``; here when the next session opens, so what
waits is bounded by the sessions that connections opened). A session lives
as long as the process.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

import trio

from triows.backend import (
    NOTE_KEY,
    BrokerUnavailable,
    Outcome,
    SessionDeliver,
    SessionDelivery,
)
from triows.settings import Settings


@dataclass(eq=False)
class _Held:
    """One session's queue: its keys, what waits, and its consumer (at most one)."""

    name: str
    keys: set[str] = field(default_factory=set)
    ready: deque[SessionDelivery] = field(default_factory=deque)
    size: int = 0  # bytes in ``ready``
    consumer: MemorySessionQueue | None = None
    # trio.current_time() when its last consumer went (None: consumed now).
    unused_since: float | None = None


class MemorySessions:
    """Every session queue of this process, and which keys each is bound to."""

    def __init__(self, settings: Settings) -> None:
        self._window = settings.resume_window
        self._max_messages = settings.session_max_messages
        self._max_bytes = settings.session_max_bytes
        self._prefetch = settings.session_prefetch
        self._queues: dict[str, _Held] = {}
        self._bound: dict[str, set[_Held]] = {}
        self._tags = itertools.count(1)
        self.closed = False

    def __len__(self) -> int:
        return len(self._queues)

    async def open(
        self, name: str, key: str, deliver: SessionDeliver, *, resume: bool
    ) -> MemorySessionQueue | None:
        if self.closed:
            raise BrokerUnavailable("the memory backend is closed")
        self.expire()
        held = self._queues.get(name)
        if held is None:
            if resume:
                return None
            held = self._queues[name] = _Held(name)
        if held.consumer is not None:
            # The old connection has not noticed it is gone: the new one takes over.
            held.consumer.give_back()
        consumer = MemorySessionQueue(self, held, deliver, len(held.ready))
        held.consumer = consumer
        held.unused_since = None
        self.bind(held, key)
        consumer.pump()
        return consumer

    async def release(self) -> None:
        for held in self._queues.values():
            if held.consumer is not None:
                await held.consumer.detach()

    def expire(self) -> None:
        """Delete the queues nobody consumed for the resume window."""
        now = trio.current_time()
        for held in [
            held
            for held in self._queues.values()
            if held.unused_since is not None and now - held.unused_since >= self._window
        ]:
            self.delete(held)

    def publish(self, key: str, body: bytes) -> Outcome | None:
        """Put ``body`` in every session queue bound to ``key``; None when there is none.

        FULL when a queue refused it (the others took it), like a broker's
        nack for a message routed to a queue over its bound.
        """
        queues = self._bound.get(key)
        if not queues:
            return None
        refused = False
        for held in tuple(queues):
            refused |= not self.put(held, key, body)
        return Outcome.FULL if refused else Outcome.ROUTED

    def put(self, held: _Held, key: str, body: bytes) -> bool:
        if len(held.ready) >= self._max_messages or held.size + len(body) > self._max_bytes:
            return False
        held.ready.append(SessionDelivery(key, body, next(self._tags), False))
        held.size += len(body)
        if held.consumer is not None:
            held.consumer.pump()
        return True

    def bind(self, held: _Held, key: str) -> None:
        held.keys.add(key)
        self._bound.setdefault(key, set()).add(held)

    def unbind(self, held: _Held, key: str) -> None:
        held.keys.discard(key)
        queues = self._bound.get(key)
        if queues is not None:
            queues.discard(held)
            if not queues:
                del self._bound[key]

    def delete(self, held: _Held) -> None:
        if self._queues.get(held.name) is not held:
            return
        del self._queues[held.name]
        for key in tuple(held.keys):
            self.unbind(held, key)

    @property
    def prefetch(self) -> int:
        return self._prefetch


class MemorySessionQueue:
    """One consumer of a session queue (see :class:`triows.backend.SessionQueue`)."""

    def __init__(
        self, sessions: MemorySessions, held: _Held, deliver: SessionDeliver, waiting: int
    ) -> None:
        self._sessions = sessions
        self._held = held
        self._deliver: SessionDeliver | None = deliver
        self._unacked: dict[int, SessionDelivery] = {}
        self._waiting = waiting

    @property
    def waiting(self) -> int:
        return self._waiting

    def _current(self) -> bool:
        return self._held.consumer is self

    async def bind(self, key: str) -> None:
        self._sessions.bind(self._held, key)

    async def unbind(self, key: str) -> None:
        self._sessions.unbind(self._held, key)

    async def note(self, body: bytes) -> None:
        held = self._held
        held.ready.append(SessionDelivery(NOTE_KEY, body, next(self._sessions._tags), False))
        held.size += len(body)
        self.pump()

    def ack(self, tag: int) -> None:
        if self._unacked.pop(tag, None) is not None:
            self.pump()

    def pump(self) -> None:
        """Hand over what waits while fewer than ``prefetch`` deliveries are unacked."""
        held = self._held
        while (
            self._deliver is not None
            and held.ready
            and len(self._unacked) < self._sessions.prefetch
            and self._current()
        ):
            delivery = held.ready.popleft()
            held.size -= len(delivery.body)
            self._unacked[delivery.tag] = delivery
            self._deliver(delivery)

    def give_back(self) -> None:
        """Put every unacked delivery back at the head, in order, flagged redelivered."""
        self._deliver = None
        held = self._held
        for tag in sorted(self._unacked, reverse=True):
            delivery = self._unacked.pop(tag)
            held.ready.appendleft(SessionDelivery(delivery.key, delivery.body, tag, True))
            held.size += len(delivery.body)

    async def detach(self) -> None:
        self.give_back()
        if self._current():
            self._held.consumer = None
            self._held.unused_since = trio.current_time()

    async def end(self) -> None:
        self._deliver = None
        self._unacked.clear()
        if self._current():
            self._sessions.delete(self._held)
