"""Session queues on AMQP 0-9-1 (RabbitMQ): one queue per session, at the broker.

Each session is a queue named by :func:`triows.session.queue_name`, durable
(RabbitMQ 4 refuses transient non-exclusive queues; its messages stay
transient), bound to the session's keys on the exchange, with the bounds as
arguments::

    x-expires                 TRIOWS_RESUME_WINDOW   (deleted once unused that long)
    x-max-length              TRIOWS_SESSION_MAX_MESSAGES
    x-max-length-bytes        TRIOWS_SESSION_MAX_BYTES
    x-overflow                reject-publish         (the publisher gets a nack: "full")
    x-single-active-consumer  true                   (a resume waits for the old consumer)
    x-queue-type              TRIOWS_QUEUE_TYPE      (quorum: replicated over a cluster)

Every session of the instance is consumed on one channel of the instance's
connection, the *sessions channel*, with ``basic.qos`` = ``TRIOWS_SESSION_PREFETCH``
per consumer and manual acks: a delivery is acked once its frame is written,
and the unacked ones of a session that goes away are rejected with requeue,
so they go back to the head of its queue, in order. A SIGKILLed instance's
connection takes its unacked deliveries back to the queues the same way.

What may fail on a queue that is not there (a resume's passive declare, which
the broker answers by closing the channel) runs on a channel of its own, opened
for it; the sessions channel only ever sees operations on queues it consumes.
After a reconnect every session still open here is declared, bound and
consumed again on the new connection's channel; what it had not acked comes
back flagged redelivered, and the session recognises what it wrote already
(:class:`triows.session.SessionLink`).

A send to a user is also a *probe*: an empty message to the exchange
``<exchange>.live``, where each instance binds the user keys it holds a
connection of to an exclusive queue of length 0 (dropped at once, so the probe
costs no delivery). The message says ``routed``/``unrouted``/``full``; the probe
says whether one of those sessions is connected now (``routed``) or none
(``queued``). An instance that dies takes its exclusive queue, and so its
users' liveness, with it.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import TYPE_CHECKING, Any

import aiormq
import aiormq.abc
import anyio
import trio
from aiormq.exceptions import ChannelNotFoundEntity

from triows.backend import (
    LOST_KEY,
    NOTE_KEY,
    BrokerUnavailable,
    SessionDeliver,
    SessionDelivery,
)
from triows.backends.amqp091_aio import SESSION_BROKEN, AioSession
from triows.backends.rabbitmq_exchange import HOME_NODE_DOWN, QueueOutOfReach
from triows.backends.rabbitmq_sessions import session_queue_arguments
from triows.logs import log_event
from triows.settings import Settings

if TYPE_CHECKING:
    from triows.backends.amqp091 import Amqp091Backend

# Resumes (each opens a channel of its own for its passive declare) and
# re-consumes after a reconnect at once.
OPENS_AT_ONCE = 64
# At most this long between writing a frame and acking its delivery.
ACK_INTERVAL = 0.01
# Delivery tags are per channel: a session tag carries the channel's generation.
_GENERATION_SHIFT = 40


class AmqpSessionQueue:
    """One session's queue, on the sessions channel (a :class:`triows.backend.SessionQueue`)."""

    def __init__(
        self, sessions: AmqpSessions, name: str, key: str, deliver: SessionDeliver, waiting: int
    ) -> None:
        self._sessions = sessions
        self.name = name
        self.keys = {key}
        self.deliver: SessionDeliver | None = deliver
        self._waiting = waiting
        # Delivery tags (of the current channel) handed over and not acked.
        self.unacked: set[int] = set()
        self.closed = False

    @property
    def waiting(self) -> int:
        return self._waiting

    async def bind(self, key: str) -> None:
        self.keys.add(key)
        await self._sessions.change_binding(self, key, bind=True)

    async def unbind(self, key: str) -> None:
        self.keys.discard(key)
        await self._sessions.change_binding(self, key, bind=False)

    async def note(self, body: bytes) -> None:
        await self._sessions.note(self, body)

    def ack(self, tag: int) -> None:
        self._sessions.ack(self, tag)

    async def _stop(self) -> None:
        """Take no more deliveries (cancel the consumer); what is unacked stays so."""
        if self.deliver is None:
            return
        self.deliver = None
        await self._sessions.cancel(self)

    async def detach(self) -> None:
        if self.closed:
            return
        self.closed = True
        with trio.CancelScope(shield=True):
            await self._stop()
            await self._sessions.give_back(self)

    async def end(self) -> None:
        if self.closed:
            return
        self.closed = True
        with trio.CancelScope(shield=True):
            await self._stop()
            await self._sessions.delete(self)


class AmqpSessions:
    """Every session queue this instance consumes (see :class:`triows.backend.Sessions`)."""

    def __init__(self, backend: Amqp091Backend, settings: Settings) -> None:
        self._backend = backend
        self._settings = settings
        self._exchange = settings.exchange
        self._arguments = session_queue_arguments(settings, overflow="reject-publish")
        self._timeout = settings.broker_timeout
        self._opening = trio.Semaphore(OPENS_AT_ONCE)
        self.handles: dict[str, AmqpSessionQueue] = {}
        # Acks and rejects waiting to go out on the sessions channel, in order.
        self._settlements: list[tuple[bool, int]] = []
        self._settle_wanted = trio.Event()
        self._settling = trio.Lock()
        self._generations = itertools.count(1)
        self.generation = 0

    def _session(self) -> AioSession:
        session = self._backend.ready_session
        channel = None if session is None else session.sessions_channel
        if session is None or channel is None or channel.is_closed:
            # Closed: the connection is being rebuilt (or the instance drains).
            raise BrokerUnavailable(f"not connected to the broker {self._backend.broker}")
        return session

    async def _call(
        self,
        session: AioSession,
        operation: Callable[..., Awaitable[Any]],
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        try:
            # anyio's raises TimeoutError (trio's TooSlowError is not one).
            with anyio.fail_after(self._timeout):
                return await session.call(operation, *args, **kwargs)
        except TimeoutError:
            raise BrokerUnavailable(f"no answer from the broker in {self._timeout}s") from None
        except SESSION_BROKEN as error:
            raise BrokerUnavailable(f"lost the broker: {error!r}") from None

    async def open(
        self, name: str, key: str, deliver: SessionDeliver, *, resume: bool
    ) -> AmqpSessionQueue | None:
        session = self._session()
        async with self._opening:
            if resume:
                waiting = await self._probe(session, name)
                if waiting is None:
                    return None
            else:
                try:
                    await self._declare(session, name)
                except QueueOutOfReach as error:  # the node we are on is going down
                    raise BrokerUnavailable(str(error)) from None
                waiting = 0
            handle = AmqpSessionQueue(self, name, key, deliver, waiting)
            self.handles[name] = handle
            try:
                await self._consume(session, handle)
            except BaseException:
                self.handles.pop(name, None)
                raise
        return handle

    async def _probe(self, session: AioSession, name: str) -> int | None:
        """Messages waiting in queue ``name``, or None when it is not there (expired, unknown)."""
        try:
            declared = await self._declare_on_probe_channel(session, name, passive=True)
        except ChannelNotFoundEntity:
            return None
        count: int = declared.message_count or 0
        return count

    async def _declare(self, session: AioSession, name: str) -> None:
        """Declare session queue ``name``; raises :class:`QueueOutOfReach` if its node is down."""
        try:
            await self._declare_on_probe_channel(session, name, passive=False)
        except ChannelNotFoundEntity as error:
            if HOME_NODE_DOWN in str(error):
                raise QueueOutOfReach(str(error)) from None
            raise BrokerUnavailable(f"the broker refused the session queue: {error}") from None

    async def _declare_on_probe_channel(
        self, session: AioSession, name: str, *, passive: bool
    ) -> Any:
        """``queue.declare`` on the channel kept for what the broker may refuse.

        A declare the broker refuses (a passive one of a queue that is not
        there, one whose cluster node is down) makes it close the channel, so
        these go on a channel of their own, opened again after such a close;
        a declare that was on it meanwhile is asked again. Raises
        ``ChannelNotFoundEntity`` for the refusal, ``BrokerUnavailable`` else.
        """
        arguments = (
            {} if passive else {"durable": True, "auto_delete": False, "arguments": self._arguments}
        )
        for attempt in (1, 2):
            channel = await self._probe_channel(session)
            try:
                with anyio.fail_after(self._timeout):
                    return await session.call(
                        channel.queue_declare, name, passive=passive, **arguments
                    )
            except ChannelNotFoundEntity:
                raise
            except TimeoutError:
                raise BrokerUnavailable(f"no answer from the broker in {self._timeout}s") from None
            except SESSION_BROKEN as error:
                if attempt == 2 or session.connection.is_closed:
                    raise BrokerUnavailable(f"lost the broker: {error!r}") from None
        raise AssertionError("unreachable")

    async def _probe_channel(self, session: AioSession) -> aiormq.abc.AbstractChannel:
        channel = session.probe_channel
        if channel is None or channel.is_closed:
            channel = await self._call(session, session.connection.channel)
            session.probe_channel = channel
        return channel

    async def _consume(self, session: AioSession, handle: AmqpSessionQueue) -> None:
        channel = session.sessions_channel
        assert channel is not None
        for key in sorted(handle.keys):
            # No wait for the answer: the queue is there (declared, or found by
            # the probe), so nothing can refuse it; the consume's answer follows it.
            await self._call(
                session, channel.queue_bind, handle.name, self._exchange, key, nowait=True
            )
        await self._call(
            session,
            channel.basic_consume,
            handle.name,
            session.on_session_delivery,
            no_ack=False,
            consumer_tag=handle.name,
        )

    async def reconsume(self, session: AioSession) -> None:
        """After a reconnect: declare, bind and consume every open session again."""
        self.generation = next(self._generations)
        self._settlements.clear()
        handles = [handle for handle in self.handles.values() if handle.deliver is not None]
        for handle in handles:
            handle.unacked.clear()  # the old channel's tags; the broker gives them back

        async def again(handle: AmqpSessionQueue) -> None:
            try:
                async with self._opening:
                    try:
                        await self._declare(session, handle.name)
                    except QueueOutOfReach as error:
                        # Its cluster node is down (the instance moved to
                        # another): the session goes on live in a new queue,
                        # and what the old one holds waits there for that node
                        # (a later resume finds neither and starts afresh).
                        replaced = f"{handle.name}.{self.generation}"
                        log_event(
                            "broker_queue_replaced",
                            logging.WARNING,
                            queue=handle.name,
                            replaced_by=replaced,
                            error=str(error),
                        )
                        self.handles.pop(handle.name, None)
                        handle.name = replaced
                        self.handles[replaced] = handle
                        await self._declare(session, handle.name)
                    await self._consume(session, handle)
            except (BrokerUnavailable, QueueOutOfReach):
                # Its connection closes and its client resumes; the others go on.
                self.handles.pop(handle.name, None)
                deliver, handle.deliver = handle.deliver, None
                if deliver is not None:
                    deliver(SessionDelivery(LOST_KEY, b"", 0, False))

        async with trio.open_nursery() as nursery:
            for handle in handles:
                nursery.start_soon(again, handle)
        if handles:
            log_event("sessions_consumed_again", sessions=len(handles))

    async def release(self) -> None:
        """A drain: the waiting acks go out, then the sessions channel closes.

        Closing it gives every unacked delivery back to its queue and ends
        every consumer in one step (a cancel and a reject per session took a
        round trip each, one at a time on the channel: 15 sessions a second).
        """
        handles = list(self.handles.values())
        self.handles.clear()
        for handle in handles:
            handle.deliver = None
            handle.closed = True
            handle.unacked.clear()
        session = self._backend.ready_session
        if session is None or session.sessions_channel is None:
            return
        await self._settle(session)
        self.generation = next(self._generations)  # later acks are of the closed channel
        channel, session.sessions_channel = session.sessions_channel, None
        session.sessions_released = True
        with anyio.move_on_after(self._timeout), suppress(*SESSION_BROKEN):
            await session.call(channel.close)

    def hand_over(self, message: aiormq.abc.DeliveredMessage) -> None:
        """A delivery of the sessions channel, in the Trio task that forwards them."""
        raw = message.delivery_tag or 0
        handle = self.handles.get(message.consumer_tag or "")
        if handle is None or handle.deliver is None:
            # Stopped meanwhile: back to its queue.
            self._settlements.append((False, raw))
            self._settle_wanted.set()
            return
        handle.unacked.add(raw)
        # A note comes by the default exchange, with the queue's name as its key.
        key = message.routing_key or ""
        handle.deliver(
            SessionDelivery(
                NOTE_KEY if key == handle.name else key,
                message.body,
                (self.generation << _GENERATION_SHIFT) | raw,
                bool(message.redelivered),
            )
        )

    def ack(self, handle: AmqpSessionQueue, tag: int) -> None:
        if tag >> _GENERATION_SHIFT != self.generation:
            return  # of a channel gone with its connection: the broker gave it back
        raw = tag & ((1 << _GENERATION_SHIFT) - 1)
        if raw in handle.unacked:
            handle.unacked.discard(raw)
            self._settlements.append((True, raw))
            self._settle_wanted.set()

    async def settle_periodically(self, session: AioSession) -> None:
        """Send the waiting acks and rejects every ``ACK_INTERVAL`` (one crossing each time)."""
        while True:
            await self._settle_wanted.wait()
            await trio.sleep(ACK_INTERVAL)
            self._settle_wanted = trio.Event()
            await self._settle(session)

    async def _settle(self, session: AioSession) -> None:
        async with self._settling:
            settlements, self._settlements = self._settlements, []
            channel = session.sessions_channel
            if not settlements or channel is None:
                return
            with suppress(*SESSION_BROKEN):
                await session.call(_settle, channel, settlements)

    async def cancel(self, handle: AmqpSessionQueue) -> None:
        session = self._backend.ready_session
        if session is None or session.sessions_channel is None:
            return
        with suppress(BrokerUnavailable):
            await self._call(session, session.sessions_channel.basic_cancel, handle.name)

    async def give_back(self, handle: AmqpSessionQueue) -> None:
        """Reject (requeue) what ``handle`` holds unacked, after the acks already waiting."""
        self.handles.pop(handle.name, None)
        self._settlements.extend((False, raw) for raw in sorted(handle.unacked))
        handle.unacked.clear()
        session = self._backend.ready_session
        if session is not None:
            await self._settle(session)

    async def delete(self, handle: AmqpSessionQueue) -> None:
        self.handles.pop(handle.name, None)
        handle.unacked.clear()
        session = self._backend.ready_session
        if session is None or session.sessions_channel is None:
            return  # it expires unused after the window
        with suppress(BrokerUnavailable):
            await self._call(session, session.sessions_channel.queue_delete, handle.name)

    async def change_binding(self, handle: AmqpSessionQueue, key: str, *, bind: bool) -> None:
        session = self._session()
        assert session.sessions_channel is not None
        change = (
            session.sessions_channel.queue_bind if bind else session.sessions_channel.queue_unbind
        )
        await self._call(session, change, handle.name, self._exchange, key)

    async def note(self, handle: AmqpSessionQueue, body: bytes) -> None:
        """Publish ``body`` to the session's queue itself (the default exchange, by name)."""
        session = self._session()
        outcome = await session.publish(handle.name, body, exchange="")
        if outcome.value != "routed":
            raise BrokerUnavailable(f"the session's queue {handle.name} took no note ({outcome})")


async def _settle(channel: aiormq.abc.AbstractChannel, settlements: list[tuple[bool, int]]) -> None:
    """(asyncio side) Ack (True) or reject with requeue (False) each delivery tag, in order."""
    for ack, tag in settlements:
        if ack:
            await channel.basic_ack(tag, wait=False)
        else:
            await channel.basic_reject(tag, requeue=True)
