"""The embedded default backend: a process-local map of key -> this instance.

One process only: with several workers each is its own instance and this map
cannot cross processes, which is why the CLI refuses ``--workers > 1`` with it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from triows.backend import BrokerUnavailable, Delivery, Outcome
from triows.settings import Settings


class MemoryBackend:
    """Routes published messages straight to this process's subscribers."""

    def __init__(
        self,
        send: ObjectSendStream[Delivery],
        receive: ObjectReceiveStream[Delivery],
        publish_timeout: float,
    ) -> None:
        self._publish_timeout = publish_timeout
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

    async def wait_ready(self) -> None:
        """Ready from the start: returns at once."""

    async def aclose(self) -> None:
        """Refuse publishes from now on (there is no broker connection to close)."""
        self._closed = True

    async def publish(self, key: str, body: bytes) -> Outcome:
        if self._closed:
            raise BrokerUnavailable("the memory backend is closed")
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
    async with send, receive:
        backend = MemoryBackend(send, receive, settings.publish_timeout)
        try:
            yield backend
        finally:
            await backend.aclose()
