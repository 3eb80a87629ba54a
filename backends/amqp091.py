"""AMQP 0-9-1 backend (RabbitMQ, LavinMQ, GarageMQ ...) on aiormq, hosted in Trio.

Hosting. aiormq speaks asyncio only. trio-asyncio runs an asyncio event loop
*inside* the Trio run: asyncio callbacks and tasks are stepped by a Trio task on
the same thread, and Trio code awaits asyncio code through ``aio_as_trio``. So
aiormq is used unchanged and no OS thread is on the message path. Each backend
opens its own loop (``trio_asyncio.open_loop()``) for exactly as long as it is
open, and every call names that loop explicitly, because the Trio tasks that
call :meth:`Amqp091Backend.publish` (request handlers) were not started inside
it. That keeps several backends in one Trio run, and one backend per
``trio.run`` (as pytest-trio runs each test), independent of each other. The
alternatives were worse: aiormq on its own asyncio loop in a thread puts a
thread hop on every message, and a hand-written client on pamqp would replace
the library the user chose.

Broker mapping (DESIGN §5). One connection per instance; a non-durable
*direct* exchange ``settings.exchange``, declared idempotently; one exclusive,
auto-delete queue per instance named ``triows.<instance_id>`` by the client
(GarageMQ refuses server-named queues; for its other quirks see
:data:`BROKER_QUIRKS`); ``subscribe``/``unsubscribe`` are
``queue.bind``/``queue.unbind`` of the key. ``publish`` uses ``mandatory`` on a
channel in publisher-confirm mode: aiormq turns a ``basic.return`` into
``PublishError`` (-> ``UNROUTED``), an ack into a result (-> ``ROUTED``) and a
nack into ``DeliveryError`` (-> :class:`BrokerUnavailable`).

Backpressure. aiormq runs the consumer callback as one asyncio task per
delivery. The callback only puts the delivery, without waiting, on a Trio
buffer of ``settings.prefetch`` entries; it cannot overflow because the broker
never has more than ``prefetch`` unacknowledged deliveries out (``basic.qos``).
A Trio task moves each delivery onto the bounded ``incoming`` stream and only
then acknowledges it, so a server that stops reading stops acking, and the
broker stops delivering and queues for it: backpressure end to end.

Reconnect. A connection lost or refused (the exceptions in
:data:`BROKER_LOST`, and nothing else) makes ``ready`` false, and ``publish``
then raises :class:`BrokerUnavailable` at once. The backend reconnects forever
with capped, jittered exponential backoff (``settings.reconnect_max_delay``),
declares the exchange and queue again, re-binds every key it holds, consumes,
and only then is ``ready`` again. Every broker operation waits at most
``settings.publish_timeout``. A session also ends, and is rebuilt the same way,
when the broker closes our channel (e.g. NOT_FOUND after an operator deleted
the exchange) or cancels our consumer (our queue was deleted). Limitation: an
instance learns that the exchange was deleted only when it publishes, so until
then the bindings it held are gone and sends to its users answer 404.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any, NoReturn

import aiormq
import aiormq.abc
import anyio
import trio
import trio_asyncio
from aiormq.exceptions import (
    AMQPChannelError,
    AMQPConnectionError,
    ChannelInvalidStateError,
    ChannelLockedResource,
    DeliveryError,
    PublishError,
)
from anyio.abc import ObjectReceiveStream, ObjectSendStream
from yarl import URL

from triows.backend import BrokerUnavailable, Delivery, Outcome
from triows.backoff import Backoff
from triows.logs import log_event
from triows.settings import Settings


class ConnectionLost(ConnectionError):
    """The session's connection or channel is gone, or the broker dropped our consumer.

    Also what an aiormq operation's ``asyncio.CancelledError`` becomes: aiormq
    rejects the pending operations of a closing connection that way, and
    trio-asyncio passes it through unchanged when no Trio scope was cancelled,
    so there it means "the broker went away".
    """


BROKER_LOST: tuple[type[BaseException], ...] = (
    # Refused, reset or unreachable sockets, DNS failures, socket timeouts.
    ConnectionError,
    OSError,
    # The broker closed the connection or failed the handshake (includes
    # aiormq's ConnectionClosed family: CONNECTION_FORCED on shutdown, ...).
    AMQPConnectionError,
    # An operation on a channel whose connection already closed.
    ChannelInvalidStateError,
    # After a network loss the broker may still hold our old connection, and
    # with it our exclusive queue, until its heartbeat expires: retry later.
    ChannelLockedResource,
    # Our own bound on a broker operation (connect, declare, bind, confirm).
    trio.TooSlowError,
)
"""What a lost or unreachable broker raises; anything else propagates."""

SESSION_BROKEN: tuple[type[BaseException], ...] = (*BROKER_LOST, AMQPChannelError)
"""What ends one session but not the backend: a lost broker, or the broker
closing our channel (e.g. NOT_FOUND when an operator deleted the exchange).
Either way the reconnect declares and binds everything again."""


REBIND_BATCH = 1000
"""Bindings restored per round trip (and per ``publish_timeout``) after a reconnect."""


@dataclass(frozen=True)
class BrokerQuirks:
    """Where the broker mapping bends for one broker, known by its ``product``."""

    exclusive_queue: bool = True
    exchange_type: str = "direct"


BROKER_QUIRKS: dict[str, BrokerQuirks] = {
    # GarageMQ 0.1 (Debian's build):
    # - it stops answering every later ``queue.declare``, from any client, once
    #   a connection that consumed from an exclusive queue closes, cleanly or
    #   not. So the queue is non-exclusive and auto-delete (deleted when our
    #   consumer goes, as an exclusive one would be), with a new name per
    #   connection so that it is never shared with the consumer of a dead
    #   connection the broker has not noticed yet;
    # - its direct exchange hands a message to only one of several queues bound
    #   with the same key, which would break "every connection of a user gets
    #   every message". Its topic exchange fans out; keys never contain ``*`` or
    #   ``#`` (user names forbid them), so topic matching stays exact.
    "garagemq": BrokerQuirks(exclusive_queue=False, exchange_type="topic"),
}
"""Brokers whose quirks the backend works around, by lower-cased ``product``."""


def queue_name(instance_id: str) -> str:
    """The queue of one instance, named by the client (not the broker)."""
    return f"triows.{instance_id}"


def connection_url(settings: Settings) -> URL:
    """``settings.broker_url`` with the heartbeat setting, unless the URL sets one."""
    url = URL(settings.broker_url)
    if "heartbeat" in url.query:
        return url
    return url.update_query(heartbeat=settings.heartbeat)


class _Session:
    """One live connection with its channel, set up and consuming."""

    def __init__(
        self,
        loop: Any,
        connection: aiormq.abc.AbstractConnection,
        channel: aiormq.abc.AbstractChannel,
        queue: str,
    ) -> None:
        self.loop = loop
        self.connection = connection
        self.channel = channel
        self.queue = queue

    async def call(
        self, operation: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any
    ) -> Any:
        """Await an aiormq operation from Trio."""
        return await _call_aio(self.loop, operation, *args, **kwargs)


async def _call_aio(
    loop: Any, operation: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any
) -> Any:
    try:
        return await trio_asyncio.aio_as_trio(operation, loop=loop)(*args, **kwargs)
    except asyncio.CancelledError as error:
        raise ConnectionLost("the broker connection closed during the operation") from error


class Amqp091Backend:
    """The trio-side :class:`triows.backend.Backend` over one AMQP 0-9-1 connection.

    Create it with :func:`open_amqp091_backend`; it is usable (``subscribe``
    records keys, ``publish`` raises :class:`BrokerUnavailable`) before the
    broker first answers.
    """

    def __init__(
        self,
        settings: Settings,
        loop: Any,
        incoming_send: ObjectSendStream[Delivery],
        incoming_receive: ObjectReceiveStream[Delivery],
    ) -> None:
        self._settings = settings
        self._loop = loop
        self._incoming_send = incoming_send
        self._incoming_receive = incoming_receive
        self._queue = queue_name(settings.instance_id)
        self._connections_made = 0
        self._url = connection_url(settings)
        self._keys: set[str] = set()
        # Serialises every bind/unbind with the re-binding after a reconnect,
        # so the broker's bindings end up equal to ``_keys`` whatever the
        # interleaving of subscribe, unsubscribe and reconnect.
        self._bindings_lock = trio.Lock()
        self._session: _Session | None = None
        self._ready_changed = trio.Event()

    @property
    def ready(self) -> bool:
        """Connected, every held key bound, and consuming."""
        return self._session is not None

    @property
    def incoming(self) -> ObjectReceiveStream[Delivery]:
        """``(key, body)`` for the keys this instance holds, in broker order (bounded)."""
        return self._incoming_receive

    @property
    def queue(self) -> str:
        """The name of this instance's queue (of its current connection, if any)."""
        session = self._session
        return self._queue if session is None else session.queue

    async def wait_ready(self, ready: bool = True) -> None:
        """Return once :attr:`ready` equals ``ready`` (for start-up probes and tests)."""
        while self.ready != ready:
            await self._ready_changed.wait()

    async def publish(self, key: str, body: bytes) -> Outcome:
        """Publish ``body`` verbatim to ``key`` and wait for the broker's confirm.

        Returns ``ROUTED`` if a queue took it and ``UNROUTED`` if the broker
        returned it (nobody holds the key). Raises :class:`BrokerUnavailable`
        at once while disconnected, and when the broker nacks, the connection
        drops, or no confirm comes within ``settings.publish_timeout``. On
        cancellation the message may or may not have been published.
        """
        session = self._session
        if session is None:
            raise BrokerUnavailable("not connected to the AMQP broker")
        try:
            # ``wait=False``: do not hold aiormq's channel lock until the frame
            # has been written to the socket, so concurrent publishes pipeline
            # (about three times the throughput at 16 concurrent senders); the
            # broker's confirm, awaited all the same, is what a 2xx promises.
            with trio.fail_after(self._settings.publish_timeout):
                await session.call(
                    session.channel.basic_publish,
                    body,
                    exchange=self._settings.exchange,
                    routing_key=key,
                    mandatory=True,
                    wait=False,
                )
        except PublishError:
            return Outcome.UNROUTED
        except DeliveryError as error:
            raise BrokerUnavailable(f"the broker refused the message: {error}") from None
        except trio.TooSlowError:
            raise BrokerUnavailable(
                f"no confirm from the broker within {self._settings.publish_timeout}s"
            ) from None
        except SESSION_BROKEN as error:
            raise BrokerUnavailable(f"lost the AMQP broker: {error!r}") from None
        return Outcome.ROUTED

    async def subscribe(self, key: str) -> None:
        """Bind ``key`` to this instance's queue; held across reconnects. Never raises
        :class:`BrokerUnavailable`: while disconnected the key is bound on reconnect."""
        async with self._bindings_lock:
            self._keys.add(key)
            await self._change_binding("queue_bind", key)

    async def unsubscribe(self, key: str) -> None:
        """Unbind ``key``; while disconnected it is simply not bound again."""
        async with self._bindings_lock:
            self._keys.discard(key)
            await self._change_binding("queue_unbind", key)

    async def _change_binding(self, method: str, key: str) -> None:
        session = self._session
        if session is None:
            return
        try:
            with trio.fail_after(self._settings.publish_timeout):
                await session.call(
                    getattr(session.channel, method),
                    session.queue,
                    self._settings.exchange,
                    routing_key=key,
                )
        except SESSION_BROKEN as error:
            # The session is gone or going; the reconnect makes the broker's
            # bindings equal to ``_keys`` again. A broker that does not answer
            # at all is treated as lost, so that the reconnect restores a
            # known state instead of guessing whether this change happened.
            log_event(
                "broker_binding_deferred",
                logging.WARNING,
                operation=method,
                key=key,
                error=repr(error),
            )
            await _close_connection(self._loop, session.connection, self._settings.close_timeout)

    async def maintain_connection(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Connect, and reconnect after every loss, until cancelled."""
        backoff = Backoff(max_delay=self._settings.reconnect_max_delay)
        task_status.started()
        while True:
            try:
                await self._run_session(backoff)
            except BROKER_LOST as error:
                await backoff.wait_after_loss(_safe_url(self._url), error)

    async def _run_session(self, backoff: Backoff) -> NoReturn:
        """Connect, set up, consume until the connection is lost; raise what lost it."""
        settings = self._settings
        try:
            with trio.fail_after(settings.publish_timeout):
                connection = await _call_aio(
                    self._loop,
                    aiormq.connect,
                    self._url,
                    client_properties={"connection_name": f"triows {settings.instance_id}"},
                )
        except StopAsyncIteration as error:
            # aiormq's frame reader ends this way when the broker closes the
            # socket in the middle of the handshake (seen while RabbitMQ shuts
            # down): the same loss as a refused connection.
            raise ConnectionLost("the broker closed the connection during the handshake") from error
        try:
            buffer_send, buffer_receive = trio.open_memory_channel[aiormq.abc.DeliveredMessage](
                settings.prefetch
            )
            consumer_cancelled = trio.Event()
            session = await self._set_up(connection, buffer_send, consumer_cancelled)
            backoff.reset()
            log_event("broker_connected", broker=_safe_url(self._url), queue=session.queue)
            lost: BaseException
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._forward, session, buffer_receive)
                try:
                    lost = await self._wait_broken(session, consumer_cancelled)
                finally:
                    self._set_session(None)
                    # No more deliveries can come. The forwarder hands over
                    # what is buffered (the senders were told "routed") and
                    # then ends, unless the backend itself is being closed.
                    buffer_send.close()
            raise lost
        finally:
            self._set_session(None)
            await _close_connection(self._loop, connection, settings.close_timeout)

    async def _wait_broken(
        self, session: _Session, consumer_cancelled: trio.Event
    ) -> BaseException:
        """Wait until the session cannot carry messages any more; return why.

        That is: the connection closed, the broker closed our channel (after
        which aiormq keeps the connection open, and publishing would fail
        forever), or the broker cancelled our consumer (our queue was deleted).
        """
        reason: BaseException | None = None

        async def watch_closing(
            closable: aiormq.abc.AbstractConnection | aiormq.abc.AbstractChannel, what: str
        ) -> None:
            nonlocal reason
            try:
                # Resolved without an error only by a close we asked for (a
                # binding change that timed out): a loss all the same.
                await session.call(_closed, closable)
                reason = ConnectionLost(f"the {what} was closed")
            except SESSION_BROKEN as error:
                # Reported as a loss even when it was the broker's verdict on
                # our channel: the remedy is the same reconnect.
                reason = ConnectionLost(f"the {what} was closed: {error!r}")
                reason.__cause__ = error
            nursery.cancel_scope.cancel()

        async def watch_consumer() -> None:
            nonlocal reason
            await consumer_cancelled.wait()
            reason = ConnectionLost("the broker cancelled the consumer (queue deleted?)")
            nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_closing, session.connection, "broker connection")
            nursery.start_soon(watch_closing, session.channel, "channel")
            nursery.start_soon(watch_consumer)
        assert reason is not None  # the nursery ends only after a watcher set it
        return reason

    async def _set_up(
        self,
        connection: aiormq.abc.AbstractConnection,
        deliveries: trio.MemorySendChannel[aiormq.abc.DeliveredMessage],
        consumer_cancelled: trio.Event,
    ) -> _Session:
        settings = self._settings
        self._connections_made += 1
        product = str(connection.server_properties.get("product", "")).lower()
        quirks = BROKER_QUIRKS.get(product, BrokerQuirks())
        exclusive = quirks.exclusive_queue
        queue = self._queue if exclusive else f"{self._queue}.{self._connections_made}"
        with trio.fail_after(settings.publish_timeout):
            channel = await _call_aio(self._loop, connection.channel, publisher_confirms=True)
            session = _Session(self._loop, connection, channel, queue)
            await session.call(
                channel.exchange_declare,
                exchange=settings.exchange,
                exchange_type=quirks.exchange_type,
                durable=False,
            )
            await session.call(
                channel.queue_declare,
                queue,
                exclusive=exclusive,
                auto_delete=True,
                durable=False,
            )
            await session.call(channel.basic_qos, prefetch_count=settings.prefetch)

            def on_delivery(message: aiormq.abc.DeliveredMessage) -> None:
                # Runs in aiormq's per-delivery asyncio task, in delivery order;
                # never blocks (see the module docstring on backpressure).
                deliveries.send_nowait(message)

            def on_consumer_cancel(frame: object) -> None:
                consumer_cancelled.set()

            channel.on_consumer_cancel_callbacks.add(on_consumer_cancel)
            await session.call(channel.basic_consume, queue, on_delivery, no_ack=False)
        async with self._bindings_lock:
            keys = sorted(self._keys)
            for start in range(0, len(keys), REBIND_BATCH):
                with trio.fail_after(settings.publish_timeout):
                    await session.call(
                        _bind_pipelined,
                        channel,
                        queue,
                        settings.exchange,
                        keys[start : start + REBIND_BATCH],
                    )
            # Published while the lock is held, so no subscribe or unsubscribe
            # can slip between the re-binding and ``ready``.
            self._set_session(session)
        return session

    async def _forward(
        self,
        session: _Session,
        deliveries: trio.MemoryReceiveChannel[aiormq.abc.DeliveredMessage],
    ) -> None:
        # Acks go out with ``multiple`` whenever the buffer runs empty (or every
        # half prefetch), so a burst costs a few acks, not one per message.
        batch = max(1, self._settings.prefetch // 2)
        unacked = 0
        last_tag = 0
        async for message in deliveries:
            key = message.routing_key or ""
            await self._incoming_send.send((key, message.body))
            last_tag = message.delivery_tag or last_tag  # always set on a basic.deliver
            unacked += 1
            if unacked >= batch or deliveries.statistics().current_buffer_used == 0:
                unacked = 0
                # If the connection is gone, so is the queue: nothing to ack.
                with suppress(*BROKER_LOST):
                    await session.call(
                        session.channel.basic_ack, last_tag, multiple=True, wait=False
                    )

    def _set_session(self, session: _Session | None) -> None:
        if (session is None) == (self._session is None):
            self._session = session
            return
        self._session = session
        log_event("broker_ready" if session else "broker_not_ready")
        self._ready_changed.set()
        self._ready_changed = trio.Event()


async def _bind_pipelined(
    channel: aiormq.abc.AbstractChannel, queue: str, exchange: str, keys: list[str]
) -> None:
    # Runs on the asyncio side, so a batch costs one Trio-asyncio crossing.
    # Every bind but the last goes out with ``nowait``; the last waits for its
    # reply. The broker handles a channel's methods in order, so that reply
    # means the whole batch is in place (a failed bind closes the channel,
    # and the last call raises).
    if not keys:
        return
    for key in keys[:-1]:
        await channel.queue_bind(queue, exchange, routing_key=key, nowait=True)
    await channel.queue_bind(queue, exchange, routing_key=keys[-1])


async def _closed(closable: aiormq.abc.AbstractConnection | aiormq.abc.AbstractChannel) -> None:
    # ``closing`` is a fresh observer future that aiormq resolves (with the
    # reason as its exception, for a loss) when the connection or channel
    # closes; cancelling the observer does not close anything.
    await closable.closing


async def _close_connection(
    loop: Any, connection: aiormq.abc.AbstractConnection, grace: float
) -> None:
    # Shielded: this also runs while the backend is being cancelled, and the
    # broker should see a clean close (it deletes our exclusive queue at once).
    with trio.CancelScope(shield=True), trio.move_on_after(grace), suppress(*BROKER_LOST):
        await _call_aio(loop, connection.close)


def _safe_url(url: URL) -> str:
    """The broker URL without its password, for logs."""
    return str(url.with_password(None).with_query(None))


@asynccontextmanager
async def open_amqp091_backend(settings: Settings) -> AsyncIterator[Amqp091Backend]:
    """Open the AMQP 0-9-1 backend and keep it connected until the block exits.

    Returns at once, whether or not the broker answers: :attr:`~Amqp091Backend.ready`
    turns true once the broker is connected, set up and consuming. On exit the
    connection is closed (the broker then deletes this instance's queue).
    """
    send, receive = anyio.create_memory_object_stream[Delivery](settings.incoming_queue)
    async with send, receive, trio_asyncio.open_loop() as loop:
        backend = Amqp091Backend(settings, loop, send, receive)
        async with trio.open_nursery() as nursery:
            await nursery.start(backend.maintain_connection)
            try:
                yield backend
            finally:
                nursery.cancel_scope.cancel()
