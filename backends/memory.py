"""The embedded default backend: a process-local map of key -> this instance.

One process only: with several workers each is its own instance and this map
cannot cross processes, which is why the CLI refuses ``--workers > 1`` with it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from triows.backend import Delivery, Outcome
from triows.settings import Settings


class MemoryBackend:
    """Routes published messages straight to this process's subscribers."""

    def __init__(
        self, send: ObjectSendStream[Delivery], receive: ObjectReceiveStream[Delivery]
    ) -> None:
        self._send = send
        self._receive = receive
        self._keys: set[str] = set()

    @property
    def ready(self) -> bool:
        return True

    @property
    def incoming(self) -> ObjectReceiveStream[Delivery]:
        return self._receive

    async def publish(self, key: str, body: bytes) -> Outcome:
        if key not in self._keys:
            return Outcome.UNROUTED
        # Waits while the bounded incoming stream is full, like a broker's flow control.
        await self._send.send((key, body))
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
        yield MemoryBackend(send, receive)
