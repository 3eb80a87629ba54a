"""Declare a RabbitMQ exchange, and delete queues, over AMQP 0-9-1, for the STOMP backend.

RabbitMQ's STOMP plugin routes ``/exchange/<name>/<key>`` through an existing
exchange and never creates it: a SEND or SUBSCRIBE to a missing one gets
``ERROR message:not_found`` ("NOT_FOUND - no exchange 'triows' in vhost '/'").
STOMP has no frame to declare an exchange, so the STOMP backend declares it
here once per connection (and so does the ``amqp10`` backend), speaking just
enough AMQP 0-9-1 through pamqp's
sans-IO codec (already installed as aiormq's) over an anyio TCP stream: no
second client library, no asyncio, no threads.

The declaration matches the ``amqp091`` backend's (direct, not durable, not
auto-delete), so both backends can share one exchange. An exchange that
already exists with other arguments answers PRECONDITION_FAILED, which still
means it exists, and is accepted.

STOMP cannot delete a queue either: RabbitMQ's STOMP plugin deletes the queue
of an ``UNSUBSCRIBE`` only for a durable ``/topic/`` subscription
(``rabbit_stomp_processor:maybe_delete_durable_sub``), never for
``/exchange/`` ones. The STOMP backend's per-key queues outlive their
connection (``x-expires``), so it deletes those it is done with here
(:func:`delete_queues`).
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

from anyio.abc import ByteStream
from pamqp import base, commands, frame, header

from backends.broker_url import BrokerAddress, connect_stream
from backends.supervisor import BrokerRejected

PRECONDITION_FAILED = 406
_FRAME_HEADER = 7  # type (1), channel (2), payload size (4)
T = TypeVar("T")


class ExchangeDeclareError(BrokerRejected):
    """RabbitMQ refused to declare the exchange (access refused, a login it rejects ...)."""

    def __init__(self, message: str, exchange: str) -> None:
        super().__init__("configuration", message, exchange=exchange)


class QueueDeleteError(BrokerRejected):
    """RabbitMQ refused to delete a queue (or to let us in to do so)."""

    def __init__(self, message: str) -> None:
        super().__init__("configuration", message)


async def declare_direct_exchange(address: BrokerAddress, *, port: int, exchange: str) -> None:
    """Make sure direct exchange ``exchange`` exists in ``address``'s virtual host.

    Logs in as ``address``'s user (``guest`` without one) on ``port``, over
    TLS if ``address`` uses it. Raises a stream error (:data:`TRANSIENT`) when
    the AMQP port does not answer, :class:`ExchangeDeclareError` when RabbitMQ
    refuses. Callers bound the time with a cancel scope.
    """

    def refused(message: str) -> BrokerRejected:
        return ExchangeDeclareError(message, exchange)

    async with _open_channel(address, port, refused) as session:
        await session.send(
            commands.Exchange.Declare(exchange=exchange, exchange_type="direct"), channel=1
        )
        answer = await session.receive()
        if isinstance(answer, commands.Channel.Close):
            if answer.reply_code != PRECONDITION_FAILED:
                raise ExchangeDeclareError(
                    f"RabbitMQ refused to declare exchange {exchange!r}: {answer.reply_text}",
                    exchange,
                )
        elif not isinstance(answer, commands.Exchange.DeclareOk):
            raise ExchangeDeclareError(
                f"unexpected answer to exchange.declare: {answer!r}", exchange
            )


async def delete_queues(address: BrokerAddress, *, port: int, queues: list[str]) -> None:
    """Delete ``queues`` (with what they hold) in ``address``'s virtual host.

    One connection for the lot, the deletes pipelined; deleting a queue that
    does not exist (any more) is not an error. Raises like
    :func:`declare_direct_exchange` (:class:`QueueDeleteError` when refused).
    """
    if not queues:
        return
    async with _open_channel(address, port, QueueDeleteError) as session:
        for queue in queues:
            await session.send(commands.Queue.Delete(queue=queue), channel=1)
        for queue in queues:
            answer = await session.receive()
            if not isinstance(answer, commands.Queue.DeleteOk):
                raise QueueDeleteError(f"RabbitMQ did not delete queue {queue!r}: {answer!r}")


@asynccontextmanager
async def _open_channel(
    address: BrokerAddress, port: int, refused: Callable[[str], BrokerRejected]
) -> AsyncIterator[_AmqpSession]:
    """Log in, open channel 1, yield; close the connection cleanly after the block."""
    login = address.user or "guest"
    passcode = address.password or ("guest" if address.user is None else "")
    stream = await connect_stream(address.host, port, tls=address.tls)
    async with stream:
        session = _AmqpSession(stream, refused)
        await stream.send(frame.marshal(header.ProtocolHeader(), 0))
        await session.expect(commands.Connection.Start)
        await session.send(
            commands.Connection.StartOk(
                client_properties={"product": "triows"},
                mechanism="PLAIN",
                response=f"\0{login}\0{passcode}",
            )
        )
        tune = await session.expect(commands.Connection.Tune)
        await session.send(
            commands.Connection.TuneOk(
                channel_max=tune.channel_max, frame_max=tune.frame_max, heartbeat=0
            )
        )
        await session.send(commands.Connection.Open(virtual_host=address.vhost))
        await session.expect(commands.Connection.OpenOk)
        await session.send(commands.Channel.Open(), channel=1)
        await session.expect(commands.Channel.OpenOk)
        yield session
        await session.send(
            commands.Connection.Close(reply_code=200, reply_text="done", class_id=0, method_id=0)
        )
        await session.expect(commands.Connection.CloseOk)


class _AmqpSession:
    """Just enough of an AMQP 0-9-1 client to send methods and read the answers."""

    def __init__(self, stream: ByteStream, refused: Callable[[str], BrokerRejected]) -> None:
        self._stream = stream
        self._refused = refused
        self._buffer = b""

    async def send(self, method: base.Frame, *, channel: int = 0) -> None:
        await self._stream.send(frame.marshal(method, channel))

    async def receive(self) -> object:
        # pamqp raises the same exception for "incomplete" and "invalid", so
        # wait for a whole frame first: 7 header bytes, the payload, frame-end.
        while len(self._buffer) < _FRAME_HEADER or len(self._buffer) < _frame_length(self._buffer):
            self._buffer += await self._stream.receive()
        consumed, _channel, value = frame.unmarshal(self._buffer)
        self._buffer = self._buffer[consumed:]
        if isinstance(value, commands.Connection.Close):
            raise self._refused(f"RabbitMQ closed the connection: {value.reply_text}")
        return value

    async def expect(self, kind: type[T]) -> T:
        value = await self.receive()
        if not isinstance(value, kind):
            raise self._refused(f"expected {kind.__name__}, RabbitMQ sent {value!r}")
        return value


def _frame_length(buffer: bytes) -> int:
    (payload,) = struct.unpack_from(">I", buffer, 3)
    return _FRAME_HEADER + int(payload) + 1
