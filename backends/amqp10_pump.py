"""Drive qpid-proton's sans-IO AMQP 1.0 engine over an anyio byte stream.

proton's ``Connection`` holds the AMQP state (sessions, links, deliveries),
its ``Transport`` turns that state into bytes and bytes back into state, and
its ``Collector`` queues the events that the state changes raise. proton's own
reactor moves the bytes with its own sockets and select loop; this module
replaces the reactor with two anyio tasks, so the engine runs inside Trio (or
asyncio) with no threads:

- the *reader* pushes the bytes it receives into the transport, never more
  than ``transport.capacity()``, and dispatches the events they raise;
- the *writer* sends ``transport.pending()`` bytes (``peek`` then ``pop``)
  and calls ``transport.tick()`` at the deadlines it returns, which is how
  proton sends heartbeats and notices a silent peer (idle timeout).

Everything proton does is synchronous, and every task of one event loop runs
one at a time, so the engine needs no lock: code that changes the engine from
another task (opens a link, sends a message, grants credit) calls
:meth:`ProtonPump.wake` afterwards so that the writer flushes the result.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import anyio
import anyio.lowlevel
from anyio.abc import ByteStream
from proton import Collector, Connection, Endpoint, Event, Transport

log = logging.getLogger(__name__)

READ_CHUNK_BYTES = 65536
"""The most bytes asked of the stream per read (fewer while proton's input buffer is fuller)."""

EventHandler = Callable[[Event], None]
"""Called synchronously for each proton event; must not block."""

# The errors a stream raises when the peer or the network goes away.
STREAM_ERRORS: tuple[type[BaseException], ...] = (
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
    OSError,
)


class ConnectionLost(Exception):
    """The AMQP connection ended without this side closing it first."""


class Wakeup:
    """A level-triggered nudge: every waiter wakes on the next :meth:`kick`."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    def kick(self) -> None:
        self._event.set()
        self._event = anyio.Event()

    async def wait(self, timeout: float = math.inf) -> None:
        with anyio.move_on_after(timeout):
            await self._event.wait()


class ProtonPump:
    """Moves one proton connection's bytes over one byte stream.

    The caller configures ``connection`` (container id, credentials, idle
    timeout, ``open()``) and the transport (SASL, client or server mode);
    the pump binds them, collects their events and hands each to
    ``on_event``. :meth:`run` pumps until the transport has closed both ways.
    """

    def __init__(
        self, connection: Connection, transport: Transport, on_event: EventHandler
    ) -> None:
        self.connection = connection
        self.transport = transport
        self._on_event = on_event
        self._collector = Collector()
        connection.collect(self._collector)
        transport.bind(connection)
        self._wakeup = Wakeup()

    def wake(self) -> None:
        """Ask the writer to dispatch events and flush output (after changing the engine)."""
        self._wakeup.kick()

    def dispatch(self) -> None:
        """Hand every queued proton event to the handler, in order."""
        while (event := self._collector.peek()) is not None:
            try:
                self._on_event(event)
            finally:
                self._collector.pop()

    async def run(self, stream: ByteStream) -> None:
        """Pump bytes until the transport closes; then close ``stream``.

        Returns normally only when this side closed the connection first (it
        called ``connection.close()``) and the close completed. Raises
        :class:`ConnectionLost` when the peer closed it, the stream broke, or
        proton gave up (idle timeout, framing error). On cancellation the
        stream is closed at once without an AMQP close.
        """
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(self._read, stream)
                await self._write(stream)
                # Everything is written. After our close the reader still waits
                # for the peer's close frame (or EOF), which closes the tail; a
                # transport that gave up (idle timeout, framing error) already
                # closed its tail, and the reader may be blocked on a silent peer.
                if self.transport.capacity() < 0:
                    tasks.cancel_scope.cancel()
        except* STREAM_ERRORS as group:
            self._abort()
            raise ConnectionLost(f"connection lost: {group.exceptions[0]!r}") from None
        finally:
            # Closing gracefully could wait on a dead peer (a TLS close_notify).
            await anyio.aclose_forcefully(stream)
        if not self.connection.state & Endpoint.LOCAL_CLOSED or self._failure() is not None:
            raise ConnectionLost(self._failure() or "the peer closed the connection")

    def _abort(self) -> None:
        """Tell the engine the stream is gone, so that it fails what is in flight."""
        if not self.transport.closed:
            self.transport.close_tail()
            self.transport.close_head()
        self.dispatch()

    def _failure(self) -> str | None:
        """Why the connection failed, in the peer's or proton's words, if it did."""
        for condition in (self.transport.condition, self.connection.remote_condition):
            if condition is not None:
                return f"{condition.name}: {condition.description}"
        return None

    async def _read(self, stream: ByteStream) -> None:
        while True:
            capacity = self.transport.capacity()
            if capacity < 0:  # tail closed: proton wants no more input
                return
            if capacity == 0:
                # proton's input buffer is full until it processes what it holds.
                await self._wakeup.wait()
                continue
            try:
                data = await stream.receive(min(capacity, READ_CHUNK_BYTES))
            except anyio.EndOfStream:
                self.transport.close_tail()
                self.dispatch()
                self.wake()
                return
            self.transport.push(data)
            self.dispatch()
            self.wake()

    async def _write(self, stream: ByteStream) -> None:
        while True:
            self.dispatch()
            deadline = self.transport.tick(anyio.current_time())
            # A tick can raise events (an idle-timeout error, for one).
            self.dispatch()
            pending = self.transport.pending()
            if pending < 0:  # head closed: everything proton had to say is written
                return
            if pending > 0:
                data = self.transport.peek(pending)
                assert data is not None  # pending > 0 guarantees bytes to peek
                await stream.send(data)
                self.transport.pop(len(data))
                continue
            timeout = deadline - anyio.current_time() if deadline else math.inf
            await self._wakeup.wait(max(timeout, 0.0))
            # Let the other tasks woken with us run first: a burst of deliveries
            # settled, or of messages published, then goes out in one write
            # instead of one write (and one syscall) each.
            await anyio.lowlevel.checkpoint()
