"""A loopback TCP proxy that can misbehave like a network: cut, go silent, or slow down.

``tests/tcp_proxy.py`` drops connections; this one also plays the two faults
a broker connection meets in the wild that a clean close does not show:

- **half-open** (:meth:`FaultProxy.stall`): bytes stop flowing in both
  directions but no side sees a FIN or RST, as when a NAT or firewall forgets
  the flow. Only heartbeats can notice. New connections are accepted and
  held, unanswered, until the stall ends (a SYN that reaches nobody).
  What was written meanwhile is forwarded when the stall ends, as TCP's
  retransmissions would.
  With ``tight=True`` the proxy also stops reading while stalled and its
  connections to the target take a small receive buffer, so the target's
  writes meet a shut TCP window within a few kilobytes: what a peer that
  vanished looks like to the target's kernel (no acks, TCP_USER_TIMEOUT),
  as near as loopback gets without a firewall.
- **slow** (:attr:`FaultProxy.delay`): every chunk is forwarded ``delay``
  seconds after it arrived, in order, in both directions.

The proxy also knows the local port of each connection it opened to the
target, so a broker-side tool (``rabbitmqctl list_connections peer_port``)
can tell which broker connection belongs to which instance.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

CHUNK = 65536
# Chunks read ahead of the writer per direction; beyond that TCP's own flow
# control pushes back on the sender, as on a real path.
QUEUED_CHUNKS = 256
# The receive buffer of a tight proxy's connections to the target (the kernel doubles it).
TIGHT_RCVBUF = 4096


@dataclass
class FaultProxy:
    """Forwards ``127.0.0.1:port`` to ``127.0.0.1:target_port``, with faults on demand."""

    port: int
    target_port: int
    delay: float = 0.0
    # See the module docstring: shut the window on the target while stalled.
    tight: bool = False
    _flowing: trio.Event = field(default_factory=trio.Event)
    _links: dict[trio.CancelScope, int] = field(default_factory=dict)
    accepted: int = 0

    def __post_init__(self) -> None:
        self._flowing.set()

    @property
    def connections(self) -> int:
        """How many client connections are being forwarded now."""
        return len(self._links)

    @property
    def upstream_ports(self) -> list[int]:
        """The local ports of the connections this proxy holds open to the target."""
        return [port for port in self._links.values() if port]

    @property
    def stalled(self) -> bool:
        return not self._flowing.is_set()

    def cut(self) -> None:
        """Drop every forwarded connection at once (both sides see the TCP close)."""
        for link in list(self._links):
            link.cancel()

    def stall(self) -> None:
        """Stop forwarding without closing anything (half-open), until :meth:`resume`."""
        if self._flowing.is_set():
            self._flowing = trio.Event()

    def resume(self) -> None:
        """End a stall: forward what queued up meanwhile, and accept new links again."""
        self._flowing.set()

    async def _forward(self, client: trio.SocketStream) -> None:
        self.accepted += 1
        async with client:
            with trio.CancelScope() as link:
                self._links[link] = 0
                try:
                    await self._flowing.wait()
                    try:
                        server = await self._connect()
                    except OSError:
                        return
                    async with server:
                        self._links[link] = server.socket.getsockname()[1]
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(self._pump, client, server, link)
                            nursery.start_soon(self._pump, server, client, link)
                finally:
                    del self._links[link]

    async def _connect(self) -> trio.SocketStream:
        if not self.tight:
            return await trio.open_tcp_stream("127.0.0.1", self.target_port)
        sock = trio.socket.socket()
        try:
            # Before connect, so that the window it advertises is small from the start.
            sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, TIGHT_RCVBUF)
            await sock.connect(("127.0.0.1", self.target_port))
        except BaseException:
            sock.close()
            raise
        return trio.SocketStream(sock)

    async def _pump(
        self, source: trio.SocketStream, sink: trio.SocketStream, link: trio.CancelScope
    ) -> None:
        send, receive = trio.open_memory_channel[tuple[float, bytes]](QUEUED_CHUNKS)

        async def read() -> None:
            async with send:
                try:
                    while True:
                        while self.tight and not self._flowing.is_set():
                            await self._flowing.wait()
                        data = await source.receive_some(CHUNK)
                        if not data:
                            break
                        await send.send((trio.current_time(), data))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass

        async def write() -> None:
            async with receive:
                try:
                    async for arrived, data in receive:
                        await trio.sleep_until(arrived + self.delay)
                        # Re-check after every wait: a stall may begin while sleeping.
                        while not self._flowing.is_set():
                            await self._flowing.wait()
                        await sink.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            nursery.start_soon(write)
        # Either side closing ends the whole link, as a real connection would
        # (once what it sent before closing has been forwarded).
        link.cancel()


@asynccontextmanager
async def open_fault_proxy(
    target_port: int, *, port: int = 0, tight: bool = False
) -> AsyncIterator[FaultProxy]:
    """Listen on ``127.0.0.1:port`` (0: any free port) and forward to ``target_port``."""
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    bound_port = listeners[0].socket.getsockname()[1]
    proxy = FaultProxy(bound_port, target_port, tight=tight)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, proxy._forward, listeners)
        try:
            yield proxy
        finally:
            nursery.cancel_scope.cancel()
