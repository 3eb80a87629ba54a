"""One WebSocket connection's outbound side: a bounded queue and its writer.

The router offers each frame without waiting; a connection whose queue is
full is closed with 4001 rather than slowing anyone else down.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Awaitable, Callable

import trio

from triows.protocol import CLOSE_SLOW_CONSUMER

_ids = itertools.count(1)


class Connection:
    """A local WebSocket of ``user``; ``close_code`` is set once closing starts."""

    def __init__(self, user: str, queue_size: int) -> None:
        self.user = user
        self.id = next(_ids)
        self.close_code: int | None = None
        self.close_reason = ""
        self.closing = trio.Event()
        self.writer_done = trio.Event()
        self._send, self._receive = trio.open_memory_channel[str](queue_size)

    def offer(self, frame: str) -> bool:
        """Queue ``frame`` without waiting; on overflow close with 4001 and return False."""
        if self.close_code is not None:
            return False
        try:
            self._send.send_nowait(frame)
        except trio.WouldBlock:
            self.close(CLOSE_SLOW_CONSUMER, "slow consumer: outbound queue overflowed")
            return False
        return True

    def close(self, code: int, reason: str = "") -> None:
        """Start closing: queued frames are still flushed, except for a slow consumer."""
        if self.close_code is not None:
            return
        self.close_code = code
        self.close_reason = reason
        self._send.close()
        self.closing.set()

    async def run_writer(self, send: Callable[[str], Awaitable[None]]) -> None:
        """Write queued frames with ``send`` until closing has flushed the queue."""
        try:
            async with self._receive:
                async for frame in self._receive:
                    if self.close_code == CLOSE_SLOW_CONSUMER:
                        break
                    await send(frame)
        finally:
            self.writer_done.set()


async def run_expiry(connection: Connection, expires_at: float | None, code: int) -> None:
    """Close ``connection`` with ``code`` when its credentials expire (unix seconds)."""
    if expires_at is None:
        return
    await trio.sleep(max(0.0, expires_at - time.time()))
    connection.close(code, "token expired")
