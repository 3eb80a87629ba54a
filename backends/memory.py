"""The embedded default backend: a process-local map of key -> this instance.

With sessions (``TRIOWS_RESUME_WINDOW`` > 0) users' and rooms' messages go to
session queues held in this process (:mod:`backends.memory_sessions`).

One process only: with several workers each is its own instance and this map
cannot cross processes, which is why the CLI refuses ``--workers > 1`` with it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from triows.backend import BrokerUnavailable, Delivery, Outcome
from triows.backends.memory_sessions import MemorySessions
from triows.protocol import ROOM_KEY_PREFIX, USER_KEY_PREFIX
from triows.settings import Settings

SESSION_KEYS = (USER_KEY_PREFIX, ROOM_KEY_PREFIX)


class MemoryBackend:
    """Routes published messages straight to this process's subscribers."""

    def __init__(
        self,
        send: ObjectSendStream[Delivery],
        receive: ObjectReceiveStream[Delivery],
        publish_timeout: float,
        sessions: MemorySessions | None = None,
    ) -> None:
        self._publish_timeout = publish_timeout
        self._sessions = sessions
        self._send = send
        self._receive = receive
        self._keys: set[str] = set()
        self._closed = False

    @property
    def ready(self) -> bool:
        """Always, until closed."""
        return not self._closed

    @property
    def incoming(self) -> ObjectReceiveStream[Delivery]:
        return self._receive

    @property
    def sessions(self) -> MemorySessions | None:
        return self._sessions

    async def wait_ready(self) -> None:
        """Ready from the start: returns at once."""

    async def aclose(self) -> None:
        """Refuse publishes from now on (there is no broker connection to close)."""
        self._closed = True
        if self._sessions is not None:
            self._sessions.closed = True

    async def publish(self, key: str, body: bytes) -> Outcome:
        if self._closed:
            raise BrokerUnavailable("the memory backend is closed")
        if self._sessions is not None and key.startswith(SESSION_KEYS):
            # Users' and rooms' messages go to session queues; a subscribed
            # user key only says that a connection of it is here.
            outcome = self._sessions.publish(key, body)
            if outcome is None:
                return Outcome.UNROUTED
            if outcome is Outcome.ROUTED and key.startswith(USER_KEY_PREFIX):
                return Outcome.ROUTED if key in self._keys else Outcome.QUEUED
            return outcome
        if key not in self._keys:
            return Outcome.UNROUTED
        # Waits while the bounded incoming stream is full, like a broker's flow
        # control, and like a broker's confirm at most TRIOWS_PUBLISH_TIMEOUT.
        try:
            with anyio.fail_after(self._publish_timeout):
                await self._send.send((key, body))
        except TimeoutError:
            raise BrokerUnavailable(
                f"this instance's incoming queue stayed full for {self._publish_timeout}s"
            ) from None
        return Outcome.ROUTED

    async def subscribe(self, key: str) -> None:
        self._keys.add(key)

    async def unsubscribe(self, key: str) -> None:
        self._keys.discard(key)


@asynccontextmanager
async def open_memory_backend(settings: Settings) -> AsyncIterator[MemoryBackend]:
    """Open the in-process backend; it has no broker and no background tasks."""
    send, receive = anyio.create_memory_object_stream[Delivery](settings.incoming_queue)
    sessions = MemorySessions(settings) if settings.resume_window else None
    async with send, receive:
        backend = MemoryBackend(send, receive, settings.publish_timeout, sessions)
        try:
            yield backend
        finally:
            await backend.aclose()
