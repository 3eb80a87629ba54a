"""AMQP 1.0 backend (RabbitMQ's plugin or 4.x, ActiveMQ, Artemis, Qpid ...) on qpid-proton.

Engine. python-qpid-proton's protocol engine (``Connection``, ``Transport``,
``Collector``, SASL) is sans-IO; :mod:`backends.amqp10_pump` moves its bytes
over an anyio TCP (or TLS, for ``amqps://``) stream. No proton reactor, no
threads: every engine call and every event handler runs in the event loop.

Broker mapping (docs/backends.md). One connection and one session per instance. One
sender link publishes every message; one receiver link per held key receives.
A key's *address* comes from ``settings.address_template`` (``{key}`` and
``{exchange}`` are filled in); when that is empty it is chosen from the
``product`` property of the broker's ``open`` frame and logged:

How keys become addresses, how messages are sent and what each outcome
means is the pure policy of :mod:`backends.amqp10_addressing`; the links of
one connection are kept by :mod:`backends.amqp10_links`; this module runs the
connection and handles proton's events. RabbitMQ never creates the exchange
(a link to a missing one ends the whole session with ``amqp:not-found``) and
AMQP 1.0 cannot declare one on 3.x, so the backend declares it over AMQP
0-9-1 on the same port (:mod:`backends.rabbitmq_exchange`).

Queues that outlive the connection (RabbitMQ, ``/exchange/X/{key}``
addresses). RabbitMQ 3.10's plugin gives a ``/exchange/X/K`` *source* a
server-named ``amq.gen-`` queue (``rabbit_amqp1_0_outgoing_link:ensure_source``
through ``rabbit_routing_util:ensure_endpoint``: no name can be asked for,
the terminus's ``expiry-policy`` and the link name are ignored, the attach
answer does not say which queue), which outlives the link (rabbitmq-server
#2588) but cannot be found again: what a lost connection's links had
queued was stranded. So each held key gets a queue named by the backend,
``triows.<instance_id>.<random>.<n>.<key>`` (unique per process and per
subscription of a key, kept across reconnects), declared and bound to the
exchange with the key over AMQP 0-9-1 (durable, as RabbitMQ 4.3 refuses
non-durable non-exclusive queues, messages transient; neither exclusive nor
auto-delete; ``x-expires`` = ``TRIOWS_QUEUE_EXPIRES``), and consumed by a
receiver link whose source is ``/amq/queue/<name>`` (which consumes an
existing queue, declaring nothing). Deliveries are unsettled until handed
over (below), so when a connection is closed, dropped or silent the broker
requeues what it had not seen settled, and the reconnect attaches to the
same queues: what the broker confirmed meanwhile waits there. So does what
is published for a key subscribed while no connection follows the keys (not
back yet, or lost under the subscribe): its queue is declared and bound over
AMQP 0-9-1 all the same before ``subscribe`` returns, which needs no AMQP 1.0
connection, and the reconnect attaches to it. A redelivery
(``first-acquirer`` false) of a body this instance already handed over, its
settlement lost with the connection, is skipped: bodies hold a unique
message id, and per queue the digests of the last ``prefetch`` bodies handed
over are kept (the broker can have at most one credit window unsettled on a
link). The queues of released keys (also those released while disconnected)
and, on a graceful close, all of them are deleted over AMQP 0-9-1; one that
cannot be deleted expires. The price: after an instance dies without
closing, its users' queues stay bound for ``TRIOWS_QUEUE_EXPIRES``, and each
first subscribe of a key costs one AMQP 0-9-1 connection (a reconnect
declares every held key's queue on one). Other brokers keep the
connection-bound links of the key's address: what was in flight to a lost
connection is lost there.

Sessions (``TRIOWS_RESUME_WINDOW`` > 0) on RabbitMQ with
``/exchange/<TRIOWS_EXCHANGE>/{key}`` addresses: :mod:`backends.amqp10_sessions`
(a queue per session declared over AMQP 0-9-1, consumed on a connection of
its own). Users' and rooms' keys then go to session queues only, and
``subscribe`` of such a key attaches nothing (RabbitMQ 3.x cannot tell a
sender whether a user is connected). Other brokers hold no sessions.

Receiving. Each receiver link has at most ``settings.prefetch`` credit out.
Complete deliveries go to a backlog (bounded by the credit); one task moves
them onto the bounded ``incoming`` stream, and only then settles each with
``accepted`` (RabbitMQ 3.10 ends the session on a bare settle: "Unrecognised
state: undefined") and tops the link's credit back up once half is used. A
server that stops reading therefore stops granting credit, and the broker
stops sending: backpressure end to end.

Reconnect, readiness, held keys, timeouts and errors are
:mod:`backends.supervisor`'s; after each reconnect every held key's queue is
declared and its receiver link attached before ``ready``. Heartbeats: the connection's idle
timeout is ``settings.heartbeat`` seconds (0 disables it); the broker sends
empty frames at half that, and a broker silent for longer is treated as lost.

Link changes. ``subscribe`` and ``unsubscribe`` of different keys run
concurrently, up to :data:`LINK_CHANGES_IN_FLIGHT` waiting for the broker at
once; no backend-wide lock is held across the broker's answer (which on
RabbitMQ includes declaring and binding the key's queue). One synchronous step
of the set-up reads the held keys, makes the connection the one changes
follow (the supervisor's ``_following``) and makes a subscription for every
key (its link attached once its queue is declared): a change made before that
step only edits the held keys, which the set-up then restores; a change made
after it finds or makes the key's subscription on that connection, or drops
it (a subscription dropped before its link was attached gets none). Nothing
awaits between reading that state and acting on it, so it needs no lock. The
router serialises the changes of one key.
"""

from __future__ import annotations

import itertools
import logging
import secrets
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any

import anyio
from proton import Connection, Delivery, Endpoint, Event, Link, Receiver, Sender, Transport, symbol

from triows.backend import Outcome, Sessions
from triows.backends.amqp10_addressing import Addressing, choose_addressing, outcome, parse_urls
from triows.backends.amqp10_links import (
    LINK_ANSWERS,
    SESSION_ENDS,
    Amqp10Connection,
    HeldQueue,
    LinkRefused,
    Received,
    Subscription,
    condition,
    message_body,
)
from triows.backends.amqp10_pump import ConnectionLost, Wakeup
from triows.backends.amqp10_sessions import Amqp10Sessions
from triows.backends.broker_url import connect_stream
from triows.backends.handed_over import HandedOver
from triows.backends.rabbitmq_exchange import (
    QueueOutOfReach,
    RetiredQueues,
    declare_bound_queues,
    declare_direct_exchange,
)
from triows.backends.supervisor import BrokerRejected, Supervised, run_supervised
from triows.logs import log_event
from triows.protocol import ROOM_KEY_PREFIX, USER_KEY_PREFIX
from triows.settings import Settings

LINK_CHANGES_IN_FLIGHT = 16
"""The most subscribes and unsubscribes waiting for the broker's answer at once.

RabbitMQ 3.x handles one session's attaches and detaches one after another
(an attach declares and binds a queue: about 2.5 ms), so more in flight would
not finish sooner; they would only queue at the broker, where the wait for an
answer (bounded by ``settings.broker_timeout``) would count time spent behind
thousands of others, and a busy broker would be taken for a lost one."""


class Amqp10Backend(Supervised[Amqp10Connection]):
    """The AMQP 1.0 protocol under :class:`backends.supervisor.Supervised`.

    Create it with :func:`open_amqp10_backend`; it is usable (``subscribe``
    records keys, ``publish`` raises ``BrokerUnavailable``) before the broker
    first answers.
    """

    LOST = (ConnectionLost, LinkRefused)
    CHANGES_IN_FLIGHT = LINK_CHANGES_IN_FLIGHT
    # ``_restore`` makes every key's subscription before its first await.
    RESTORES_AT_ONCE = True

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, parse_urls(settings.broker_url))
        self._backlog: deque[Received] = deque()
        self._backlog_changed = Wakeup()
        # Queues that outlive their connection (RabbitMQ, ``/exchange/``
        # addresses): one per held key, named by us, unique per process and per
        # subscription of the key, so that a new process or a key subscribed
        # again never consumes what an earlier subscription left behind.
        self._queue_prefix = f"triows.{settings.instance_id}.{secrets.token_hex(4)}"
        self._queues: dict[str, HeldQueue] = {}  # held key -> its queue
        # The exchange the queues are bound to, from the broker of the latest
        # connection (None before the first, and where queues do not outlive it).
        self._queue_exchange: str | None = None
        self._queues_made = itertools.count(1)
        # Queues no longer consumed, deleted over AMQP 0-9-1.
        self._retired = RetiredQueues(
            lambda: (self._address, self._address.port), timeout=self._broker_timeout
        )
        # Session queues (RabbitMQ only: backends/amqp10_sessions.py), and the
        # addresses chosen on the latest connection, which say whether it can.
        self._sessions = (
            Amqp10Sessions(settings, lambda: self._address, self._proton_connection)
            if settings.resume_window
            else None
        )
        self._latest_addressing: Addressing | None = None

    @property
    def sessions(self) -> Sessions | None:
        """Session queues on RabbitMQ with ``/exchange/<TRIOWS_EXCHANGE>/{key}`` addresses
        (as of the latest connection); None on other brokers."""
        addressing = self._latest_addressing
        if addressing is None or addressing.queue_exchange != self._settings.exchange:
            return None
        return self._sessions

    def _held_by_sessions(self, key: str) -> bool:
        """With sessions, users' and rooms' messages go to session queues only: a key of
        theirs only says a connection is here, which RabbitMQ 3.x cannot tell a sender."""
        return self.sessions is not None and key.startswith((USER_KEY_PREFIX, ROOM_KEY_PREFIX))

    @property
    def queues(self) -> dict[str, str]:
        """The queue of each held key, on a broker where queues outlive connections."""
        return {key: queue.name for key, queue in self._queues.items()}

    @property
    def addressing(self) -> Addressing | None:
        """The addresses chosen for the broker of the current connection (None while down)."""
        return self._following.addressing if self._following else None

    # -- the protocol --

    async def _publish_on(self, live: Amqp10Connection, key: str, body: bytes) -> Outcome:
        pending = await live.send(key, body)
        assert live.addressing is not None
        return outcome(
            pending.state, pending.undeliverable_here, pending.condition, live.addressing
        )

    def _held_queue(self, live: Amqp10Connection, key: str) -> HeldQueue | None:
        """The key's queue (made now if it has none), where queues outlive connections."""
        assert live.addressing is not None
        if live.addressing.queue_exchange is None:
            return None
        return self._key_queue(key)

    def _key_queue(self, key: str) -> HeldQueue:
        queue = self._queues.get(key)
        if queue is None:
            name = f"{self._queue_prefix}.{next(self._queues_made)}.{key}"
            queue = self._queues[key] = HeldQueue(
                name, HandedOver(self._settings.prefetch, digests=True)
            )
        return queue

    async def _declare(self, live: Amqp10Connection, subscriptions: list[Subscription]) -> None:
        """Declare and bind the queues of ``subscriptions`` (those that have one)."""
        exchange = live.addressing.queue_exchange if live.addressing else None
        queues = [(s.queue.name, s.key) for s in subscriptions if s.queue is not None]
        try:
            await self._declare_queues(exchange, queues)
        except QueueOutOfReach as error:
            # Our queues were made on a cluster node that is down (we were
            # connected to it, and moved to another node): what they hold is
            # out of reach until it returns. New queues for these keys, declared
            # now for this connection's links, so that sends to our users are
            # routed again without another reconnect; the old ones expire
            # unused. (Another key's queue from that node is replaced the same
            # way when it is declared.)
            log_event(
                "broker_queue_replaced",
                logging.WARNING,
                broker=self._broker,
                queues=len(queues),
                error=str(error),
            )
            for subscription in subscriptions:
                if subscription.queue is None:
                    continue
                if self._queues.get(subscription.key) is subscription.queue:
                    del self._queues[subscription.key]
                subscription.queue = self._held_queue(live, subscription.key)
            await self._declare_queues(
                exchange, [(s.queue.name, s.key) for s in subscriptions if s.queue]
            )

    async def _declare_queues(self, exchange: str | None, queues: list[tuple[str, str]]) -> None:
        """Declare each ``(queue, key)`` and bind it to ``exchange`` (over AMQP 0-9-1)."""
        if exchange is None or not queues:
            return
        await declare_bound_queues(
            self._address,
            port=self._address.port,
            exchange=exchange,
            expires=self._settings.queue_expires,
            batch_timeout=self._broker_timeout,
            queues=queues,
        )

    async def _subscribe_offline(self, key: str) -> None:
        # No AMQP 1.0 connection follows the keys (not yet back, or lost under
        # this subscribe), but the key's queue is declared over AMQP 0-9-1,
        # which needs none: bound now, it keeps what is published for the key
        # from here on, and the reconnect attaches to it. Without it, what was
        # published between this return and the reconnect's restore had no
        # queue to go to. A broker that is down refuses at once; one that does
        # not answer is given the usual bound. Either way the restore declares
        # the queue again, and the reconnect loop's broker_unavailable lines
        # already report a broker out of reach: no line per key here.
        exchange = self._queue_exchange
        if exchange is None:
            return
        queue = self._key_queue(key)
        with (
            anyio.move_on_after(self._broker_timeout),
            suppress(QueueOutOfReach, *self._broker_failures),
        ):
            await self._declare_queues(exchange, [(queue.name, key)])

    def _attach(self, live: Amqp10Connection, subscription: Subscription) -> None:
        """Attach the subscription's link, unless it has one or is not the key's any more."""
        if subscription.link is not None or not live.is_current(subscription):
            return
        assert live.addressing is not None
        queue = subscription.queue
        address = f"/amq/queue/{queue.name}" if queue else live.addressing.address(subscription.key)
        live.attach(subscription, address, self._settings.prefetch)

    async def _subscribe_on(self, live: Amqp10Connection, key: str) -> None:
        if self._held_by_sessions(key):
            return
        # A subscription already made for the key (the set-up's, or that of a
        # cancelled subscribe) is waited for, never doubled: two links would
        # deliver every message twice.
        subscription = live.subscriptions.get(key)
        if subscription is None:
            subscription = live.add_subscription(key, self._held_queue(live, key))
            try:
                await self._declare(live, [subscription])
            except BaseException:
                # Failed or cancelled before its link: not the key's any more.
                if live.subscriptions.get(key) is subscription and subscription.link is None:
                    del live.subscriptions[key]
                    subscription.changed.kick()
                raise
            self._attach(live, subscription)
        await live.wait_attached(subscription)

    async def _unsubscribe_on(self, live: Amqp10Connection, key: str) -> None:
        subscription = live.subscriptions.pop(key, None)
        try:
            if subscription is None:
                return
            subscription.changed.kick()  # a subscribe of it waiting for its link
            link = subscription.link
            if link is None:
                return  # unsubscribed while its queue was being declared
            link.close()
            live.pump.wake()
            try:
                await live.wait_detached(subscription)
            finally:
                live.by_link.pop(link.name, None)
            # Both ends detached: proton keeps a link until it is freed, and
            # the connection lives as long as the instance (one link and one
            # name per user's last disconnect or room leave otherwise). Its
            # deliveries still in the backlog are skipped as a closed link's.
            link.free()
            live.detached.discard(link.name)
        finally:
            # Answered, failed or cut short: nothing consumes its queue any
            # more. RabbitMQ keeps a queue after its link detaches, so it is
            # deleted over AMQP 0-9-1 (or expires).
            self._retire(key)

    async def _restore(self, live: Amqp10Connection, keys: list[str]) -> None:
        # Keys released while no connection followed them: their queues still
        # hold (and receive) their messages, and nothing consumes them again.
        for key in sorted(set(self._queues).difference(keys)):
            self._retire(key)
        # Every key's subscription is made before any await (see
        # RESTORES_AT_ONCE): a change of a key meanwhile finds it.
        made = [
            live.subscriptions.get(key) or live.add_subscription(key, self._held_queue(live, key))
            for key in keys
            if not self._held_by_sessions(key)
        ]
        # Each step is bounded on its own: an instance must not fail its
        # reconnect just by holding many keys.
        await self._declare(live, made)
        # Then every link is attached at once, and waited for: one round trip,
        # not one per key.
        for subscription in made:
            self._attach(live, subscription)
        for subscription in made:
            with anyio.fail_after(self._broker_timeout):
                await live.wait_attached(subscription)

    def _retire(self, key: str) -> None:
        queue = self._queues.pop(key, None)
        if queue is not None:
            self._retired.add(queue.name)

    async def _delete_every_queue(self) -> None:
        # Closing for good: nothing will consume them again.
        queues, self._queues = self._queues, {}
        await self._retired.delete_now(queue.name for queue in queues.values())

    async def aclose(self) -> None:
        """Close as :meth:`Supervised.aclose` does, deleting this process's queues.

        Also while disconnected: the broker may answer again meanwhile.
        """
        connected = self._following is not None
        await super().aclose()
        if not connected and (self._queues or self._retired):
            with anyio.CancelScope(shield=True), anyio.move_on_after(self._settings.close_timeout):
                await self._delete_every_queue()

    def _abandon(self, live: Amqp10Connection) -> None:
        if not live.ended and not live.pump.connection.state & Endpoint.LOCAL_CLOSED:
            live.pump.connection.close()
            live.pump.wake()

    async def _close(self, live: Amqp10Connection) -> None:
        try:
            if not live.ended:
                live.pump.connection.close()
                live.pump.wake()
                await live.wait_ended()
        finally:
            await self._delete_every_queue()

    def _describe(self, live: Amqp10Connection) -> dict[str, Any]:
        addressing = live.addressing
        assert addressing is not None
        return {
            "family": addressing.family,
            "address_template": addressing.template,
            "sender_target": addressing.sender_target,
            "queues_outlive_connection": addressing.queue_exchange is not None,
        }

    def _background(self) -> list[Callable[[], Awaitable[None]]]:
        tasks: list[Callable[[], Awaitable[None]]] = [
            self._forward_deliveries,
            self._retired.delete_as_added,
        ]
        if self._sessions is not None:
            tasks.append(self._sessions.run)
        return tasks

    async def _session(self, up: Callable[[Amqp10Connection], Awaitable[None]]) -> None:
        """One connection, from connect to loss; returns only after :meth:`aclose`."""
        settings = self._settings
        with anyio.fail_after(self._broker_timeout):
            address = self._address
            stream = await connect_stream(
                address.host, address.port, tls=address.tls, cafile=address.cafile
            )
        live = self._new_connection()
        pump_failed: ConnectionLost | None = None
        failure: BaseException | None = None

        async def run_pump() -> None:
            nonlocal pump_failed
            try:
                await live.pump.run(stream)
            except ConnectionLost as error:
                pump_failed = error
            finally:
                self._lost(live)
                live.fail_pending()

        # Errors are kept and raised after the task group: raised inside it
        # they would arrive wrapped in an exception group.
        async with anyio.create_task_group() as tasks:
            live.pump.connection.open()
            live.session.open()
            live.pump.wake()
            tasks.start_soon(run_pump)
            try:
                with anyio.fail_after(self._broker_timeout):
                    await self._open_sender(live)
                await up(live)
                await live.wait_for(lambda: False)  # until the connection ends
            except self._broker_failures as error:
                failure = error
                if not live.ended:
                    live.pump.connection.close()
                    live.pump.wake()
                    # Give the close frame a moment to leave; the pump ends then.
                    # (Not ``wait_for``: its ConnectionLost, raised here, would
                    # leave the task group wrapped in a group.)
                    with anyio.move_on_after(settings.close_timeout):
                        await live.wait_ended()
                    tasks.cancel_scope.cancel()
        if self._closing:
            return
        if isinstance(failure, BrokerRejected):
            raise failure
        if pump_failed is not None and "unauthorized-access" in str(pump_failed):
            raise BrokerRejected(
                "authentication", f"the broker refused the login: {pump_failed}"
            ) from pump_failed
        raise pump_failed or failure or ConnectionLost("the broker connection ended")

    def _new_connection(self) -> Amqp10Connection:
        connection, transport = self._proton_connection()
        return Amqp10Connection(connection, transport, self._on_event)

    def _proton_connection(self) -> tuple[Connection, Transport]:
        """A proton connection and transport for the current node, with our login and heartbeat."""
        target, settings = self._address, self._settings
        connection = Connection()
        connection.container = settings.instance_id
        # RabbitMQ reads the virtual host from the open frame's hostname.
        connection.hostname = f"vhost:{target.vhost}" if target.vhost != "/" else target.host
        connection.properties = {symbol("product"): "triows"}
        transport = Transport()
        transport.idle_timeout = settings.heartbeat
        sasl = transport.sasl()
        if target.user is not None:
            connection.user = target.user
            connection.password = target.password or ""
            sasl.allowed_mechs("PLAIN")
            # The credentials cross the network in clear on amqp://, as they do
            # with every AMQP 0-9-1 client's PLAIN; use amqps:// to protect them.
            sasl.allow_insecure_mechs = True
        else:
            sasl.allowed_mechs("ANONYMOUS")
        return connection, transport

    async def _open_sender(self, live: Amqp10Connection) -> None:
        connection = live.pump.connection
        await live.wait_for(lambda: bool(connection.state & Endpoint.REMOTE_ACTIVE))
        addressing = choose_addressing(
            self._settings, connection.remote_properties, connection.remote_offered_capabilities
        )
        live.addressing = self._latest_addressing = addressing
        self._queue_exchange = addressing.queue_exchange
        exchange = addressing.rabbitmq_exchange
        if exchange is not None:
            # RabbitMQ never creates the exchange, and AMQP 1.0 cannot declare
            # one on 3.x: declared over AMQP 0-9-1 on the same port.
            await declare_direct_exchange(self._address, port=self._address.port, exchange=exchange)
        sender = live.session.sender("triows:publish")
        if addressing.sender_target is not None:  # else the null target: anonymous relay
            sender.target.address = addressing.sender_target
        sender.snd_settle_mode = Link.SND_UNSETTLED
        sender.open()
        live.pump.wake()
        await live.wait_for(
            lambda: (
                bool(sender.state & (Endpoint.REMOTE_ACTIVE | Endpoint.REMOTE_CLOSED))
                or bool(live.session.state & Endpoint.REMOTE_CLOSED)
            )
        )
        refusal = condition(sender) or condition(live.session)
        if refusal or not sender.state & Endpoint.REMOTE_ACTIVE:
            raise LinkRefused(f"the broker refused the sender link: {refusal or 'detached'}")
        live.sender = sender

    def _on_event(self, live: Amqp10Connection, event: Event) -> None:
        """Every proton event of one connection; runs synchronously, never blocks."""
        kind = event.type
        link = event.link
        if kind == Event.DELIVERY:
            if isinstance(link, Sender) and event.delivery is not None:
                self._on_outcome(live, event.delivery)
            elif isinstance(link, Receiver):
                self._on_receivable(live, link)
        elif kind in (Event.LINK_REMOTE_CLOSE, Event.LINK_REMOTE_DETACH) and link is not None:
            live.detached.add(link.name)
        connection = live.pump.connection
        unasked = kind in (Event.SESSION_REMOTE_CLOSE, Event.CONNECTION_REMOTE_CLOSE) or (
            kind in (Event.LINK_REMOTE_CLOSE, Event.LINK_REMOTE_DETACH)
            and link is not None
            and not link.state & Endpoint.LOCAL_CLOSED
        )
        if unasked and not connection.state & Endpoint.LOCAL_CLOSED:
            # The broker ended something we did not: a refused attach, a deleted
            # queue, a session error, its own shutdown. Start over from a clean
            # connection, which restores every held key.
            culprit = link or event.session or connection
            log_event(
                "broker_endpoint_closed",
                logging.WARNING,
                proton_event=str(kind),
                condition=condition(culprit),
            )
            connection.close()
        live.changed.kick()
        if kind in LINK_ANSWERS and link is not None:
            subscription = live.by_link.get(link.name)
            if subscription is not None:
                subscription.changed.kick()
        elif kind in SESSION_ENDS:
            live.kick_links()

    def _on_outcome(self, live: Amqp10Connection, delivery: Delivery) -> None:
        if delivery.remote_state == 0 and not delivery.settled:
            return  # a flow or partial update, not an outcome yet
        pending = live.pending.pop(delivery.tag, None)
        if pending is not None:
            remote = delivery.remote
            # Settled with no state: the link's default outcome, accepted.
            pending.state = int(delivery.remote_state) or Delivery.ACCEPTED
            pending.undeliverable_here = bool(remote.undeliverable)
            pending.condition = str(remote.condition.description) if remote.condition else ""
            pending.done.set()
        delivery.settle()

    def _on_receivable(self, live: Amqp10Connection, link: Receiver) -> None:
        subscription = live.by_link.get(link.name)
        while (current := link.current) is not None and current.readable and not current.partial:
            data = link.recv(current.pending) or b""
            link.advance()
            if subscription is None or not link.state & Endpoint.LOCAL_ACTIVE:
                # A late delivery on a link we closed: nobody here holds the key.
                current.update(Delivery.RELEASED)
                current.settle()
                continue
            decoded = message_body(data)
            if decoded is None:
                log_event("broker_delivery_dropped", logging.WARNING, key=subscription.key)
                current.update(Delivery.REJECTED)
                current.settle()
                continue
            body, redelivered, _subject = decoded
            subscription.outstanding += 1
            self._backlog.append(Received(subscription, body, redelivered, current, live))
        self._backlog_changed.kick()

    async def _forward_deliveries(self) -> None:
        """Hand each received message to ``incoming``, then settle it and top up credit."""
        prefetch = self._settings.prefetch
        while True:
            while not self._backlog:
                await self._backlog_changed.wait()
            received = self._backlog.popleft()
            subscription = received.subscription
            queue = subscription.queue
            # A redelivery of what an earlier connection handed over but could
            # not settle (see the module docstring) is only settled. One task
            # hands over in backlog order, so whatever a lost connection had
            # received is remembered before its redeliveries are looked at.
            if queue is None or not (received.redelivered and received.body in queue.handed_over):
                # Messages of a connection that is gone are still handed over:
                # the broker gave them to us (and told their senders so).
                await self._incoming_send.send((subscription.key, received.body))
                if queue is not None:
                    queue.handed_over.add(received.body)
            subscription.outstanding -= 1
            live, link = received.connection, subscription.link
            assert link is not None  # deliveries come only on attached links
            if live.ended or not link.state & Endpoint.LOCAL_ACTIVE:
                continue
            self._accept(received)
            unused = link.credit + subscription.outstanding
            if unused <= prefetch // 2:
                link.flow(prefetch - unused)
            live.pump.wake()

    def _accept(self, received: Received) -> None:
        """Settle a delivery handed over: the broker forgets it once this arrives."""
        received.delivery.update(Delivery.ACCEPTED)
        received.delivery.settle()


def check_settings(settings: Settings) -> None:
    """Refuse a malformed broker URL (any of the list) at start-up (raises ``SettingsError``)."""
    parse_urls(settings.broker_url)


@asynccontextmanager
async def open_amqp10_backend(settings: Settings) -> AsyncIterator[Amqp10Backend]:
    """Open the AMQP 1.0 backend; returns after the first connection attempt.

    Ready if the broker is up, otherwise retrying in the background. On exit
    the connection is closed gracefully (``TRIOWS_CLOSE_TIMEOUT``).
    """
    async with run_supervised(Amqp10Backend(settings)) as backend:
        yield backend
