"""One client connection's outbound side: a bounded queue and, only while it holds frames, a writer.

The router offers each frame without waiting; a connection whose queue is
full is closed with 4001 rather than slowing anyone else down. The same
connection serves both transports: it is given the ASGI ``send`` and a
function that turns one frame into the ASGI message carrying it (a WebSocket
text frame, or a Server-Sent Events chunk, see :mod:`triows.sse`).

An idle connection has no task of its own: the first frame offered to an
empty queue starts a writer task in a nursery shared by all connections (the
app's), and the writer ends as soon as the queue is empty. So one task at
most writes to a socket, frames keep their order, and an idle socket costs a
handful of slots and a list (see bench/README.md, "Where an idle socket's
bytes go"). The handler that owns the connection ends it with :meth:`finish`,
which waits for its writer, so no writer outlives its handler.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio

from triows.protocol import CLOSE_SLOW_CONSUMER

_ids = itertools.count(1)

ASGISend = Callable[[dict[str, Any]], Awaitable[None]]
# One frame as the ASGI message that writes it (module-level functions: no object per socket).
FrameMessage = Callable[[str], dict[str, Any]]


def trio_deadline(expires_at: float | None) -> float:
    """A token's expiry (unix seconds) as a deadline on the Trio clock."""
    if expires_at is None:
        return math.inf
    return trio.current_time() + max(0.0, expires_at - time.time())


def websocket_text(frame: str) -> dict[str, Any]:
    """One frame as a WebSocket text message."""
    return {"type": "websocket.send", "text": frame}


class SessionSide(Protocol):
    """What a connection needs of its session (a ``triows.session.SessionLink``)."""

    def written(self, tag: int) -> None:
        """The frame of delivery ``tag`` is written to the socket."""
        ...


class Connection:
    """A local WebSocket or event stream of ``user``; ``close_code`` is set once closing starts.

    ``stopped`` is set once no more frames will be written: we started closing
    it, or its peer went away (then ``close_code`` stays None).
    """

    __slots__ = (
        "_error",
        "_limit",
        "_message",
        "_nursery",
        "_queue",
        "_reader",
        "_send",
        "_writer",
        "_writer_done",
        "close_code",
        "close_reason",
        "flushed",
        "id",
        "presence_events",
        "session",
        "stopped",
        "user",
    )

    def __init__(self, user: str, queue_size: int) -> None:
        self.user = user
        self.id = next(_ids)
        self.close_code: int | None = None
        self.close_reason = ""
        self.stopped = False
        # True once everything queued before closing was written (a close frame may follow).
        self.flushed = False
        # Its session (None: not resumable), told of each session frame once written.
        self.session: SessionSide | None = None
        # It asked for its rooms' presence events (``?presence=1``).
        self.presence_events = False
        self._limit = queue_size
        # A list, not a deque: an empty deque is 760 bytes, an empty list 56.
        # A session's frame is queued with its delivery tag.
        self._queue: list[str | tuple[str, int]] = []
        self._reader: trio.CancelScope | None = None
        # Where writers run, once the transport is known; None again once a writer failed.
        self._nursery: trio.Nursery | None = None
        self._send: ASGISend | None = None
        self._message: FrameMessage = websocket_text
        # The running writer's scope (None: no writer), the event that tells
        # :meth:`finish` it ended, and what it raised.
        self._writer: trio.CancelScope | None = None
        self._writer_done: trio.Event | None = None
        self._error: Exception | None = None

    def offer(self, frame: str, tag: int | None = None) -> bool:
        """Queue ``frame`` without waiting; on overflow close with 4001. Never raises.

        Returns False when the frame will not be written: the connection is
        closing or gone, or its queue just overflowed. ``tag``: a session
        delivery's, passed to ``session.written`` once the frame is written.
        """
        if self.stopped:
            return False
        if len(self._queue) >= self._limit:
            self.close(CLOSE_SLOW_CONSUMER, "slow consumer: outbound queue overflowed")
            return False
        self._queue.append(frame if tag is None else (frame, tag))
        if self._writer is None:
            self._start_writer()
        return True

    def close(self, code: int, reason: str = "") -> None:
        """Start closing: queued frames are still flushed, except for a slow consumer."""
        if self.stopped:
            return
        self.close_code = code
        self.close_reason = reason
        self.stop()

    def stop(self) -> None:
        """No more frames: the reader stops; a running writer still writes what is queued."""
        if self.stopped:
            return
        self.stopped = True
        if self.close_code == CLOSE_SLOW_CONSUMER:
            self._queue.clear()
        if self._reader is not None:
            self._reader.cancel()

    def read_under(self, scope: trio.CancelScope) -> None:
        """``scope`` runs the reader: closing the connection cancels it."""
        self._reader = scope
        if self.stopped:
            scope.cancel()

    @property
    def idle(self) -> bool:
        """Whether nothing is queued or being written."""
        return self._writer is None and not self._queue

    def start_writing(
        self, nursery: trio.Nursery, send: ASGISend, message: FrameMessage = websocket_text
    ) -> None:
        """Write queued frames from now on as ``send(message(frame))``, by writers in ``nursery``.

        ``nursery`` outlives the connection (the app's); :meth:`finish` must
        end every connection that started writing.
        """
        self._nursery = nursery
        self._send = send
        self._message = message
        if self._queue:
            self._start_writer()

    async def finish(self, timeout: float) -> None:
        """Stop, let the writer write what is queued within ``timeout`` seconds, then cut it.

        Returns once no writer runs; ``flushed`` then says whether all was
        written. If this is cancelled the writer is cut at once (and still
        waited for). Raises what the writer raised (the peer's ``send`` failed).
        """
        self.stop()
        writer = self._writer
        if writer is not None:
            writer.deadline = min(writer.deadline, trio.current_time() + timeout)
            self._writer_done = done = trio.Event()
            try:
                await done.wait()
            finally:
                if self._writer is not None:
                    writer.cancel()
                    with trio.CancelScope(shield=True):
                        await done.wait()
        self.flushed = self._nursery is not None and not self._queue
        if self._error is not None:
            raise self._error

    def _start_writer(self) -> None:
        if self._nursery is None:
            return
        self._writer = scope = trio.CancelScope()
        try:
            self._nursery.start_soon(self._write, scope)
        except RuntimeError:
            # The app's nursery is closed: the instance is stopping, nothing more is written.
            self._writer = None
            self._nursery = None
            self.stop()

    async def _write(self, scope: trio.CancelScope) -> None:
        # Runs in the shared nursery: it must never raise there (that would end
        # every connection), so a failed send is handed to :meth:`finish`.
        queue, send, message = self._queue, self._send, self._message
        assert send is not None
        wrote_all = False
        try:
            with scope:
                while queue:
                    item = queue.pop(0)
                    if isinstance(item, str):
                        await send(message(item))
                    else:
                        await send(message(item[0]))
                        assert self.session is not None
                        self.session.written(item[1])
                wrote_all = True  # inside the scope: skipped when it was cancelled
        except Exception as error:
            self._error = error
        finally:
            self._writer = None
            if not wrote_all:
                # Peer gone, cut at the close deadline, or cancelled: nothing more is written.
                self._nursery = None
                self.stop()
            if self._writer_done is not None:
                self._writer_done.set()
