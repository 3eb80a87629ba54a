"""Session queues over AMQP 1.0 on RabbitMQ (:class:`triows.backend.Sessions`).

RabbitMQ 3.x's AMQP 1.0 plugin cannot declare a queue with arguments or bind
one, so a session's queue is declared and bound over AMQP 0-9-1 on the same
port, exactly as for STOMP (:mod:`backends.stomp_sessions`, whose docstring
says which arguments and why ``x-overflow`` is ``drop-head``: the AMQP 1.0
plugin's session process crashes on the ``basic.nack`` of a full
``reject-publish`` queue too, aborting the publisher's whole connection).

Each session is consumed on an AMQP 1.0 connection of its own: a receiver
link with source ``/amq/queue/<name>`` (consumes, declares nothing) and
``TRIOWS_SESSION_PREFETCH`` credit, topped up by one for each delivery
settled, so at most that many are unsettled; a delivery is settled
``accepted`` once written to the socket. A redelivery has ``first-acquirer``
false. Why not the instance's connection: on RabbitMQ 3.10.8 unsettled
deliveries released after their link was detached were not given back (the
next consumer got nothing); released while it is attached they would go to
that link again, the queue's single active consumer; and a queue deleted
under an attached link crashes the plugin's session process (no clause for
``basic.cancel``), taking the connection with it. Closing the session's own connection gives every
unsettled delivery back at once, in order, for the next consumer: that is
:meth:`Amqp10SessionQueue.detach`; :meth:`Amqp10SessionQueue.end` closes it
and then deletes the queue. The key of a delivery is its ``subject`` (the
routing key publishers set); the note is sent on a sender link with target
``/amq/queue/<name>`` and subject :data:`triows.backend.NOTE_KEY`. A
connection lost under a session is made again (the backend's backoff).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable

import anyio
from proton import Connection, Delivery, Endpoint, Event, Link, Message, Receiver, Sender, Transport

from triows.backend import NOTE_KEY, BrokerUnavailable, SessionDeliver, SessionDelivery
from triows.backends.amqp10_links import condition, message_body
from triows.backends.amqp10_pump import ConnectionLost, ProtonPump, Wakeup
from triows.backends.broker_url import BrokerAddress, connect_stream
from triows.backends.rabbitmq_sessions import RabbitSessionQueue, RabbitSessions, wait_to_reconnect
from triows.backends.supervisor import TRANSIENT, BrokerRejected, first_leaf
from triows.backoff import Backoff
from triows.logs import log_event
from triows.settings import Settings

LOST: tuple[type[BaseException], ...] = (
    *TRANSIENT,
    ConnectionLost,
    BrokerRejected,
    BrokerUnavailable,
)


class Amqp10Sessions(RabbitSessions["Amqp10SessionQueue"]):
    """Every session queue this instance consumes over AMQP 1.0 on RabbitMQ."""

    def __init__(
        self,
        settings: Settings,
        where: Callable[[], BrokerAddress],
        new_connection: Callable[[], tuple[Connection, Transport]],
    ) -> None:
        # The broker node of the backend's current connection; AMQP 0-9-1 on its port.
        super().__init__(settings, lambda: _on_its_port(where()))
        self.new_connection = new_connection  # configured as the backend's own

    def _new_queue(
        self, name: str, key: str, deliver: SessionDeliver, waiting: int
    ) -> Amqp10SessionQueue:
        return Amqp10SessionQueue(self, name, key, deliver, waiting)


def _on_its_port(address: BrokerAddress) -> tuple[BrokerAddress, int]:
    return address, address.port


class _Live:
    """One connection of a session: its pump and links."""

    def __init__(self, queue: Amqp10SessionQueue, connection: Connection, transport: Transport):
        self.pump = ProtonPump(connection, transport, queue.on_event)
        session = connection.session()
        self.receiver: Receiver = session.receiver(f"triows:session:{queue.name}")
        self.receiver.source.address = f"/amq/queue/{queue.name}"
        self.receiver.snd_settle_mode = Link.SND_UNSETTLED
        self.receiver.rcv_settle_mode = Link.RCV_FIRST
        self.sender: Sender = session.sender(f"triows:note:{queue.name}")
        self.sender.target.address = f"/amq/queue/{queue.name}"
        self.sender.snd_settle_mode = Link.SND_UNSETTLED
        self.notes: dict[str, tuple[anyio.Event, list[int]]] = {}  # tag -> done, [state]
        self.ended = False
        connection.open()
        session.open()
        self.receiver.open()
        self.sender.open()


class Amqp10SessionQueue(RabbitSessionQueue):
    """One session's queue, consumed on an AMQP 1.0 connection of its own (module docstring)."""

    _sessions: Amqp10Sessions

    def __init__(
        self, sessions: Amqp10Sessions, name: str, key: str, deliver: SessionDeliver, waiting: int
    ) -> None:
        super().__init__(sessions, name, key, deliver, waiting)
        self._unsettled: dict[int, tuple[_Live, Delivery]] = {}
        self._note_tags = itertools.count(1)
        self._live: _Live | None = None
        self._changed = Wakeup()
        self._started = False  # the first connection was attached

    # -- the connection --

    async def start(self) -> None:
        """Connect and attach (raises :class:`BrokerUnavailable`); then serve in the background."""
        task_group = self._sessions.task_group
        if task_group is None:
            raise BrokerUnavailable("the AMQP 1.0 backend is not running")
        self._sessions.open_queues.add(self)
        try:
            await task_group.start(self._serve_and_reconnect)
        except LOST as error:
            raise BrokerUnavailable(f"session queue {self.name!r} not consumed: {error}") from error

    async def _serve_and_reconnect(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        backoff = Backoff(self._settings.reconnect_max_delay)
        try:
            with anyio.CancelScope() as self._scope:
                while not self._over:
                    try:
                        if self._started:
                            await self.restore()
                        await self._serve(None if self._started else task_status)
                    except LOST as error:
                        if not self._started:
                            raise  # the first connection: open() says so
                        if self._over:
                            return
                        await wait_to_reconnect(backoff, self.name, error)
                    else:
                        backoff.reset()
        finally:
            self._sessions.open_queues.discard(self)
            self._live = None
            self._gone.set()

    async def _serve(self, task_status: anyio.abc.TaskStatus[None] | None) -> None:
        """One connection, until it ends: returns after our close, raises on a loss."""
        address, _port = self._sessions.where()
        with anyio.fail_after(self._settings.broker_timeout):
            stream = await connect_stream(
                address.host, address.port, tls=address.tls, cafile=address.cafile
            )
        connection, transport = self._sessions.new_connection()
        live = _Live(self, connection, transport)
        self._live = live
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(self._pump, live, stream)
                with anyio.fail_after(self._settings.broker_timeout):
                    await self._wait(
                        live, lambda: _attached(live.receiver) and _attached(live.sender)
                    )
                live.receiver.flow(self._settings.session_prefetch)
                live.pump.wake()
                if task_status is not None:
                    self._started = True
                    task_status.started()
        except BaseExceptionGroup as group:
            raise first_leaf(group, LOST) from None
        finally:
            live.ended = True
            self._changed.kick()
            for done, _state in live.notes.values():
                done.set()

    async def _pump(self, live: _Live, stream: anyio.abc.ByteStream) -> None:
        try:
            await live.pump.run(stream)
        finally:
            live.ended = True
            self._changed.kick()

    async def _wait(self, live: _Live, ready: Callable[[], bool]) -> None:
        while not ready():
            if live.ended:
                raise ConnectionLost(
                    condition(live.receiver) or condition(live.pump.connection) or "ended"
                )
            await self._changed.wait()

    def on_event(self, event: Event) -> None:
        """Every proton event of the session's connection; runs synchronously."""
        live = self._live
        if live is None:
            return
        link = event.link
        if event.type == Event.DELIVERY and isinstance(link, Receiver):
            self._on_receivable(live)
        elif event.type == Event.DELIVERY and isinstance(link, Sender) and event.delivery:
            delivery = event.delivery
            if delivery.remote_state or delivery.settled:
                note = live.notes.pop(delivery.tag, None)
                if note is not None:
                    note[1].append(int(delivery.remote_state) or Delivery.ACCEPTED)
                    note[0].set()
                delivery.settle()
        elif (
            event.type
            in (
                Event.LINK_REMOTE_CLOSE,
                Event.LINK_REMOTE_DETACH,
                Event.SESSION_REMOTE_CLOSE,
                Event.CONNECTION_REMOTE_CLOSE,
            )
            and not live.pump.connection.state & Endpoint.LOCAL_CLOSED
        ):
            # The broker ended something we did not (its shutdown, a refused
            # attach): start over on a new connection.
            log_event(
                "broker_endpoint_closed",
                logging.WARNING,
                proton_event=str(event.type),
                condition=condition(link or event.session or live.pump.connection),
            )
            live.pump.connection.close()
        self._changed.kick()

    def _on_receivable(self, live: _Live) -> None:
        receiver = live.receiver
        while (
            (current := receiver.current) is not None and current.readable and not current.partial
        ):
            data = receiver.recv(current.pending) or b""
            receiver.advance()
            received = message_body(data)
            if received is None:
                # Not a message triows sent: done with it.
                current.update(Delivery.ACCEPTED)
                current.settle()
                receiver.flow(1)
                continue
            tag = next(self._tags)
            self._unsettled[tag] = (live, current)
            if self._deliver is not None:
                body, redelivered, key = received
                self._deliver(SessionDelivery(key, body, tag, redelivered))
            # Detached: left unsettled, given back when the connection closes.

    # -- the contract --

    async def note(self, body: bytes) -> None:
        live = self._live
        if live is None or live.ended:
            raise BrokerUnavailable(f"session queue {self.name!r}: no connection")
        try:
            with anyio.fail_after(self._settings.broker_timeout):
                await self._wait(live, lambda: live.sender.credit > 0)
                tag = f"n{next(self._note_tags)}"
                done, state = live.notes[tag] = (anyio.Event(), [])
                live.sender.send(Message(body=body, subject=NOTE_KEY), tag=tag)
                live.pump.wake()
                await done.wait()
        except (TimeoutError, ConnectionLost) as error:
            raise BrokerUnavailable(f"session queue {self.name!r}: {error}") from error
        if state != [Delivery.ACCEPTED]:
            raise BrokerUnavailable(f"session queue {self.name!r}: the note was not taken")

    def ack(self, tag: int) -> None:
        held = self._unsettled.pop(tag, None)
        if held is None:
            return
        live, delivery = held
        if live.ended or live is not self._live:
            return  # of a lost connection: the broker gives it back anyway
        # RabbitMQ 3.10 ends the session on a bare settle: accepted first.
        delivery.update(Delivery.ACCEPTED)
        delivery.settle()
        live.receiver.flow(1)
        live.pump.wake()

    async def _close(self) -> None:
        live = self._live
        if live is not None and not live.ended:
            live.pump.connection.close()
            live.pump.wake()
            while not live.ended:
                await self._changed.wait()

    async def detach(self) -> None:
        await super().detach()
        self._unsettled.clear()


def _attached(link: Link) -> bool:
    return bool(link.state & Endpoint.REMOTE_ACTIVE)
