"""A loopback TCP proxy in front of a broker: it makes it appear late, holds or drops connections.

Stopping the shared RabbitMQ disturbs every other test running at the same
time; a proxy shows "the broker is not there yet" and "the network dropped the
connection" to one backend only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from triows.backend import Backend

# A hang guard only.
READY_TIMEOUT = 30.0
CHUNK = 65536


@dataclass
class TcpProxy:
    """Forwards ``127.0.0.1:port`` to ``127.0.0.1:target_port``."""

    port: int
    target_port: int
    _links: set[trio.CancelScope] = field(default_factory=set)
    # While set (not yet released), a new connection is accepted and then held:
    # nothing is forwarded either way, as a broker that answers late.
    _held: trio.Event | None = None
    _someone_held: trio.Event = field(default_factory=trio.Event)

    def hold(self) -> None:
        """Hold every new connection (accepted, silent) until :meth:`release`."""
        self._held = trio.Event()
        self._someone_held = trio.Event()

    def release(self) -> None:
        """Forward the held connections, and new ones, again."""
        if self._held is not None:
            self._held.set()
        self._held = None

    async def wait_someone_held(self) -> None:
        """Return once a connection made since :meth:`hold` is being held."""
        await self._someone_held.wait()

    @property
    def connections(self) -> int:
        """How many client connections are being forwarded now."""
        return len(self._links)

    def cut(self) -> None:
        """Drop every forwarded connection at once (both sides see the TCP close)."""
        for link in list(self._links):
            link.cancel()

    async def _forward(self, client: trio.SocketStream) -> None:
        async with client:
            held = self._held
            if held is not None:
                self._someone_held.set()
                await held.wait()
            try:
                server = await trio.open_tcp_stream("127.0.0.1", self.target_port)
            except OSError:
                return
            async with server:
                with trio.CancelScope() as link:
                    self._links.add(link)
                    try:
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(_pump, client, server, link)
                            nursery.start_soon(_pump, server, client, link)
                    finally:
                        self._links.discard(link)


async def _pump(source: trio.SocketStream, sink: trio.SocketStream, link: trio.CancelScope) -> None:
    try:
        while data := await source.receive_some(CHUNK):
            await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    # Either side closing ends the whole link, as a real connection would.
    link.cancel()


@asynccontextmanager
async def open_tcp_proxy(target_port: int, *, port: int = 0) -> AsyncIterator[TcpProxy]:
    """Listen on ``127.0.0.1:port`` (0: any free port) and forward to ``target_port``."""
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    bound_port = listeners[0].socket.getsockname()[1]
    proxy = TcpProxy(bound_port, target_port)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, proxy._forward, listeners)
        try:
            yield proxy
        finally:
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def reachable(
    backend: Backend, target_port: int, port: int, *, timeout: float = READY_TIMEOUT
) -> AsyncIterator[None]:
    """Open the proxy on ``port`` in front of ``target_port`` and wait until ``backend`` is ready.

    When the block ends the backend's connection drops, and its reconnects are
    refused until the proxy is opened again.
    """
    async with open_tcp_proxy(target_port, port=port):
        with trio.fail_after(timeout):
            await backend.wait_ready()
        yield
