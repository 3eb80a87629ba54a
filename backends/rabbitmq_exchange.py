"""Over AMQP 0-9-1, for the STOMP and AMQP 1.0 backends: declare a RabbitMQ exchange,
declare and delete queues.

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

RabbitMQ 3.x's AMQP 1.0 plugin cannot name, bind or expire a queue either: a
``/exchange/X/K`` source declares a server-named ``amq.gen-`` queue it never
reports, and ``/queue/NAME`` declares one without arguments, bound only to the
default exchange. The AMQP 1.0 backend therefore declares and binds its
per-key queues here (:func:`declare_bound_queues`) and consumes each with a
``/amq/queue/NAME`` source.
"""

from __future__ import annotations

import logging
import math
import struct
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import TypeVar

import anyio
from anyio.abc import ByteStream
from pamqp import base, commands, frame, header
from pamqp.common import FieldTable

from triows.backends.broker_url import BrokerAddress, connect_stream
from triows.backends.supervisor import TRANSIENT, BrokerRejected
from triows.logs import log_event

PRECONDITION_FAILED = 406
NOT_FOUND = 404
DECLARE_BATCH = 500
"""Queues declared and bound per pipelined round (both directions' bytes stay
well within socket buffers, so neither side blocks writing while the other does)."""
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


HOME_NODE_DOWN = "home node"
"""In RabbitMQ's NOT_FOUND for a durable classic queue whose cluster node is down."""


class QueueOutOfReach(ConnectionError):
    """A queue of ours lives on a cluster node that is down (we moved to another node).

    Transient for the connection, but declaring the same name again fails until
    that node returns: the caller takes new names.
    """


class QueueDeclareError(BrokerRejected):
    """RabbitMQ refused to declare or bind a queue (or to let us in to do so)."""

    def __init__(self, message: str) -> None:
        super().__init__("configuration", message)


async def declare_bound_queues(
    address: BrokerAddress,
    *,
    port: int,
    exchange: str,
    queues: Sequence[tuple[str, str]],
    expires: float,
    batch_timeout: float,
) -> None:
    """Declare each ``(queue, key)`` of ``queues`` and bind it to ``exchange`` with ``key``.

    Each queue is durable (RabbitMQ 4.3 refuses non-durable non-exclusive
    queues; messages stay transient), neither exclusive nor auto-delete, and
    carries ``x-expires`` = ``expires`` seconds: it outlives the connection that
    consumes it and goes once unused that long. Idempotent for a queue that
    exists with the same arguments. One connection for the lot, the methods
    pipelined :data:`DECLARE_BATCH` queues at a time; the connection, each batch
    and the close each within ``batch_timeout``. Raises like
    :func:`declare_direct_exchange` (:class:`QueueDeclareError` when refused).
    """
    if not queues:
        return
    arguments: FieldTable = {"x-expires": round(expires * 1000)}
    with anyio.fail_after(batch_timeout) as first:
        async with _open_channel(address, port, QueueDeclareError) as session:
            first.deadline = math.inf
            for start in range(0, len(queues), DECLARE_BATCH):
                batch = queues[start : start + DECLARE_BATCH]
                with anyio.fail_after(batch_timeout):
                    for queue, key in batch:
                        await session.send(
                            commands.Queue.Declare(queue=queue, durable=True, arguments=arguments),
                            channel=1,
                        )
                        await session.send(
                            commands.Queue.Bind(queue=queue, exchange=exchange, routing_key=key),
                            channel=1,
                        )
                    for queue, _key in batch:
                        for expected in (commands.Queue.DeclareOk, commands.Queue.BindOk):
                            answer = await session.receive()
                            if not isinstance(answer, expected):
                                text = str(getattr(answer, "reply_text", ""))
                                if HOME_NODE_DOWN in text:
                                    raise QueueOutOfReach(f"queue {queue!r}: {text}")
                                raise QueueDeclareError(
                                    f"RabbitMQ did not declare and bind queue {queue!r}: "
                                    f"{getattr(answer, 'reply_text', answer)!r}"
                                )
            # And the close, too.
            first.deadline = anyio.current_time() + batch_timeout


async def declare_session_queue(
    address: BrokerAddress,
    *,
    port: int,
    queue: str,
    arguments: FieldTable,
    exchange: str,
    keys: Iterable[str],
    existing: bool = False,
) -> int | None:
    """Declare ``queue`` with ``arguments``, bind it to ``exchange`` with each of ``keys``,
    and return how many messages it holds ready.

    The queue is durable (RabbitMQ 4.3 refuses non-durable non-exclusive
    queues; messages stay transient), neither exclusive nor auto-delete: it
    outlives the connection that consumes it, until its ``x-expires``.
    Idempotent for a queue that exists with the same arguments. ``existing``:
    only if it exists (a passive declare, which ignores ``arguments``); None
    when it does not. One connection, the methods pipelined. Raises like
    :func:`declare_direct_exchange` (:class:`QueueDeclareError` when refused);
    callers bound the time.
    """
    async with _open_channel(address, port, QueueDeclareError) as session:
        await session.send(
            commands.Queue.Declare(
                queue=queue,
                durable=True,
                passive=existing,
                arguments=None if existing else arguments,
            ),
            channel=1,
        )
        bound = sorted(set(keys))
        for key in bound:
            await session.send(
                commands.Queue.Bind(queue=queue, exchange=exchange, routing_key=key), channel=1
            )
        answer = await session.receive()
        if (
            existing
            and isinstance(answer, commands.Channel.Close)
            and answer.reply_code == NOT_FOUND
        ):
            # The channel is closed: the binds after it were dropped unanswered.
            await session.send(commands.Channel.CloseOk(), channel=1)
            return None
        _refused_unless(answer, commands.Queue.DeclareOk, queue)
        assert isinstance(answer, commands.Queue.DeclareOk)
        for _key in bound:
            _refused_unless(await session.receive(), commands.Queue.BindOk, queue)
        return answer.message_count or 0


async def change_bindings(
    address: BrokerAddress,
    *,
    port: int,
    queue: str,
    exchange: str,
    bind: Iterable[str] = (),
    unbind: Iterable[str] = (),
) -> None:
    """Bind ``queue`` to ``exchange`` with each key of ``bind``, unbind it from each of ``unbind``.

    Binding twice and unbinding what is not bound are not errors; a queue
    that does not exist (any more) is (:class:`QueueDeclareError`).
    """
    methods: list[tuple[base.Frame, type[object]]] = [
        (
            commands.Queue.Bind(queue=queue, exchange=exchange, routing_key=key),
            commands.Queue.BindOk,
        )
        for key in sorted(set(bind))
    ]
    methods += [
        (
            commands.Queue.Unbind(queue=queue, exchange=exchange, routing_key=key),
            commands.Queue.UnbindOk,
        )
        for key in sorted(set(unbind))
    ]
    if not methods:
        return
    async with _open_channel(address, port, QueueDeclareError) as session:
        for method, _answer in methods:
            await session.send(method, channel=1)
        for _method, answer in methods:
            _refused_unless(await session.receive(), answer, queue)


def _refused_unless(answer: object, expected: type[object], queue: str) -> None:
    if isinstance(answer, expected):
        return
    text = str(getattr(answer, "reply_text", answer))
    if HOME_NODE_DOWN in text:
        raise QueueOutOfReach(f"queue {queue!r}: {text}")
    raise QueueDeclareError(f"RabbitMQ refused {expected.__name__[:-2]} of queue {queue!r}: {text}")


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


# Why a deletion of queues may fail without ending anything.
DELETE_FAILURES: tuple[type[BaseException], ...] = (*TRANSIENT, BrokerRejected)


class RetiredQueues:
    """Queues nothing consumes any more, deleted by one task, a batch per connection.

    For the backends whose queues outlive their connection (``x-expires``).
    A name stays listed until its deletion was tried, so that a close deletes
    it (:meth:`delete_now`) if the task could not. A deletion that fails is
    logged, not raised: the queue then expires, holding that key's messages
    until it does.
    """

    def __init__(self, where: Callable[[], tuple[BrokerAddress, int]], *, timeout: float) -> None:
        # The broker node and AMQP 0-9-1 port to delete on: the node of the
        # backend's current (or next) connection.
        self._where = where
        self._timeout = timeout
        self._names: set[str] = set()
        self._added = anyio.Event()

    def __bool__(self) -> bool:
        return bool(self._names)

    def add(self, name: str) -> None:
        self._names.add(name)
        self._added.set()

    async def delete_as_added(self) -> None:
        """The task: delete what was added, one batch per wake-up (never returns)."""
        while True:
            await self._added.wait()
            self._added = anyio.Event()
            names = sorted(self._names)
            await self._delete(names)
            self._names.difference_update(names)

    async def delete_now(self, also: Iterable[str] = ()) -> None:
        """Closing for good: delete every listed queue and ``also``."""
        names = sorted(self._names.union(also))
        self._names = set()
        await self._delete(names)

    async def _delete(self, names: list[str]) -> None:
        if not names:
            return
        address, port = self._where()
        try:
            with anyio.fail_after(self._timeout):
                await delete_queues(address, port=port, queues=names)
        except DELETE_FAILURES as error:
            log_event(
                "broker_queues_not_deleted",
                logging.WARNING,
                queues=len(names),
                amqp=f"{address.host}:{port}",
                error=repr(error),
            )


@asynccontextmanager
async def _open_channel(
    address: BrokerAddress, port: int, refused: Callable[[str], BrokerRejected]
) -> AsyncIterator[_AmqpSession]:
    """Log in, open channel 1, yield; close the connection cleanly after the block."""
    login = address.user or "guest"
    passcode = address.password or ("guest" if address.user is None else "")
    stream = await connect_stream(address.host, port, tls=address.tls, cafile=address.cafile)
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
