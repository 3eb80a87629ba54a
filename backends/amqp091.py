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

Broker mapping (docs/backends.md). One connection per instance; a non-durable
*direct* exchange ``settings.exchange``, declared idempotently; one queue per
process named ``triows.<instance_id>.<random>`` by the client (GarageMQ refuses
server-named queues; for its other quirks see :data:`BROKER_QUIRKS`);
``subscribe``/``unsubscribe`` are ``queue.bind``/``queue.unbind`` of the key.
Those of different keys do not wait for each other one by one: the changes
waiting when a round trip ends go out together in the next, in the order they
were asked for (:class:`backends.amqp091_aio.BindingBatcher`), so a connect
or join waits for at most the batch in flight and its own, not for every
other user's churn.

The queue outlives its connection. It is durable (RabbitMQ 4.3 refuses
non-durable non-exclusive queues; messages stay transient), neither exclusive
nor auto-delete, and carries ``x-expires`` = ``TRIOWS_QUEUE_EXPIRES``, so the broker deletes it
(with its bindings) only once nothing has consumed from it for that long. A
connection that is closed, dropped or silent therefore loses nothing the
broker confirmed: the messages wait in the queue, deliveries the old
connection had not acked are requeued when the broker drops it, and the
reconnect consumes the same queue again. A redelivered message this instance
had already handed over (its ack died with the connection) is recognised by
its body, which holds a unique message id, and skipped. The price: when an
instance dies without closing, its users' keys stay bound for
``TRIOWS_QUEUE_EXPIRES`` after the broker notices, and a send to a user who
was only there answers ``routed`` rather than 404 until then. A graceful close
deletes the queue at once. ``publish`` uses ``mandatory`` on a
channel in publisher-confirm mode: aiormq turns a ``basic.return`` into
``PublishError`` (-> ``UNROUTED``), an ack into a result (-> ``ROUTED``) and a
nack into ``DeliveryError`` (-> :class:`BrokerUnavailable`; with sessions,
``FULL``: a session queue over its bound refused it).

Sessions (:mod:`backends.amqp091_sessions`): a queue per session, consumed on
a channel of their own; user keys are then bound (``subscribe``) to an
exclusive queue of length 0 on ``<exchange>.live``, so that a send can tell
``routed`` (a session of the user is connected) from ``queued``. Not on
GarageMQ, which ignores ``x-expires``: its ``hello`` says not resumable.

Backpressure. aiormq runs the consumer callback as one asyncio task per
delivery. The callback only puts the delivery, without waiting, on a Trio
buffer of ``settings.prefetch`` entries; it cannot overflow because the broker
never has more than ``prefetch`` unacknowledged deliveries out (``basic.qos``).
A Trio task moves each delivery onto the bounded ``incoming`` stream and only
then acknowledges it, so a server that stops reading stops acking, and the
broker stops delivering and queues for it: backpressure end to end.

Reconnect. Held keys, readiness, the reconnect loop, timeouts and error
classes are :mod:`backends.supervisor`'s; this module's own transient errors
are :data:`backends.amqp091_aio.SESSION_BROKEN`, a refused login (:data:`REFUSED_LOGIN`) and an
exchange declared with another type are permanent. After each reconnect the
exchange and queue are declared again, every held key is re-bound (in batches
of :data:`BINDING_BATCH`), and only then is ``ready`` true. A session also
ends, and is rebuilt the same way, when the broker closes our channel (e.g.
NOT_FOUND after an operator deleted
the exchange) or cancels our consumer (our queue was deleted). Limitation: an
instance learns that the exchange was deleted only when it publishes, so until
then the bindings it held are gone and sends to its users answer 404.
"""

from __future__ import annotations

import logging
import math
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any

import aiormq
import aiormq.abc
import anyio
import trio
import trio_asyncio
from aiormq.exceptions import (
    AuthenticationError,
    ChannelNotFoundEntity,
    ChannelPreconditionFailed,
    ConnectionNotAllowed,
    ProbableAuthenticationError,
)
from yarl import URL

from triows.backend import BrokerUnavailable, Outcome
from triows.backends.amqp091_aio import (
    SESSION_BROKEN,
    AioSession,
    AioSessionLost,
    call_aio,
    close_connection,
    closed,
)
from triows.backends.amqp091_sessions import AmqpSessions
from triows.backends.broker_url import BrokerAddress, parse_broker_urls
from triows.backends.handed_over import HandedOver
from triows.backends.rabbitmq_exchange import HOME_NODE_DOWN
from triows.backends.supervisor import BrokerRejected, Supervised, first_leaf, run_supervised
from triows.logs import log_event
from triows.protocol import USER_KEY_PREFIX
from triows.settings import Settings

REFUSED_LOGIN: tuple[type[BaseException], ...] = (
    # No mechanism in common; ACCESS_REFUSED (403) during the handshake; the
    # virtual host refused (NOT_ALLOWED, 530). Permanent (BrokerRejected).
    AuthenticationError,
    ProbableAuthenticationError,
    ConnectionNotAllowed,
)


SCHEMES = {"amqp": (5672, False), "amqps": (5671, True)}
"""aiormq makes the connection (TLS included); the URL is parsed here to check it."""

ACK_INTERVAL = 0.02
"""At most this long between a delivery and its (batched) ack while traffic is light."""

BINDING_BATCH = 1000
"""Binding changes (subscribes, unsubscribes, a reconnect's restore) per round trip and
per ``broker_timeout``; also the most subscribes and unsubscribes waiting at once."""


@dataclass(frozen=True)
class BrokerQuirks:
    """Where the broker mapping bends for one broker, known by its ``product``."""

    queue_outlives_connection: bool = True
    exchange_type: str = "direct"
    # Session queues need x-expires (and the rest of the session arguments).
    holds_sessions: bool = True


BROKER_QUIRKS: dict[str, BrokerQuirks] = {
    # GarageMQ 0.1 (Debian's build):
    # - it stops answering every later ``queue.declare``, from any client, once
    #   a connection that consumed from an exclusive queue closes, cleanly or
    #   not, and it ignores ``x-expires``. So the queue is auto-delete (deleted
    #   when our consumer goes: what it held is lost with the connection), with
    #   a new name per connection so that it is never shared with the consumer
    #   of a dead connection the broker has not noticed yet;
    # - its direct exchange hands a message to only one of several queues bound
    #   with the same key, which would break "every connection of a user gets
    #   every message". Its topic exchange fans out; keys never contain ``*`` or
    #   ``#`` (user names forbid them), so topic matching stays exact.
    "garagemq": BrokerQuirks(
        queue_outlives_connection=False, exchange_type="topic", holds_sessions=False
    ),
}
"""Brokers whose quirks the backend works around, by lower-cased ``product``."""


def queue_name(instance_id: str) -> str:
    """The queue of one backend, named by the client (not the broker).

    Unique per process even when ``TRIOWS_INSTANCE_ID`` is fixed: a restarted
    instance must not consume the queue of its dead predecessor, which may
    still be bound to keys the new process does not hold.
    """
    return f"triows.{instance_id}.{secrets.token_hex(4)}"


def connection_url(address: BrokerAddress, heartbeat: int) -> URL:
    """The URL of ``address`` for aiormq, with ``heartbeat`` unless the URL sets one.

    aiormq reads TLS's ``cafile`` (and ``capath``, ``keyfile``, ``certfile``)
    from the URL's query itself.
    """
    url = URL(address.url)
    if "heartbeat" in url.query:
        return url
    return url.update_query(heartbeat=heartbeat)


class Amqp091Backend(Supervised[AioSession]):
    """The AMQP 0-9-1 protocol under :class:`backends.supervisor.Supervised`.

    Create it with :func:`open_amqp091_backend`; it is usable (``subscribe``
    records keys, ``publish`` raises :class:`BrokerUnavailable`) before the
    broker first answers.
    """

    LOST = SESSION_BROKEN
    CHANGES_IN_FLIGHT = BINDING_BATCH
    # ``_restore`` queues every change before its first await, and the session's
    # binding changes reach the broker in the order they were queued.
    RESTORES_AT_ONCE = True
    # Each batch of publishes waits at most TRIOWS_PUBLISH_TIMEOUT for its confirms.
    PUBLISH_BOUNDED = True

    def __init__(self, settings: Settings, loop: Any) -> None:
        super().__init__(settings, parse_broker_urls(settings.broker_url, SCHEMES))
        self._loop = loop
        self._queue = queue_name(settings.instance_id)
        self._connections_made = 0
        # The bodies last handed to Trio, across connections: the broker may
        # redeliver any of them after a reconnect (at most ``prefetch`` can be
        # unacked there at a time).
        self._handed_over = HandedOver(settings.prefetch)
        # Keys that may be bound on ``_bound_queue`` (a change the broker did
        # not confirm counts as bound): the queue keeps its bindings across a
        # reconnect, so what was unsubscribed meanwhile is unbound then.
        self._maybe_bound: set[str] = set()
        self._bound_queue = ""
        self._sessions = AmqpSessions(self, settings) if settings.resume_window else None
        # Until a broker says otherwise (GarageMQ, see BROKER_QUIRKS).
        self._holds_sessions = True

    @property
    def sessions(self) -> AmqpSessions | None:
        return self._sessions if self._holds_sessions else None

    @property
    def ready_session(self) -> AioSession | None:
        """The connection while ready (sessions act on it)."""
        return self._ready

    @property
    def broker(self) -> str:
        return self._broker

    @property
    def live_exchange(self) -> str:
        """Where user keys held here are bound, with sessions (see the module docstring)."""
        return f"{self._settings.exchange}.live"

    def _binding_target(self, session: AioSession) -> Callable[[str], tuple[str, str]]:
        exchange = self._settings.exchange
        if self.sessions is None:
            return lambda key: (session.queue, exchange)
        live = (f"{session.queue}.live", self.live_exchange)
        return lambda key: live if key.startswith(USER_KEY_PREFIX) else (session.queue, exchange)

    @property
    def queue(self) -> str:
        """The name of this instance's queue (of its current connection, if any)."""
        session = self._following
        return self._queue if session is None else session.queue

    async def _publish_on(self, session: AioSession, key: str, body: bytes) -> Outcome:
        if self.sessions is None:
            outcome = await session.publish(key, body)
            if outcome is Outcome.FULL:
                raise BrokerUnavailable("the broker refused the message (nack)")
            return outcome
        if not key.startswith(USER_KEY_PREFIX):
            return await session.publish(key, body)
        # The message and its probe go in the same batch (see the module docstring).
        probe: Outcome | None = None

        async def send_probe() -> None:
            nonlocal probe
            probe = await session.publish(key, b"", self.live_exchange)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_probe)
                outcome = await session.publish(key, body)
        except BaseExceptionGroup as group:
            # A lost connection fails both: the caller is told once (a /send: 503).
            raise first_leaf(group, (BrokerUnavailable, *self._loss)) from None
        if outcome is Outcome.ROUTED and probe is not Outcome.ROUTED:
            return Outcome.QUEUED
        return outcome

    async def _subscribe_on(self, session: AioSession, key: str) -> None:
        self._maybe_bound.add(key)
        await session.bindings.enqueue(True, key).wait()

    async def _unsubscribe_on(self, session: AioSession, key: str) -> None:
        await session.bindings.enqueue(False, key).wait()
        self._forget_unbound([key])

    def _forget_unbound(self, keys: list[str]) -> None:
        # A key held again meanwhile has its bind queued behind this unbind.
        self._maybe_bound.difference_update(key for key in keys if key not in self._keys)

    async def _restore(self, session: AioSession, keys: list[str]) -> None:
        if session.queue == self._bound_queue:
            stale = sorted(self._maybe_bound.difference(keys))
        else:
            # A new queue (GarageMQ: one per connection) starts with no
            # binding; the old queue's went with it.
            stale = []
            self._maybe_bound.clear()
            self._bound_queue = session.queue
        self._maybe_bound.update(keys)
        # Queued in one step (see RESTORES_AT_ONCE), so that a change of one
        # of these keys made meanwhile reaches the broker after its restore.
        changes = [session.bindings.enqueue(False, key) for key in stale]
        changes += [session.bindings.enqueue(True, key) for key in keys]
        for change in changes:
            await change.wait()
        self._forget_unbound(stale)
        if self.sessions is not None:
            await self.sessions.reconsume(session)

    def _abandon(self, session: AioSession) -> None:
        session.abandoned.set()

    async def _close(self, session: AioSession) -> None:
        if session.queue == self._queue:
            # It outlives connections (x-expires): closing for good takes it,
            # and its bindings, away at once. (Not on GarageMQ: its auto-delete
            # queue goes with the connection, and deleting a queue we consume
            # from there stops it answering any later queue.declare.)
            # Best effort: the queue expires by itself. A connection lost just
            # now can also fail basic_cancel with a bare Exception from aiormq.
            with suppress(Exception):
                # Our own consumer goes first: deleting a queue still consumed
                # from makes the broker cancel the consumer, which aiormq logs
                # as a warning meant for a cancel nobody here asked for.
                await session.call(session.channel.basic_cancel, session.queue)
                await session.call(session.channel.queue_delete, session.queue)
        await close_connection(self._loop, session.connection, self._settings.close_timeout)

    def _describe(self, session: AioSession) -> dict[str, Any]:
        return {"queue": session.queue}

    async def _session(self, up: Callable[[AioSession], Awaitable[None]]) -> None:
        """Connect, set up, consume until the connection is lost; raise what lost it."""
        settings = self._settings
        connection = await self._connect()
        try:
            buffer_send, buffer_receive = trio.open_memory_channel[aiormq.abc.DeliveredMessage](
                settings.prefetch
            )
            consumer_cancelled = trio.Event()
            # Bounded by basic.qos: each session's consumer holds at most its prefetch.
            session_send, session_receive = trio.open_memory_channel[aiormq.abc.DeliveredMessage](
                math.inf
            )
            session = await self._set_up(connection, buffer_send, consumer_cancelled, session_send)
            lost: BaseException
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._forward, session, buffer_receive)
                settling = trio.CancelScope()
                if self._sessions is not None and session.sessions_channel is not None:
                    nursery.start_soon(self._forward_sessions, self._sessions, session_receive)
                    nursery.start_soon(self._settle, self._sessions, session, settling)
                publishing = trio.CancelScope()
                nursery.start_soon(self._publish, session, publishing)
                changing = trio.CancelScope()
                nursery.start_soon(self._change_bindings, session, changing)
                try:
                    await up(session)
                    lost = await self._wait_broken(session, consumer_cancelled)
                finally:
                    self._lost(session)
                    # Publishes still waiting for this session's confirms, and
                    # binding changes still queued on it, fail now.
                    publishing.cancel()
                    changing.cancel()
                    # Acks of this connection's deliveries mean nothing on the next.
                    settling.cancel()
                    # No more deliveries can come. The forwarder hands over
                    # what is buffered (the senders were told "routed") and
                    # then ends, unless the backend itself is being closed.
                    buffer_send.close()
                    session_send.close()
            raise lost
        finally:
            await close_connection(self._loop, connection, settings.close_timeout)

    async def _connect(self) -> aiormq.abc.AbstractConnection:
        url = connection_url(self._address, self._settings.heartbeat)
        try:
            with anyio.fail_after(self._broker_timeout):
                connection: aiormq.abc.AbstractConnection = await call_aio(
                    self._loop,
                    aiormq.connect,
                    url,
                    client_properties={"connection_name": f"triows {self._settings.instance_id}"},
                )
                return connection
        except StopAsyncIteration as error:
            # aiormq's frame reader ends this way when the broker closes the
            # socket in the middle of the handshake (seen while RabbitMQ shuts
            # down): the same loss as a refused connection.
            raise AioSessionLost("the broker closed the connection during the handshake") from error
        except REFUSED_LOGIN as error:
            raise BrokerRejected(
                "authentication", f"the broker refused the login: {error}", user=url.user
            ) from error

    async def _wait_broken(
        self, session: AioSession, consumer_cancelled: trio.Event
    ) -> BaseException:
        """Wait until the session cannot carry messages any more; return why.

        That is: the connection closed, the broker closed our channel (after
        which aiormq keeps the connection open, and publishing would fail
        forever), the broker cancelled our consumer (our queue was deleted),
        or a subscription change failed (:meth:`_abandon`).
        """
        reason: BaseException | None = None

        async def watch_closing(
            closable: aiormq.abc.AbstractConnection | aiormq.abc.AbstractChannel, what: str
        ) -> None:
            nonlocal reason
            try:
                # Resolved without an error only by a close we asked for.
                await session.call(closed, closable)
                reason = AioSessionLost(f"the {what} was closed")
            except SESSION_BROKEN as error:
                # Reported as a loss even when it was the broker's verdict on
                # our channel: the remedy is the same reconnect.
                reason = AioSessionLost(f"the {what} was closed: {error!r}")
                reason.__cause__ = error
            nursery.cancel_scope.cancel()

        async def watch_sessions_channel(channel: aiormq.abc.AbstractChannel) -> None:
            with suppress(*SESSION_BROKEN):
                await session.call(closed, channel)
            if not session.sessions_released:  # else a drain closed it
                await watch_closing(channel, "sessions channel")

        async def watch_event(event: trio.Event, why: str) -> None:
            nonlocal reason
            await event.wait()
            reason = AioSessionLost(why)
            nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_closing, session.connection, "broker connection")
            nursery.start_soon(watch_closing, session.channel, "channel")
            if session.sessions_channel is not None:
                nursery.start_soon(watch_sessions_channel, session.sessions_channel)
            nursery.start_soon(
                watch_event,
                consumer_cancelled,
                "the broker cancelled the consumer (queue deleted?)",
            )
            nursery.start_soon(
                watch_event, session.abandoned, "dropped after a subscription change failed"
            )
        assert reason is not None  # the nursery ends only after a watcher set it
        return reason

    async def _set_up(
        self,
        connection: aiormq.abc.AbstractConnection,
        deliveries: trio.MemorySendChannel[aiormq.abc.DeliveredMessage],
        consumer_cancelled: trio.Event,
        session_deliveries: trio.MemorySendChannel[aiormq.abc.DeliveredMessage],
    ) -> AioSession:
        settings = self._settings
        self._connections_made += 1
        product = str(connection.server_properties.get("product", "")).lower()
        quirks = BROKER_QUIRKS.get(product, BrokerQuirks())
        if quirks.queue_outlives_connection:
            queue = self._queue
            # Durable: RabbitMQ 4.3 refuses non-durable non-exclusive queues
            # (deprecated feature transient_nonexcl_queues); its advice is a
            # durable queue with a queue TTL. One per process: no cost per message.
            lifetime: dict[str, Any] = {
                "durable": True,
                "auto_delete": False,
                "arguments": {"x-expires": round(settings.queue_expires * 1000)},
            }
        else:
            queue = f"{self._queue}.{self._connections_made}"
            lifetime = {"durable": False, "auto_delete": True}
        with anyio.fail_after(self._broker_timeout):
            channel = await call_aio(self._loop, connection.channel, publisher_confirms=True)
            session = AioSession(self._loop, connection, channel, queue, BINDING_BATCH)
            await self._declare_exchange(session, quirks.exchange_type)
            try:
                await session.call(channel.queue_declare, queue, exclusive=False, **lifetime)
            except ChannelNotFoundEntity as error:
                if queue != self._queue or HOME_NODE_DOWN not in str(error):
                    raise
                # A cluster whose node holding our queue is down (we were
                # connected to it, and moved to another node): the queue, and
                # what it held, is out of reach until that node returns. Take a
                # new queue, here on this connection (the broker closed only
                # the channel), so that the keys are bound again, and sends to
                # our users routed again, without another reconnect; the old
                # queue expires unused (x-expires).
                queue = self._queue = queue_name(settings.instance_id)
                log_event(
                    "broker_queue_replaced",
                    logging.WARNING,
                    broker=self._broker,
                    queue=session.queue,
                    replaced_by=queue,
                    error=str(error),
                )
                channel = await call_aio(self._loop, connection.channel, publisher_confirms=True)
                session = AioSession(self._loop, connection, channel, queue, BINDING_BATCH)
                await session.call(channel.queue_declare, queue, exclusive=False, **lifetime)
            await session.call(channel.basic_qos, prefetch_count=settings.prefetch)

            def on_delivery(message: aiormq.abc.DeliveredMessage) -> None:
                # Runs in aiormq's per-delivery asyncio task, in delivery order;
                # never blocks (see the module docstring on backpressure).
                deliveries.send_nowait(message)

            def on_consumer_cancel(frame: object) -> None:
                consumer_cancelled.set()

            channel.on_consumer_cancel_callbacks.add(on_consumer_cancel)
            # Tagged with the queue's name (one consumer per channel), so that
            # closing can cancel it by name.
            await session.call(
                channel.basic_consume, queue, on_delivery, no_ack=False, consumer_tag=queue
            )
            self._holds_sessions = quirks.holds_sessions
            if self.sessions is not None:
                await self._set_up_sessions(session, session_deliveries)
        return session

    async def _set_up_sessions(
        self,
        session: AioSession,
        deliveries: trio.MemorySendChannel[aiormq.abc.DeliveredMessage],
    ) -> None:
        """The live exchange and queue, and the channel sessions are consumed on."""
        channel = session.channel
        await session.call(
            channel.exchange_declare,
            exchange=self.live_exchange,
            exchange_type="direct",
            durable=False,
        )
        # Length 0: a probe routed here is dropped at once (routed, never delivered).
        await session.call(
            channel.queue_declare,
            f"{session.queue}.live",
            exclusive=True,
            auto_delete=True,
            arguments={"x-max-length": 0},
        )
        sessions_channel = await call_aio(self._loop, session.connection.channel)
        await session.call(
            sessions_channel.basic_qos, prefetch_count=self._settings.session_prefetch
        )

        def on_session_delivery(message: aiormq.abc.DeliveredMessage) -> None:
            deliveries.send_nowait(message)  # bounded by basic.qos per session

        session.sessions_channel = sessions_channel
        session.on_session_delivery = on_session_delivery

    async def _declare_exchange(self, session: AioSession, exchange_type: str) -> None:
        exchange = self._settings.exchange
        try:
            await session.call(
                session.channel.exchange_declare,
                exchange=exchange,
                exchange_type=exchange_type,
                durable=False,
            )
        except ChannelPreconditionFailed as error:
            # Declared by someone else with other arguments: no reconnect
            # soon will change that, only an operator.
            text = str(error)
            current = re.search(r"current is '([^']*)'", text)
            raise BrokerRejected(
                "configuration",
                f"exchange {exchange!r} exists with other arguments: {text}",
                exchange=exchange,
                wanted_type=exchange_type,
                current_type=current.group(1) if current else "unknown",
            ) from error

    async def _publish(self, session: AioSession, scope: trio.CancelScope) -> None:
        with scope:
            await session.run_publisher(self._settings.exchange, self._settings.publish_timeout)

    async def _change_bindings(self, session: AioSession, scope: trio.CancelScope) -> None:
        with scope:
            await session.run_binding_changes(self._binding_target(session), self._broker_timeout)

    async def _forward(
        self,
        session: AioSession,
        deliveries: trio.MemoryReceiveChannel[aiormq.abc.DeliveredMessage],
    ) -> None:
        # Acks go out with ``multiple``: at once every half prefetch, else
        # within ACK_INTERVAL, so a steady stream costs a few acks a second
        # rather than one per message (py-spy: one ack write per delivery was
        # ~15 % of a receiving instance's CPU).
        batch = max(1, self._settings.prefetch // 2)
        unacked = 0
        handed_over = self._handed_over
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._ack_periodically, session)
            async for message in deliveries:
                body = message.body
                # A redelivery of what an earlier connection handed over but
                # could not ack (see the module docstring) is only acked.
                if not (message.redelivered and body in handed_over):
                    delivery = (message.routing_key or "", body)
                    try:
                        self._incoming_send.send_nowait(delivery)
                    except anyio.WouldBlock:
                        await self._incoming_send.send(delivery)
                    handed_over.add(body)
                # Always set on a basic.deliver.
                session.delivered_tag = message.delivery_tag or session.delivered_tag
                unacked += 1
                if unacked >= batch:
                    unacked = 0
                    await session.ack()
                else:
                    session.ack_wanted.set()
            nursery.cancel_scope.cancel()

    async def _settle(
        self, sessions: AmqpSessions, session: AioSession, scope: trio.CancelScope
    ) -> None:
        with scope:
            await sessions.settle_periodically(session)

    async def _forward_sessions(
        self,
        sessions: AmqpSessions,
        deliveries: trio.MemoryReceiveChannel[aiormq.abc.DeliveredMessage],
    ) -> None:
        async for message in deliveries:
            sessions.hand_over(message)

    async def _ack_periodically(self, session: AioSession) -> None:
        while True:
            await session.ack_wanted.wait()
            await trio.sleep(ACK_INTERVAL)
            session.ack_wanted = trio.Event()
            await session.ack()


def check_settings(settings: Settings) -> None:
    """Refuse a malformed broker URL (any of the list) at start-up (raises ``SettingsError``)."""
    parse_broker_urls(settings.broker_url, SCHEMES)


@asynccontextmanager
async def open_amqp091_backend(settings: Settings) -> AsyncIterator[Amqp091Backend]:
    """Open the AMQP 0-9-1 backend and keep it connected until the block exits.

    Returns after the first connection attempt: :attr:`~Amqp091Backend.ready`
    if the broker is up, otherwise retrying in the background. On exit the
    connection is closed (the broker then deletes this instance's queue).
    """
    async with (
        trio_asyncio.open_loop() as loop,
        run_supervised(Amqp091Backend(settings, loop)) as backend,
    ):
        yield backend
