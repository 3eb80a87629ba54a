"""One WebSocket connection's outbound side: a bounded queue and its writer.

The router offers each frame without waiting; a connection whose queue is
full is closed with 4001 rather than slowing anyone else down. A connection
is a handful of slots, a deque and, only while its writer waits, one
``trio.Event``: no task or channel of its own (see bench/README.md, "Where
an idle socket's bytes go").
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from triows.protocol import CLOSE_SLOW_CONSUMER

_ids = itertools.count(1)

ASGISend = Callable[[dict[str, Any]], Awaitable[None]]


class Connection:
    """A local WebSocket of ``user``; ``close_code`` is set once we start closing it.

    ``stopped`` is set once no more frames will be written: we started closing
    it, or its peer went away (then ``close_code`` stays None).
    """

    __slots__ = (
        "_limit",
        "_queue",
        "_reader",
        "_wakeup",
        "close_code",
        "close_reason",
        "flushed",
        "id",
        "stopped",
        "user",
    )

    def __init__(self, user: str, queue_size: int) -> None:
        self.user = user
        self.id = next(_ids)
        self.close_code: int | None = None
        self.close_reason = ""
        self.stopped = False
        # True once the writer wrote everything queued before closing (a close frame may follow).
        self.flushed = False
        self._limit = queue_size
        self._queue: deque[str] = deque()
        self._wakeup: trio.Event | None = None
        self._reader: trio.CancelScope | None = None

    def offer(self, frame: str) -> bool:
        """Queue ``frame`` without waiting; on overflow close with 4001. Never raises.

        Returns False when the frame will not be written: the connection is
        closing or gone, or its queue just overflowed.
        """
        if self.stopped:
            return False
        if len(self._queue) >= self._limit:
            self.close(CLOSE_SLOW_CONSUMER, "slow consumer: outbound queue overflowed")
            return False
        self._queue.append(frame)
        self._wake()
        return True

    def close(self, code: int, reason: str = "") -> None:
        """Start closing: queued frames are still flushed, except for a slow consumer."""
        if self.stopped:
            return
        self.close_code = code
        self.close_reason = reason
        self.stop()

    def stop(self) -> None:
        """No more frames: the reader stops and the writer ends once the queue is written."""
        if self.stopped:
            return
        self.stopped = True
        if self.close_code == CLOSE_SLOW_CONSUMER:
            self._queue.clear()
        if self._reader is not None:
            self._reader.cancel()
        self._wake()

    def read_under(self, scope: trio.CancelScope) -> None:
        """``scope`` runs the reader: closing the connection cancels it."""
        self._reader = scope
        if self.stopped:
            scope.cancel()

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = None

    async def run_writer(self, send: ASGISend) -> None:
        """Write queued frames as ASGI ``websocket.send`` until closing has flushed the queue."""
        queue = self._queue
        try:
            while True:
                while queue:
                    await send({"type": "websocket.send", "text": queue.popleft()})
                if self.stopped:
                    self.flushed = True
                    return
                self._wakeup = wakeup = trio.Event()
                await wakeup.wait()
        finally:
            # However the writer ends (peer gone, cancelled), nothing more will be written.
            self.stop()
