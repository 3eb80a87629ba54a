"""Declare a RabbitMQ exchange over AMQP 0-9-1, for the STOMP backend.

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
"""

from __future__ import annotations

import struct
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


async def declare_direct_exchange(address: BrokerAddress, *, port: int, exchange: str) -> None:
    """Make sure direct exchange ``exchange`` exists in ``address``'s virtual host.

    Logs in as ``address``'s user (``guest`` without one) on ``port``, over
    TLS if ``address`` uses it. Raises a stream error (:data:`TRANSIENT`) when
    the AMQP port does not answer, :class:`ExchangeDeclareError` when RabbitMQ
    refuses. Callers bound the time with a cancel scope.
    """
    login = address.user or "guest"
    passcode = address.password or ("guest" if address.user is None else "")
    vhost = address.vhost
    stream = await connect_stream(address.host, port, tls=address.tls)
    async with stream:
        session = _AmqpSession(stream, exchange)
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
        await session.send(commands.Connection.Open(virtual_host=vhost))
        await session.expect(commands.Connection.OpenOk)
        await session.send(commands.Channel.Open(), channel=1)
        await session.expect(commands.Channel.OpenOk)
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
        await session.send(
            commands.Connection.Close(reply_code=200, reply_text="done", class_id=0, method_id=0)
        )
        await session.expect(commands.Connection.CloseOk)


class _AmqpSession:
    """Just enough of an AMQP 0-9-1 client to send methods and read the answers."""

    def __init__(self, stream: ByteStream, exchange: str) -> None:
        self._stream = stream
        self._exchange = exchange
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
            raise ExchangeDeclareError(
                f"RabbitMQ closed the connection: {value.reply_text}", self._exchange
            )
        return value

    async def expect(self, kind: type[T]) -> T:
        value = await self.receive()
        if not isinstance(value, kind):
            raise ExchangeDeclareError(
                f"expected {kind.__name__}, RabbitMQ sent {value!r}", self._exchange
            )
        return value


def _frame_length(buffer: bytes) -> int:
    (payload,) = struct.unpack_from(">I", buffer, 3)
    return _FRAME_HEADER + int(payload) + 1
