"""The proton pump without a broker: two proton engines talk through memory.

A client engine and a server-mode engine are connected back to back by an
in-memory byte-stream pair; each is driven by its own :class:`ProtonPump`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
import pytest
import trio
import trio.testing
from anyio.abc import ByteStream, ObjectReceiveStream, ObjectSendStream
from proton import Connection, Delivery, Endpoint, Event, Message, Receiver, Sender, Transport

from triows.backends.amqp10_pump import ConnectionLost, ProtonPump


class MemoryByteStream(ByteStream):
    """One end of an in-memory byte pipe pair; honours ``max_bytes`` like a socket."""

    def __init__(self, send: ObjectSendStream[bytes], receive: ObjectReceiveStream[bytes]) -> None:
        self._send = send
        self._receive = receive
        self._leftover = b""
        self.received_sizes: list[int] = []

    async def send(self, item: bytes) -> None:
        await self._send.send(bytes(item))

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if not self._leftover:
            self._leftover = await self._receive.receive()
        data, self._leftover = self._leftover[:max_bytes], self._leftover[max_bytes:]
        self.received_sizes.append(len(data))
        return data

    async def send_eof(self) -> None:
        await self._send.aclose()

    async def aclose(self) -> None:
        await self._send.aclose()
        await self._receive.aclose()


def memory_byte_stream_pair() -> tuple[MemoryByteStream, MemoryByteStream]:
    a_to_b_send, a_to_b_receive = anyio.create_memory_object_stream[bytes](16)
    b_to_a_send, b_to_a_receive = anyio.create_memory_object_stream[bytes](16)
    return (
        MemoryByteStream(a_to_b_send, b_to_a_receive),
        MemoryByteStream(b_to_a_send, a_to_b_receive),
    )


@dataclass
class Recorder:
    """Keeps every event a pump dispatched and wakes waiters on each."""

    events: list[Event] = field(default_factory=list)
    changed: anyio.Event = field(default_factory=anyio.Event)

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        self.changed.set()
        self.changed = anyio.Event()

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        while not condition():
            await self.changed.wait()


@dataclass
class Peer:
    pump: ProtonPump
    recorder: Recorder


@asynccontextmanager
async def connected_peers() -> AsyncIterator[tuple[Peer, Peer]]:
    """A client and a server engine, both open; each pump runs until the test ends."""
    client_stream, server_stream = memory_byte_stream_pair()
    client_recorder, server_recorder = Recorder(), Recorder()

    client_connection = Connection()
    client_connection.container = "client"
    client_transport = Transport()
    client_sasl = client_transport.sasl()
    client_sasl.allowed_mechs("ANONYMOUS")
    client = ProtonPump(client_connection, client_transport, client_recorder)

    server_connection = Connection()
    server_connection.container = "server"
    server_transport = Transport(Transport.SERVER)
    server_sasl = server_transport.sasl()
    server_sasl.allowed_mechs("ANONYMOUS")
    server = ProtonPump(server_connection, server_transport, server_recorder)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(client.run, client_stream)
        tasks.start_soon(server.run, server_stream)
        client_connection.open()
        client.wake()
        await server_recorder.wait_for(
            lambda: bool(server_connection.state & Endpoint.REMOTE_ACTIVE)
        )
        server_connection.open()
        server.wake()
        await client_recorder.wait_for(
            lambda: bool(client_connection.state & Endpoint.REMOTE_ACTIVE)
        )
        yield Peer(client, client_recorder), Peer(server, server_recorder)
        tasks.cancel_scope.cancel()


def open_remote_endpoints(peer: Peer) -> None:
    """Answer every session and link the other side opened (as a broker would)."""
    connection = peer.pump.connection
    session = connection.session_head(Endpoint.LOCAL_UNINIT | Endpoint.REMOTE_ACTIVE)
    while session is not None:
        session.open()
        session = session.next(Endpoint.LOCAL_UNINIT | Endpoint.REMOTE_ACTIVE)  # type: ignore[no-untyped-call]
    link = connection.link_head(Endpoint.LOCAL_UNINIT | Endpoint.REMOTE_ACTIVE)
    while link is not None:
        link.source.copy(link.remote_source)
        link.target.copy(link.remote_target)
        link.open()
        link = link.next(Endpoint.LOCAL_UNINIT | Endpoint.REMOTE_ACTIVE)
    peer.pump.wake()


async def attach_link_with_credit(
    client: Peer, server: Peer, name: str, address: str
) -> tuple[Sender, Receiver]:
    """Attach a sender on ``client`` to a receiver on ``server`` and give it one credit."""
    session = client.pump.connection.session()
    session.open()
    sender = session.sender(name)
    sender.target.address = address
    sender.open()
    client.pump.wake()
    await server.recorder.wait_for(
        lambda: server.pump.connection.link_head(Endpoint.REMOTE_ACTIVE) is not None
    )
    open_remote_endpoints(server)
    receiver = server.pump.connection.link_head(Endpoint.REMOTE_ACTIVE)
    assert isinstance(receiver, Receiver)
    receiver.flow(1)
    server.pump.wake()
    await client.recorder.wait_for(lambda: sender.credit > 0)
    return sender, receiver


async def receive_message(server: Peer, receiver: Receiver) -> tuple[Message, Delivery]:
    """Wait until ``receiver`` holds a complete delivery; decode it."""

    def complete_delivery() -> bool:
        current = receiver.current
        return current is not None and current.readable and not current.partial

    await server.recorder.wait_for(complete_delivery)
    received = Message()
    incoming = received.recv(receiver)  # type: ignore[call-overload]  # proton types recv() for senders only
    assert incoming is not None
    return received, incoming


async def test_pump_opens_a_connection_through_sasl_both_ways() -> None:
    with anyio.fail_after(10):
        async with connected_peers() as (client, server):
            assert client.pump.connection.remote_container == "server"
            assert server.pump.connection.remote_container == "client"
            assert server.pump.transport.sasl().outcome == 0  # SASL OK


async def test_pump_transfers_a_message_on_an_attached_link_and_carries_its_outcome() -> None:
    with anyio.fail_after(10):
        async with connected_peers() as (client, server):
            sender, receiver = await attach_link_with_credit(client, server, "to-server", "queue-a")
            assert receiver.remote_target.address == "queue-a"
            delivery = sender.send(Message(body=b"hello"))
            assert isinstance(delivery, Delivery)
            client.pump.wake()
            received, incoming = await receive_message(server, receiver)
            assert received.body == b"hello"
            incoming.update(Delivery.ACCEPTED)
            incoming.settle()
            server.pump.wake()

            await client.recorder.wait_for(lambda: delivery.remote_state != 0)
            assert delivery.remote_state == Delivery.ACCEPTED
            assert delivery.settled  # the server settled it: nothing more will come


async def test_pump_never_pushes_more_than_the_transport_capacity() -> None:
    with anyio.fail_after(10):
        async with connected_peers() as (client, server):
            sender, receiver = await attach_link_with_credit(client, server, "big", "queue-big")

            body = bytes(range(256)) * 4096  # 1 MiB: many frames, many reads
            sender.send(Message(body=body))
            client.pump.wake()
            received, _ = await receive_message(server, receiver)
            assert received.body == body


async def test_pump_run_raises_connection_lost_when_the_peer_closes() -> None:
    with anyio.fail_after(10):
        client_stream, server_stream = memory_byte_stream_pair()
        client_connection = Connection()
        client_transport = Transport()
        client_transport.sasl().allowed_mechs("ANONYMOUS")
        client = ProtonPump(client_connection, client_transport, Recorder())
        client_connection.open()
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(server_stream.aclose)
            with pytest.raises(ConnectionLost):
                await client.run(client_stream)


async def test_pump_run_returns_after_a_local_close_the_peer_answers() -> None:
    with anyio.fail_after(10):
        client_stream, server_stream = memory_byte_stream_pair()
        client_recorder = Recorder()
        client_connection = Connection()
        client_transport = Transport()
        client_transport.sasl().allowed_mechs("ANONYMOUS")
        client = ProtonPump(client_connection, client_transport, client_recorder)

        server_connection = Connection()

        def server_answers(event: Event) -> None:
            state = server_connection.state
            if state & Endpoint.REMOTE_ACTIVE and state & Endpoint.LOCAL_UNINIT:
                server_connection.open()
            if state & Endpoint.REMOTE_CLOSED and not state & Endpoint.LOCAL_CLOSED:
                server_connection.close()

        server_transport = Transport(Transport.SERVER)
        server_transport.sasl().allowed_mechs("ANONYMOUS")
        server = ProtonPump(server_connection, server_transport, server_answers)

        client_connection.open()
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(server.run, server_stream)
            tasks.start_soon(client.run, client_stream)
            await client_recorder.wait_for(
                lambda: bool(client_connection.state & Endpoint.REMOTE_ACTIVE)
            )
            client_connection.close()
            client.wake()
        # Both runs returned without ConnectionLost: the close was clean on each side.
        assert client_connection.state & Endpoint.REMOTE_CLOSED
        assert server_connection.state & Endpoint.LOCAL_CLOSED


async def test_pump_gives_up_on_a_peer_that_falls_silent_past_the_idle_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # On Trio's mock clock, which jumps ahead whenever every task waits: the
    # pump ticks proton with anyio.current_time(), so a realistic idle timeout
    # passes at once and no real time is waited on.
    client_stream, server_stream = memory_byte_stream_pair()
    client_connection = Connection()
    client_transport = Transport()
    client_transport.sasl().allowed_mechs("ANONYMOUS")
    client_transport.idle_timeout = 30  # seconds; the peer must send something within it
    client = ProtonPump(client_connection, client_transport, Recorder())

    # The peer answers the handshake, then keeps its socket open and says nothing.
    server_connection = Connection()
    server_transport = Transport(Transport.SERVER)
    server_transport.sasl().allowed_mechs("ANONYMOUS")
    server_transport.bind(server_connection)

    async def answer_then_fall_silent() -> None:
        while not server_connection.state & Endpoint.REMOTE_ACTIVE:
            server_transport.push(await server_stream.receive(server_transport.capacity()))
            if server_connection.state & Endpoint.REMOTE_ACTIVE:
                server_connection.open()
            while (pending := server_transport.pending()) > 0:
                data = server_transport.peek(pending)
                assert data is not None
                await server_stream.send(data)
                server_transport.pop(len(data))
        await anyio.sleep_forever()

    client_connection.open()
    with anyio.fail_after(600):  # a hang guard, on the mock clock too
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(answer_then_fall_silent)
            with pytest.raises(ConnectionLost, match="idle-timeout"):
                await client.run(client_stream)
            tasks.cancel_scope.cancel()
