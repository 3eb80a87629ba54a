"""STOMP 1.2 backend: ActiveMQ Classic, RabbitMQ's STOMP plugin, Artemis ...

Broker mapping (docs/backends.md). One STOMP connection per instance over an anyio
TCP (or TLS, ``stomp+ssl://``) stream, no threads; frames go through the
sans-IO codec in :mod:`backends.stomp_frames`; one connection's writes, reads,
receipts and acks are :class:`backends.stomp_session.StompSession`.

- ``subscribe(key)`` sends ``SUBSCRIBE`` for the key's destination with a
  ``receipt`` and returns once the ``RECEIPT`` arrives; the subscription id is
  mapped back to the key for every ``MESSAGE``.
- ``publish`` sends ``SEND`` with a ``receipt`` and returns on the
  ``RECEIPT``. STOMP cannot tell whether anyone was subscribed, so the outcome
  is always :attr:`Outcome.ACCEPTED` (``/send`` answers 202 ``accepted``).
- The destination of a key comes from ``TRIOWS_ADDRESS_TEMPLATE`` (with a
  ``{key}`` placeholder). When it is empty it is chosen from the ``server``
  header of ``CONNECTED``: ActiveMQ ``/topic/<exchange>.{key}``, RabbitMQ
  ``/exchange/<exchange>/{key}`` (``<exchange>`` is ``TRIOWS_EXCHANGE``,
  default ``triows``), anything else ``/topic/<exchange>.{key}``.
- On RabbitMQ (``/exchange/`` or ``/topic/`` destinations) each
  subscription's queue outlives its connection. ``SUBSCRIBE`` carries, as
  RabbitMQ 3.10's STOMP plugin reads them (``rabbit_stomp_util:build_params``
  and ``build_arguments``, ``rabbit_routing_util:queue_declare_method``):
  ``x-queue-name`` = ``triows.<instance_id>.<random>.<n>.<key>`` (unique per
  process and per subscription of a key, kept across reconnects),
  ``durable:true`` (RabbitMQ 4.3 refuses non-durable non-exclusive queues;
  the messages stay transient), ``exclusive:false``, ``auto-delete:false``
  (the plugin's default for these destinations is auto-delete, gone with the
  connection),
  ``x-expires`` = ``TRIOWS_QUEUE_EXPIRES`` in ms, ``ack:client`` and
  ``prefetch-count`` = ``TRIOWS_PREFETCH``. A connection that is closed,
  dropped or silent therefore loses nothing the broker confirmed: messages
  wait in the queues, deliveries not yet acked are requeued when the broker
  drops the connection, and the reconnect subscribes the same queues. Acks
  are cumulative (``client`` is ``basic.ack`` with ``multiple`` on the
  plugin's one channel per connection): one ``ACK`` per batch or per
  :data:`backends.stomp_session.ACK_INTERVAL`, never naming a subscription whose ``UNSUBSCRIBE`` is
  written (RabbitMQ answers that with ``ERROR`` and a close). A redelivery
  (``redelivered:true``) of a body this instance already handed over, its ACK
  lost with the connection, is skipped: bodies hold a unique message id. The
  plugin keeps an ``/exchange/`` queue after ``UNSUBSCRIBE`` (it deletes only
  durable ``/topic/`` ones), so the queues of released keys (also those
  released while disconnected) and, on a graceful close, all of them are
  deleted over AMQP 0-9-1 (:func:`backends.rabbitmq_exchange.delete_queues`);
  one that cannot be deleted expires. The price: after an instance dies
  without closing, its users' queues stay bound for ``TRIOWS_QUEUE_EXPIRES``.
- On ActiveMQ Classic (``/topic/`` destinations) each subscription is a
  durable topic subscription, for the same reason: ``CONNECT`` carries
  ``client-id`` = ``triows.<instance_id>.<random>`` (per process, the same on
  every reconnect; RabbitMQ's plugin ignores it), ``SUBSCRIBE``
  ``activemq.subscriptionName`` (named as the queue above), ``ack:client`` and
  ``activemq.prefetchSize`` = ``TRIOWS_PREFETCH``. Non-persistent messages
  are kept for it while its connection is gone, and unacked deliveries are
  redelivered to the reconnect (checked against ActiveMQ 5.17). ActiveMQ's
  cumulative ``ACK`` settles only its subscription's deliveries, so one per
  subscription; it marks no redelivery, so a body handed over before is
  skipped on its own. A released key's subscription is ended (``UNSUBSCRIBE``
  by id) and then removed (``UNSUBSCRIBE`` with ``activemq.subscriptionName``,
  which only an offline one allows); one released while disconnected is
  removed after the reconnect, and a removal ActiveMQ refuses (expired
  meanwhile) fails alone, the connection staying open. A graceful close
  removes all of them. The broker's configuration does the rest
  (``deploy/activemq/activemq.xml``): ``offlineDurableSubscriberTimeout``
  drops a dead instance's subscriptions (the bound is the broker's, not
  ``TRIOWS_QUEUE_EXPIRES``), and ``allowLinkStealing`` lets a reconnect take
  the client-id over from a silent old connection the broker still holds
  (otherwise ``CONNECT`` is refused). Other brokers (Artemis ...) keep
  non-durable topic subscriptions, ack ``auto``: what was in flight to a lost
  connection is lost there.
- Sessions (``TRIOWS_RESUME_WINDOW`` > 0) on RabbitMQ with
  ``/exchange/<TRIOWS_EXCHANGE>/{key}`` destinations:
  :mod:`backends.stomp_sessions` (a queue per session declared over AMQP
  0-9-1, consumed on a STOMP connection of its own). Users' and rooms' keys
  then go to session queues only, and ``subscribe`` of such a key sends
  nothing (STOMP cannot tell a sender whether a user is connected). ActiveMQ
  and other brokers hold no sessions (:attr:`StompBackend.sessions` is None):
  ActiveMQ Classic cannot delete a queue over STOMP nor expire one that still
  holds messages (docs/backends.md).
- Heart-beats are negotiated from ``TRIOWS_HEARTBEAT`` (seconds; 0 disables):
  we send ours, and a broker silent for twice its interval counts as dead.
- Reconnects, held keys, readiness, timeouts and error classes are
  :mod:`backends.supervisor`'s; every held key is subscribed again before
  the backend reports ready. An ``ERROR`` answer to ``CONNECT`` (login or
  virtual host refused) is permanent; the protocol's own transient errors
  are :attr:`StompBackend.LOST`, ``ERROR`` frames included, except RabbitMQ's
  ``Subscription not found`` for a message in flight at an ``UNSUBSCRIBE``
  (:data:`backends.stomp_session.LATE_DELIVERY_MESSAGE`), after which the connection stays open.

Broker URL: ``stomp://login:passcode@host:port/vhost`` (port 61613 and vhost
``/`` by default). The vhost goes in the ``host`` header, which RabbitMQ reads
as the virtual host. For RabbitMQ's ``/exchange/...`` destinations the
exchange must exist and STOMP cannot create it, so the backend declares it
(and deletes the queues above) over AMQP 0-9-1
(:mod:`backends.rabbitmq_exchange`) on the same host, port 5672 unless the
URL says ``?amqp_port=N``.
"""

from __future__ import annotations

import itertools
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Literal

import anyio
from anyio.abc import ByteStream

from triows.backend import Outcome, Sessions
from triows.backends.broker_url import (
    BrokerAddress,
    connect_stream,
    parse_broker_url,
    parse_broker_urls,
    query_int,
)
from triows.backends.handed_over import HandedOver
from triows.backends.rabbitmq_exchange import HOME_NODE_DOWN, RetiredQueues, declare_direct_exchange
from triows.backends.stomp_frames import Frame, FrameParser, StompProtocolError, encode_frame
from triows.backends.stomp_session import (
    READ_SIZE,
    ConnectionClosedByUs,
    ConnectionLost,
    HeartbeatTimeout,
    StompBrokerError,
    StompSession,
)
from triows.backends.stomp_sessions import StompSessions
from triows.backends.supervisor import TRANSIENT, BrokerRejected, Supervised, run_supervised
from triows.logs import log_event
from triows.protocol import ROOM_KEY_PREFIX, USER_KEY_PREFIX
from triows.settings import Settings

SCHEMES = {"stomp": (61613, False), "stomp+ssl": (61613, True)}
DEFAULT_AMQP_PORT = 5672
MIN_BODY_BOUND = 65536

# Ack mode where subscriptions live as long as their connection (other
# brokers): ``auto``. An unacknowledged message is never redelivered there,
# so client acks would buy no reliability, only one ACK frame per message.
# Flow control still holds without them: the reader stops reading while the
# bounded ``incoming`` stream is full, and TCP pushes back.
ACK_MODE = "auto"

# Where subscriptions outlive their connection (module docstring), deliveries
# are acked, and an unacked one is redelivered after the connection goes.
# Ack mode ``client`` is cumulative: RabbitMQ turns its ACK into ``basic.ack``
# with ``multiple`` (rabbit_stomp_util:ack_mode), which settles every earlier
# delivery of the connection's one channel, whatever its subscription;
# ActiveMQ settles the subscription's earlier deliveries
# (StompSubscription.onStompMessageAck). One ACK (per subscription on
# ActiveMQ) per batch or per :data:`backends.stomp_session.ACK_INTERVAL` is
# enough. The window per subscription is TRIOWS_PREFETCH (RabbitMQ's
# ``prefetch-count``, ActiveMQ's ``activemq.prefetchSize``).
QUEUE_ACK_MODE = "client"

# RabbitMQ destinations whose SUBSCRIBE declares a queue for the subscription
# (rabbit_routing_util:ensure_endpoint), which the headers below shape.
QUEUE_DESTINATIONS = ("/exchange/", "/topic/")

# How subscriptions outlive their connection: RabbitMQ queues or ActiveMQ
# Classic durable topic subscriptions (module docstring).
Keeping = Literal["queues", "durable subscriptions"]
QUEUES: Keeping = "queues"
DURABLE_SUBSCRIPTIONS: Keeping = "durable subscriptions"


def keeping(server: str, template: str) -> Keeping | None:
    """How a broker that calls itself ``server`` keeps subscriptions of ``template``'s
    destinations beyond their connection, or None where they end with it."""
    if server.startswith("RabbitMQ") and template.startswith(QUEUE_DESTINATIONS):
        return QUEUES
    # ActiveMQ Classic ("ActiveMQ/5.17.2"; Artemis says "ActiveMQ-Artemis/...").
    if server.startswith("ActiveMQ/") and template.startswith("/topic/"):
        return DURABLE_SUBSCRIPTIONS
    return None


def default_destination_template(server: str, exchange: str) -> str:
    """The destination template for a broker that calls itself ``server``."""
    if server.startswith("RabbitMQ"):
        return f"/exchange/{exchange}/{{key}}"
    # ActiveMQ Classic and Artemis read dots as topic hierarchy; user names
    # cannot hold their wildcards ('*', '>', '#'), so the match is exact.
    return f"/topic/{exchange}.{{key}}"


class StompBackend(Supervised[StompSession]):
    """The STOMP protocol under :class:`backends.supervisor.Supervised` (module docstring)."""

    # ConnectionLost: what a SUBSCRIBE waiting in a restore gets when the
    # connection ends under it (e.g. ActiveMQ closing it for link stealing).
    LOST = (
        StompProtocolError,
        StompBrokerError,
        HeartbeatTimeout,
        ConnectionClosedByUs,
        ConnectionLost,
    )

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, parse_urls(settings.broker_url))
        self._template = settings.address_template
        # Queues (RabbitMQ) or durable subscriptions (ActiveMQ) that outlive
        # their connection: one per held key, named by us, unique per process
        # and per subscription of the key, so that a new process or a key
        # subscribed again never consumes what an earlier subscription left
        # behind. The prefix is also the ``client-id`` (ActiveMQ keys a
        # durable subscription by client-id and name), stable across this
        # process's reconnects.
        self._queue_prefix = f"triows.{settings.instance_id}.{secrets.token_hex(4)}"
        self._keeping: Keeping | None = None  # as of the latest connection
        self._queues: dict[str, str] = {}  # held key -> its queue or durable subscription
        self._queues_made = itertools.count(1)
        # Queues no longer consumed, deleted over AMQP 0-9-1 (RabbitMQ).
        self._retired = RetiredQueues(
            lambda: (self._address, self._amqp_port), timeout=self._broker_timeout
        )
        # Durable subscriptions no longer consumed, to remove over STOMP on
        # the connection (now, or after the reconnect if it is lost).
        self._retired_subscriptions: set[str] = set()
        self._removing: set[str] = set()  # of those, the ones being removed now
        # The broker redelivers at most what was unacked when a connection
        # went: one ack batch and what arrived while the ACK was on its way.
        self._handed_over = HandedOver(2 * settings.prefetch)
        # Session queues (RabbitMQ only: backends/stomp_sessions.py).
        self._sessions = (
            StompSessions(
                settings, lambda: (self._address, self._amqp_port), self._session_handshake
            )
            if settings.resume_window
            else None
        )

    @property
    def sessions(self) -> Sessions | None:
        """Session queues on RabbitMQ with ``/exchange/<TRIOWS_EXCHANGE>/{key}`` destinations
        (as of the latest connection); None elsewhere (see docs/backends.md for ActiveMQ)."""
        if (
            self._keeping != QUEUES
            or self._template != f"/exchange/{self._settings.exchange}/{{key}}"
        ):
            return None
        return self._sessions

    def _held_by_sessions(self, key: str) -> bool:
        """With sessions, users' and rooms' messages go to session queues only: a key of
        theirs only says a connection is here, which STOMP cannot tell a sender anyway."""
        return self.sessions is not None and key.startswith((USER_KEY_PREFIX, ROOM_KEY_PREFIX))

    async def _session_handshake(
        self, stream: ByteStream, parser: FrameParser, address: BrokerAddress
    ) -> tuple[float, float]:
        """CONNECT a session's own connection; its heart-beat intervals (send, receive) in s."""
        heartbeat_ms = self._settings.heartbeat * 1000
        connected = await _handshake(
            stream, parser, address, heartbeat_ms, client_id=f"{self._queue_prefix}.session"
        )
        send_ms, receive_ms = _negotiate_heartbeats(
            heartbeat_ms, connected.headers.get("heart-beat", "0,0")
        )
        return send_ms / 1000, receive_ms / 1000

    @property
    def queues(self) -> dict[str, str]:
        """The queue (durable subscription) of each held key, where these outlive connections."""
        return dict(self._queues)

    @property
    def client_id(self) -> str:
        """The ``client-id`` this process connects with (its durable subscriptions' owner)."""
        return self._queue_prefix

    @property
    def server(self) -> str:
        """The ``server`` header of the current connection ('' while down)."""
        return self._following.server if self._following is not None else ""

    def destination(self, key: str) -> str:
        """The STOMP destination of ``key`` (template of the broker connected last)."""
        return self._template.replace("{key}", key)

    async def _publish_on(self, connection: StompSession, key: str, body: bytes) -> Outcome:
        # STOMP cannot tell whether anyone holds the key.
        await connection.request(Frame("SEND", {"destination": self.destination(key)}, body))
        return Outcome.ACCEPTED

    async def _subscribe_on(self, connection: StompSession, key: str) -> None:
        if self._held_by_sessions(key):
            return
        if key in connection.subscription_ids:
            return  # two subscriptions would deliver every message twice
        subscription_id = connection.new_subscription_id(key)
        headers = {"id": subscription_id, "destination": self.destination(key), "ack": ACK_MODE}
        if self._keeping is not None:
            headers.update(self._outliving_headers(self._keeping, key))
            connection.ackable.add(subscription_id)
        # Cut short before it went out (waiting behind another write), the
        # broker never saw it: the next subscribe of the key must send one, and
        # no UNSUBSCRIBE may name it (RabbitMQ answers that with ERROR).
        await connection.request(
            Frame("SUBSCRIBE", headers),
            unsent=lambda: connection.forget_subscription(key, subscription_id),
        )

    def _outliving_headers(self, keeping: Keeping, key: str) -> dict[str, str]:
        """The SUBSCRIBE headers that make the subscription of ``key`` outlive its connection."""
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = f"{self._queue_prefix}.{next(self._queues_made)}.{key}"
        prefetch = str(self._settings.prefetch)
        if keeping == DURABLE_SUBSCRIPTIONS:
            # ProtocolConverter.onStompSubscribe sets the consumer's
            # "activemq."-prefixed properties: a durable subscription of this
            # client-id and name, resumed with what it kept if it exists.
            return {
                "ack": QUEUE_ACK_MODE,
                "activemq.subscriptionName": queue,
                "activemq.prefetchSize": prefetch,
            }
        # rabbit_stomp_util:build_params/build_arguments and
        # rabbit_routing_util:queue_declare_method (3.10): the queue is
        # declared with this name, neither exclusive nor auto-delete (so it
        # outlives the connection), and expires once unused this long.
        return {
            "ack": QUEUE_ACK_MODE,
            "prefetch-count": prefetch,
            "x-queue-name": queue,
            # Durable: RabbitMQ 4.3 refuses non-durable non-exclusive queues
            # (transient_nonexcl_queues); messages stay transient.
            "durable": "true",
            "exclusive": "false",
            "auto-delete": "false",
            "x-expires": str(round(self._settings.queue_expires * 1000)),
        }

    async def _unsubscribe_on(self, connection: StompSession, key: str) -> None:
        subscription_id = connection.subscription_ids.pop(key, None)
        if subscription_id is None:
            return
        # Keep the id -> key entry until the broker confirmed, so messages
        # already in flight still find their key; drop it afterwards.
        try:
            await connection.request(
                Frame("UNSUBSCRIBE", {"id": subscription_id}), unsubscribing=subscription_id
            )
        finally:
            # Answered, failed or cut short (the connection is then dropped):
            # nothing consumes the queue any more. The plugin keeps it after
            # an UNSUBSCRIBE, so it is deleted over AMQP 0-9-1; ActiveMQ keeps
            # the durable subscription, offline, until it is removed by name.
            self._retire(key)
        connection.subscription_keys.pop(subscription_id, None)
        await self._remove_subscriptions(connection)

    def _retire(self, key: str) -> None:
        queue = self._queues.pop(key, None)
        if queue is None:
            return
        if self._keeping == DURABLE_SUBSCRIPTIONS:
            self._retired_subscriptions.add(queue)
        else:
            self._retired.add(queue)

    async def _remove_subscriptions(self, connection: StompSession) -> None:
        """Remove the retired durable subscriptions (ActiveMQ), one request each.

        ``UNSUBSCRIBE`` with ``activemq.subscriptionName`` removes the
        subscription of the connection's client-id and that name for good
        (``RemoveSubscriptionInfo``); it must be offline, i.e. its consumer's
        ``UNSUBSCRIBE`` by id answered or its connection gone. ActiveMQ needs
        an ``id`` (or a destination) on every ``UNSUBSCRIBE``; on this path
        it is not looked up.
        """
        for name in sorted(self._retired_subscriptions.difference(self._removing)):
            # Unsubscribes of different keys run at once: each name is removed by one.
            if name in self._removing:
                continue
            self._removing.add(name)
            frame = Frame("UNSUBSCRIBE", {"id": name, "activemq.subscriptionName": name})
            try:
                with anyio.fail_after(self._broker_timeout):
                    await connection.request(frame, survivable=True)
            except StompBrokerError as error:
                # "No durable subscription exists": it expired while offline
                # (offlineDurableSubscriberTimeout) or the broker restarted.
                log_event(
                    "broker_subscription_not_removed",
                    logging.WARNING,
                    subscription=name,
                    error=str(error).partition("\n")[0],
                )
            finally:
                self._removing.discard(name)
            self._retired_subscriptions.discard(name)

    async def _restore(self, connection: StompSession, keys: list[str]) -> None:
        # Keys released while no connection followed them: their queues
        # (durable subscriptions) still hold (and receive) their messages,
        # and nothing consumes them again.
        for key in sorted(set(self._queues).difference(keys)):
            self._retire(key)
        for key in keys:
            with anyio.fail_after(self._broker_timeout):
                await self._subscribe_on(connection, key)
        await self._remove_subscriptions(connection)

    def _background(self) -> list[Callable[[], Awaitable[None]]]:
        tasks: list[Callable[[], Awaitable[None]]] = [self._retired.delete_as_added]
        if self._sessions is not None:
            tasks.append(self._sessions.run)
        return tasks

    def _abandon(self, connection: StompSession) -> None:
        connection.task_group.cancel_scope.cancel()

    async def _close(self, connection: StompSession) -> None:
        try:
            if self._keeping == DURABLE_SUBSCRIPTIONS:
                await self._remove_every_subscription(connection)
            await connection.request(Frame("DISCONNECT"))
        finally:
            await self._delete_every_queue()

    async def _remove_every_subscription(self, connection: StompSession) -> None:
        """Closing for good on ActiveMQ: end every consumer, remove every durable subscription.

        Written back to back without receipts (there may be thousands): the
        broker handles a connection's frames in order, so the ``DISCONNECT``'s
        receipt that follows confirms them all. The retired ones, which may
        have expired meanwhile, go one request each (:meth:`_remove_subscriptions`).
        """
        for key, subscription_id in list(connection.subscription_ids.items()):
            await connection.write(
                Frame("UNSUBSCRIBE", {"id": subscription_id}), unsubscribing=subscription_id
            )
            name = self._queues.pop(key, None)
            if name is not None:
                await connection.write(
                    Frame("UNSUBSCRIBE", {"id": name, "activemq.subscriptionName": name})
                )
        await self._remove_subscriptions(connection)

    async def aclose(self) -> None:
        """Close as :meth:`Supervised.aclose` does, deleting this process's queues.

        Also while disconnected: the AMQP port may answer when STOMP does not.
        """
        connected = self._following is not None
        await super().aclose()
        if not connected:
            with anyio.CancelScope(shield=True), anyio.move_on_after(self._settings.close_timeout):
                await self._delete_every_queue()

    async def _delete_every_queue(self) -> None:
        # Closing for good: nothing will consume them again. (ActiveMQ's
        # durable subscriptions left here, the connection lost, expire.)
        if self._keeping != QUEUES:
            return
        queues, self._queues = self._queues, {}
        await self._retired.delete_now(queues.values())

    def _describe(self, connection: StompSession) -> dict[str, Any]:
        return {
            "server": connection.server,
            "destination": self.destination("{key}"),
            "outlive_connection": self._keeping or "no",
            "heartbeat_s": [connection.send_interval, connection.receive_interval],
        }

    @property
    def _amqp_port(self) -> int:
        """Where RabbitMQ's AMQP 0-9-1 listens on the current node (``?amqp_port=``)."""
        return query_int(self._address, "amqp_port", DEFAULT_AMQP_PORT)

    async def _session(self, up: Callable[[StompSession], Awaitable[None]]) -> None:
        """One connection, from TCP connect until it fails or is dropped."""
        url = self._address
        settings = self._settings
        with anyio.fail_after(self._broker_timeout):
            stream = await connect_stream(url.host, url.port, tls=url.tls, cafile=url.cafile)
        async with stream:
            # Bodies triows publishes are at most TRIOWS_MAX_MESSAGE_BYTES; the
            # floor leaves room for a broker's ERROR text.
            parser = FrameParser(max_body_bytes=max(settings.max_message_bytes, MIN_BODY_BOUND))
            heartbeat_ms = settings.heartbeat * 1000
            with anyio.fail_after(self._broker_timeout):
                connected = await _handshake(
                    stream, parser, url, heartbeat_ms, client_id=self._queue_prefix
                )
            server = connected.headers.get("server", "")
            send_ms, receive_ms = _negotiate_heartbeats(
                heartbeat_ms, connected.headers.get("heart-beat", "0,0")
            )
            await self._prepare_destinations(server)
            async with anyio.create_task_group() as task_group:
                connection = StompSession(
                    stream,
                    parser,
                    server,
                    send_ms / 1000,
                    receive_ms / 1000,
                    task_group,
                    self._handed_over,
                    max(1, settings.prefetch // 2),
                    acks_per_subscription=self._keeping == DURABLE_SUBSCRIPTIONS,
                    marks_redeliveries=self._keeping != DURABLE_SUBSCRIPTIONS,
                )
                task_group.start_soon(self._read, connection)
                task_group.start_soon(connection.send_heartbeats)
                task_group.start_soon(connection.send_acks)
                await up(connection)
                # The reader and heart-beat tasks run until the connection fails.

    async def _prepare_destinations(self, server: str) -> None:
        settings = self._settings
        if not settings.address_template:
            template = default_destination_template(server, settings.exchange)
            if template != self._template:
                log_event("stomp_destination_chosen", server=server, template=template)
            self._template = template
        self._keeping = keeping(server, self._template)
        if server.startswith("RabbitMQ") and self._template.startswith(
            f"/exchange/{settings.exchange}/"
        ):
            try:
                with anyio.fail_after(self._broker_timeout):
                    await declare_direct_exchange(
                        self._address, port=self._amqp_port, exchange=settings.exchange
                    )
            except TRANSIENT as error:
                # Not fatal: the exchange may exist already (declared by an
                # operator or by the amqp091 backend). If it does not,
                # RabbitMQ's ERROR on SUBSCRIBE/SEND says so in the log. A
                # refusal (ExchangeDeclareError) is a BrokerRejected instead.
                log_event(
                    "broker_exchange_not_declared",
                    logging.WARNING,
                    exchange=settings.exchange,
                    amqp=f"{self._address.host}:{self._amqp_port}",
                    error=repr(error),
                )

    async def _read(self, connection: StompSession) -> None:
        try:
            await connection.read_frames(self._incoming_send)
        except StompBrokerError as error:
            if HOME_NODE_DOWN in str(error):
                # Our queues were made on a cluster node that is down: what
                # they hold is out of reach until it returns, and subscribing
                # them again fails. New queues for every held key on the next
                # connection; the old ones expire unused.
                self._queues = {}
            raise
        finally:
            self._lost(connection)
            connection.fail_pending(ConnectionLost("STOMP connection lost"))


async def _handshake(
    stream: ByteStream, parser: FrameParser, url: BrokerAddress, heartbeat_ms: int, client_id: str
) -> Frame:
    """Send CONNECT and return the broker's CONNECTED frame."""
    headers = {
        "accept-version": "1.2",
        "host": url.vhost,
        "heart-beat": f"{heartbeat_ms},{heartbeat_ms}",
        # ActiveMQ: the owner of our durable subscriptions (RabbitMQ's
        # plugin reads no such header).
        "client-id": client_id,
    }
    if url.user:
        headers.update(login=url.user, passcode=url.password or "")
    await stream.send(encode_frame(Frame("CONNECT", headers)))
    while not (frames := parser.feed(await stream.receive(READ_SIZE))):
        pass
    frame = frames[0]
    if frame.command == "ERROR":
        detail = frame.headers.get("message", "") or frame.body.decode("utf-8", "replace")
        # RabbitMQ and ActiveMQ answer a wrong login or an unknown virtual
        # host this way: retrying soon will not change their mind.
        raise BrokerRejected(
            "authentication", f"STOMP broker refused CONNECT: {detail}", login=url.user or ""
        )
    if frame.command != "CONNECTED":
        raise StompProtocolError(f"expected CONNECTED, got {frame.command}")
    if frame.headers.get("version") != "1.2":
        raise StompProtocolError(
            f"broker speaks STOMP {frame.headers.get('version', '1.0')}, not 1.2"
        )
    return frame


def parse_url(url: str) -> BrokerAddress:
    """``stomp[+ssl]://login:passcode@host:port/vhost[?amqp_port=N]``."""
    return parse_broker_url(url, SCHEMES)


def parse_urls(urls: str) -> list[BrokerAddress]:
    """Every URL of a comma-separated ``TRIOWS_BROKER_URL`` (``SettingsError`` names a bad one)."""
    addresses = parse_broker_urls(urls, SCHEMES)
    for address in addresses:
        query_int(address, "amqp_port", DEFAULT_AMQP_PORT)
    return addresses


def check_settings(settings: Settings) -> None:
    """Refuse a malformed broker URL (any of the list) at start-up (raises ``SettingsError``)."""
    parse_urls(settings.broker_url)


@asynccontextmanager
async def open_stomp_backend(settings: Settings) -> AsyncIterator[StompBackend]:
    """Open the STOMP backend; returns after the first connection attempt.

    Ready if the broker is up, otherwise not ready and retrying in the
    background. On exit it sends ``DISCONNECT`` (bounded by
    ``TRIOWS_CLOSE_TIMEOUT``) and stops its tasks.
    """
    async with run_supervised(StompBackend(settings)) as backend:
        yield backend


def _negotiate_heartbeats(ours_ms: int, theirs: str) -> tuple[int, int]:
    """Return (we send every, we expect every) in ms, per STOMP 1.2 §Heart-beating."""
    try:
        server_sends, server_wants = (int(part) for part in theirs.split(","))
    except ValueError:
        raise StompProtocolError(f"invalid heart-beat header {theirs!r}") from None
    send = 0 if not ours_ms or not server_wants else max(ours_ms, server_wants)
    receive = 0 if not ours_ms or not server_sends else max(ours_ms, server_sends)
    return send, receive
