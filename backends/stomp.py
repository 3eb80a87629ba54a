"""STOMP 1.2 backend: ActiveMQ Classic, RabbitMQ's STOMP plugin, Artemis ...

Broker mapping (DESIGN §5). One STOMP connection per instance over an anyio
TCP (or TLS, ``stomp+ssl://``) stream, no threads; frames go through the
sans-IO codec in :mod:`backends.stomp_frames`.

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
  :data:`ACK_INTERVAL`, never naming a subscription whose ``UNSUBSCRIBE`` is
  written (RabbitMQ answers that with ``ERROR`` and a close). A redelivery
  (``redelivered:true``) of a body this instance already handed over, its ACK
  lost with the connection, is skipped: bodies hold a unique message id. The
  plugin keeps an ``/exchange/`` queue after ``UNSUBSCRIBE`` (it deletes only
  durable ``/topic/`` ones), so the queues of released keys (also those
  released while disconnected) and, on a graceful close, all of them are
  deleted over AMQP 0-9-1 (:func:`backends.rabbitmq_exchange.delete_queues`);
  one that cannot be deleted expires. The price: after an instance dies
  without closing, its users' queues stay bound for ``TRIOWS_QUEUE_EXPIRES``.
  ActiveMQ and other brokers keep non-durable topic subscriptions, ack
  ``auto``: what was in flight to a lost connection is lost there.
- Heart-beats are negotiated from ``TRIOWS_HEARTBEAT`` (seconds; 0 disables):
  we send ours, and a broker silent for twice its interval counts as dead.
- Reconnects, held keys, readiness, timeouts and error classes are
  :mod:`backends.supervisor`'s; every held key is subscribed again before
  the backend reports ready. An ``ERROR`` answer to ``CONNECT`` (login or
  virtual host refused) is permanent; the protocol's own transient errors
  are :attr:`StompBackend.LOST`, ``ERROR`` frames included, except RabbitMQ's
  ``Subscription not found`` for a message in flight at an ``UNSUBSCRIBE``
  (:data:`LATE_DELIVERY_MESSAGE`), after which the connection stays open.

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
import math
import re
import secrets
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
from anyio.abc import ByteStream, ObjectSendStream, TaskGroup

from backends.broker_url import BrokerAddress, connect_stream, parse_broker_url, query_int
from backends.rabbitmq_exchange import declare_direct_exchange, delete_queues
from backends.stomp_frames import Frame, FrameParser, StompProtocolError, encode_frame
from backends.supervisor import TRANSIENT, BrokerRejected, Supervised, run_supervised
from triows.backend import BrokerUnavailable, Delivery, Outcome
from triows.logs import log_event
from triows.settings import Settings

SCHEMES = {"stomp": (61613, False), "stomp+ssl": (61613, True)}
DEFAULT_AMQP_PORT = 5672
READ_SIZE = 65536
MIN_BODY_BOUND = 65536

# Ack mode where subscriptions live as long as their connection (ActiveMQ
# topic subscriptions): ``auto``. An unacknowledged message is never
# redelivered there, so client acks would buy no reliability, only one ACK
# frame per message. Flow control still holds without them: the reader stops
# reading while the bounded ``incoming`` stream is full, TCP pushes back, and
# ActiveMQ's producer flow control stops the broker from pushing further.
ACK_MODE = "auto"

# On RabbitMQ each subscription's queue outlives its connection (module
# docstring), so deliveries are acked, and an unacked one is requeued when the
# connection goes. Ack mode ``client`` is cumulative: RabbitMQ turns its ACK
# into ``basic.ack`` with ``multiple`` (rabbit_stomp_util:ack_mode), which
# settles every earlier delivery of the connection's one channel, whatever
# its subscription; one ACK per batch or per ACK_INTERVAL is enough. The
# window per subscription is ``prefetch-count`` = TRIOWS_PREFETCH.
QUEUE_ACK_MODE = "client"
ACK_INTERVAL = 0.02

# RabbitMQ destinations whose SUBSCRIBE declares a queue for the subscription
# (rabbit_routing_util:ensure_endpoint), which the headers below shape.
QUEUE_DESTINATIONS = ("/exchange/", "/topic/")

# Why a deletion of queues over AMQP 0-9-1 may fail without ending anything.
DELETE_FAILURES: tuple[type[BaseException], ...] = (*TRANSIENT, BrokerRejected)

# RabbitMQ's answer to a message it had already handed to its STOMP adapter
# when our UNSUBSCRIBE of that subscription was processed (a send racing the
# last socket of its recipient). Unlike every other ERROR it is not followed by
# a close (rabbit_stomp_processor's send_delivery uses send_error, not error):
# it stands for a MESSAGE in flight, which is dropped as one.
LATE_DELIVERY_MESSAGE = "Subscription not found"
LATE_DELIVERY_TAG = re.compile(r"no current subscription with tag 'T_s(\d+)'")


class StompBrokerError(BrokerUnavailable):
    """The broker answered with an ``ERROR`` frame (the connection is then closed)."""


class HeartbeatTimeout(Exception):
    """The broker sent nothing, not even a heart-beat, for longer than agreed."""


class ConnectionClosedByUs(Exception):
    """A write was interrupted half-way, so the connection had to be dropped."""


def default_destination_template(server: str, exchange: str) -> str:
    """The destination template for a broker that calls itself ``server``."""
    if server.startswith("RabbitMQ"):
        return f"/exchange/{exchange}/{{key}}"
    # ActiveMQ Classic and Artemis read dots as topic hierarchy; user names
    # cannot hold their wildcards ('*', '>', '#'), so the match is exact.
    return f"/topic/{exchange}.{{key}}"


@dataclass
class _Pending:
    """A frame waiting for its ``RECEIPT``."""

    done: anyio.Event
    error: BaseException | None = None


class _StompConnection:
    """One connected STOMP session: writes frames, reads them, matches receipts."""

    def __init__(
        self,
        stream: ByteStream,
        parser: FrameParser,
        server: str,
        send_interval: float,
        receive_interval: float,
        task_group: TaskGroup,
        handed_over: deque[bytes],
        ack_batch: int,
    ) -> None:
        self.stream = stream
        self.server = server
        self.send_interval = send_interval
        self.receive_interval = receive_interval
        self.task_group = task_group
        self.subscription_keys: dict[str, str] = {}  # subscription id -> key
        self.subscription_ids: dict[str, str] = {}  # key -> subscription id
        self.parser = parser
        self._write_lock = anyio.Lock()
        self._receipts: dict[str, _Pending] = {}
        self._receipt_ids = itertools.count(1)
        self._subscriptions_issued = 0
        self._broken = False
        # Client acks (queues that outlive the connection, RabbitMQ): bodies
        # handed over lately, across connections, and those an earlier
        # connection had handed over, which the broker may redeliver here.
        self.handed_over = handed_over
        self.handed_over_before = frozenset(handed_over)
        # Subscriptions whose UNSUBSCRIBE is not written yet: an ACK naming
        # another is an ERROR (and a close) on RabbitMQ.
        self.ackable: set[str] = set()
        self._ack_id: str | None = None  # the latest delivery an ACK may name
        self._unacked = 0
        self._ack_batch = ack_batch
        self._ack_wanted = anyio.Event()
        self._ack_due = anyio.Event()

    async def write(self, frame: Frame, *, unsubscribing: str | None = None) -> None:
        """Write ``frame``; for the ``UNSUBSCRIBE`` of ``unsubscribing``, the pending ACK first."""
        async with self._write_lock:
            data = encode_frame(frame)
            if unsubscribing is not None:
                # In the same step, so that no ACK naming it follows.
                self.ackable.discard(unsubscribing)
                data = self._take_ack() + data
            await self._send_locked(data)

    async def _write_bytes(self, data: bytes) -> None:
        async with self._write_lock:
            await self._send_locked(data)

    async def _send_locked(self, data: bytes) -> None:
        if self._broken:
            raise ConnectionClosedByUs("the STOMP connection was dropped")
        completed = False
        try:
            await self.stream.send(data)
            completed = True
        finally:
            if not completed:
                # A cancelled or failed send may leave half a frame on the
                # wire: nothing more can be written, so drop the connection.
                self._broken = True
                self.task_group.cancel_scope.cancel()

    def _take_ack(self) -> bytes:
        if self._ack_id is None:
            return b""
        ack = encode_frame(Frame("ACK", {"id": self._ack_id}))
        self._ack_id = None
        self._unacked = 0
        return ack

    async def send_acks(self) -> None:
        """Ack what was handed over, at most ACK_INTERVAL late or once a batch is full."""
        while True:
            await self._ack_wanted.wait()
            if self._unacked < self._ack_batch:
                with anyio.move_on_after(ACK_INTERVAL):
                    await self._ack_due.wait()
            self._ack_wanted = anyio.Event()
            self._ack_due = anyio.Event()
            async with self._write_lock:
                if ack := self._take_ack():
                    await self._send_locked(ack)

    async def request(
        self,
        frame: Frame,
        *,
        unsent: Callable[[], None] | None = None,
        unsubscribing: str | None = None,
    ) -> None:
        """Send ``frame`` with a ``receipt`` header and wait for its ``RECEIPT``.

        The caller bounds the wait. On cancellation the receipt is forgotten,
        and ``unsent`` is called if the frame was not written (whole).
        """
        receipt = str(next(self._receipt_ids))
        pending = _Pending(anyio.Event())
        self._receipts[receipt] = pending
        try:
            try:
                await self.write(
                    Frame(frame.command, {**frame.headers, "receipt": receipt}, frame.body),
                    unsubscribing=unsubscribing,
                )
            except BaseException:
                if unsent is not None:
                    unsent()
                raise
            await pending.done.wait()
        finally:
            self._receipts.pop(receipt, None)
        if pending.error is not None:
            raise pending.error

    def fail_pending(self, error: BaseException) -> None:
        """Wake every frame waiting for a receipt with ``error``."""
        for pending in self._receipts.values():
            pending.error = error
            pending.done.set()
        self._receipts.clear()

    def new_subscription_id(self, key: str) -> str:
        self._subscriptions_issued += 1
        subscription_id = f"s{self._subscriptions_issued}"
        self.subscription_keys[subscription_id] = key
        self.subscription_ids[key] = subscription_id
        return subscription_id

    def forget_subscription(self, key: str, subscription_id: str) -> None:
        """Forget a subscription whose ``SUBSCRIBE`` never reached the broker."""
        self.subscription_keys.pop(subscription_id, None)
        self.ackable.discard(subscription_id)
        if self.subscription_ids.get(key) == subscription_id:
            del self.subscription_ids[key]

    def is_late_delivery(self, frame: Frame) -> bool:
        """Whether ``frame`` is RabbitMQ's ERROR for a delivery to a subscription we ended."""
        if frame.headers.get("message") != LATE_DELIVERY_MESSAGE:
            return False
        match = LATE_DELIVERY_TAG.search(frame.body.decode("utf-8", "replace"))
        if match is None:
            return False
        subscription_id = f"s{match.group(1)}"
        issued = 0 < int(match.group(1)) <= self._subscriptions_issued
        return issued and subscription_id not in self.subscription_ids.values()

    async def read_frames(self, incoming: ObjectSendStream[Delivery]) -> None:
        """Read until the connection fails; raises what ended it."""
        # Twice the agreed interval: the broker's timer and ours are not in step.
        timeout = 2 * self.receive_interval if self.receive_interval else math.inf
        while True:
            # Only the read is timed: waiting for room in ``incoming`` is our
            # own back-pressure, not the broker's silence.
            with anyio.move_on_after(timeout) as scope:
                data = await self.stream.receive(READ_SIZE)
            if scope.cancelled_caught:
                raise HeartbeatTimeout(f"STOMP broker silent for {timeout:.1f} s")
            for frame in self.parser.feed(data):
                await self._handle(frame, incoming)

    async def _handle(self, frame: Frame, incoming: ObjectSendStream[Delivery]) -> None:
        if frame.command == "MESSAGE":
            subscription_id = frame.headers.get("subscription", "")
            key = self.subscription_keys.get(subscription_id)
            body = frame.body
            # Only subscriptions with client acks carry an ``ack`` header.
            ack_id = frame.headers.get("ack")
            # None: a message already in flight when we unsubscribed. A
            # redelivery of what an earlier connection handed over but could
            # not ack (see the module docstring) is only acked.
            if key is not None and not (
                frame.headers.get("redelivered") == "true" and body in self.handed_over_before
            ):
                await incoming.send((key, body))
                if ack_id is not None:
                    self.handed_over.append(body)
            if ack_id is not None:
                # A cumulative ACK of a later delivery also settles one whose
                # subscription ended.
                if subscription_id in self.ackable:
                    self._ack_id = ack_id
                self._unacked += 1
                self._ack_wanted.set()
                if self._unacked >= self._ack_batch:
                    self._ack_due.set()
        elif frame.command == "RECEIPT":
            pending = self._receipts.pop(frame.headers.get("receipt-id", ""), None)
            if pending is not None:
                pending.done.set()
        elif frame.command == "ERROR":
            if self.is_late_delivery(frame):
                return  # the connection stays open: see LATE_DELIVERY_MESSAGE
            detail = frame.headers.get("message", "")
            if frame.body:
                detail = f"{detail}: {frame.body.decode('utf-8', 'replace').strip()}"
            error = StompBrokerError(f"STOMP broker error: {detail}")
            # The broker closes the connection after an ERROR (STOMP 1.2), and
            # RabbitMQ's carry no receipt-id: fail everything waiting.
            self.fail_pending(error)
            raise error
        else:
            raise StompProtocolError(f"unexpected {frame.command} frame from the broker")

    async def send_heartbeats(self) -> None:
        if not self.send_interval:
            return
        while True:
            # Twice per interval, so a late timer on either side cannot make
            # the broker see a gap.
            await anyio.sleep(self.send_interval / 2)
            await self._write_bytes(b"\n")


class StompBackend(Supervised[_StompConnection]):
    """The STOMP protocol under :class:`backends.supervisor.Supervised` (module docstring)."""

    LOST = (StompProtocolError, StompBrokerError, HeartbeatTimeout, ConnectionClosedByUs)

    def __init__(self, settings: Settings) -> None:
        self._url = parse_url(settings.broker_url)
        self._amqp_port = query_int(self._url, "amqp_port", DEFAULT_AMQP_PORT)
        super().__init__(settings, str(self._url))
        self._template = settings.address_template
        # Queues that outlive their connection (RabbitMQ): one per held key,
        # named by us, unique per process and per subscription of the key, so
        # that a new process or a key subscribed again never consumes what an
        # earlier subscription left behind.
        self._queue_prefix = f"triows.{settings.instance_id}.{secrets.token_hex(4)}"
        self._queues: dict[str, str] = {}  # held key -> its queue
        self._queues_made = itertools.count(1)
        # Queues no longer consumed, to delete; each stays listed until its
        # deletion was tried, so that a close deletes it if the task cannot.
        self._retired: set[str] = set()
        self._retired_added = anyio.Event()
        # The broker redelivers at most what was unacked when a connection
        # went: one ack batch and what arrived while the ACK was on its way.
        self._handed_over: deque[bytes] = deque(maxlen=2 * settings.prefetch)

    @property
    def queues(self) -> dict[str, str]:
        """The queue of each held key, on a broker where queues outlive connections."""
        return dict(self._queues)

    @property
    def server(self) -> str:
        """The ``server`` header of the current connection ('' while down)."""
        return self._following.server if self._following is not None else ""

    def destination(self, key: str) -> str:
        """The STOMP destination of ``key`` (template of the broker connected last)."""
        return self._template.replace("{key}", key)

    async def _publish_on(self, connection: _StompConnection, key: str, body: bytes) -> Outcome:
        # STOMP cannot tell whether anyone holds the key.
        await connection.request(Frame("SEND", {"destination": self.destination(key)}, body))
        return Outcome.ACCEPTED

    def _keeps_queues(self, server: str) -> bool:
        """Whether subscriptions get queues that outlive the connection (module docstring)."""
        return server.startswith("RabbitMQ") and self._template.startswith(QUEUE_DESTINATIONS)

    async def _subscribe_on(self, connection: _StompConnection, key: str) -> None:
        if key in connection.subscription_ids:
            return  # two subscriptions would deliver every message twice
        subscription_id = connection.new_subscription_id(key)
        headers = {"id": subscription_id, "destination": self.destination(key), "ack": ACK_MODE}
        if self._keeps_queues(connection.server):
            queue = self._queues.get(key)
            if queue is None:
                queue = self._queues[key] = f"{self._queue_prefix}.{next(self._queues_made)}.{key}"
            # rabbit_stomp_util:build_params/build_arguments and
            # rabbit_routing_util:queue_declare_method (3.10): the queue is
            # declared with this name, neither exclusive nor auto-delete (so
            # it outlives the connection), and expires once unused this long.
            headers.update(
                {
                    "ack": QUEUE_ACK_MODE,
                    "prefetch-count": str(self._settings.prefetch),
                    "x-queue-name": queue,
                    # Durable: RabbitMQ 4.3 refuses non-durable non-exclusive
                    # queues (transient_nonexcl_queues); messages stay transient.
                    "durable": "true",
                    "exclusive": "false",
                    "auto-delete": "false",
                    "x-expires": str(round(self._settings.queue_expires * 1000)),
                }
            )
            connection.ackable.add(subscription_id)
        # Cut short before it went out (waiting behind another write), the
        # broker never saw it: the next subscribe of the key must send one, and
        # no UNSUBSCRIBE may name it (RabbitMQ answers that with ERROR).
        await connection.request(
            Frame("SUBSCRIBE", headers),
            unsent=lambda: connection.forget_subscription(key, subscription_id),
        )

    async def _unsubscribe_on(self, connection: _StompConnection, key: str) -> None:
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
            # an UNSUBSCRIBE, so it is deleted over AMQP 0-9-1.
            self._retire(key)
        connection.subscription_keys.pop(subscription_id, None)

    def _retire(self, key: str) -> None:
        queue = self._queues.pop(key, None)
        if queue is not None:
            self._retired.add(queue)
            self._retired_added.set()

    async def _restore(self, connection: _StompConnection, keys: list[str]) -> None:
        # Keys released while no connection followed them: their queues still
        # hold (and receive) their messages, and nothing consumes them again.
        for key in sorted(set(self._queues).difference(keys)):
            self._retire(key)
        for key in keys:
            with anyio.fail_after(self._broker_timeout):
                await self._subscribe_on(connection, key)

    def _background(self) -> list[Callable[[], Awaitable[None]]]:
        return [self._delete_retired]

    async def _delete_retired(self) -> None:
        """Delete the queues of released keys, a batch per AMQP 0-9-1 connection."""
        while True:
            await self._retired_added.wait()
            self._retired_added = anyio.Event()
            queues = sorted(self._retired)
            await self._delete_queues(queues)
            self._retired.difference_update(queues)

    async def _delete_queues(self, queues: list[str]) -> None:
        if not queues:
            return
        try:
            with anyio.fail_after(self._broker_timeout):
                await delete_queues(self._url, port=self._amqp_port, queues=queues)
        except DELETE_FAILURES as error:
            # Not fatal: each queue expires TRIOWS_QUEUE_EXPIRES after its
            # last consumer went (holding that key's messages until then).
            log_event(
                "broker_queues_not_deleted",
                logging.WARNING,
                queues=len(queues),
                amqp=f"{self._url.host}:{self._amqp_port}",
                error=repr(error),
            )

    def _abandon(self, connection: _StompConnection) -> None:
        connection.task_group.cancel_scope.cancel()

    async def _close(self, connection: _StompConnection) -> None:
        try:
            await connection.request(Frame("DISCONNECT"))
        finally:
            await self._delete_every_queue()

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
        # Closing for good: nothing will consume them again.
        queues = sorted(self._retired.union(self._queues.values()))
        self._retired, self._queues = set(), {}
        await self._delete_queues(queues)

    def _describe(self, connection: _StompConnection) -> dict[str, Any]:
        return {
            "server": connection.server,
            "destination": self.destination("{key}"),
            "queues_outlive_connection": self._keeps_queues(connection.server),
            "heartbeat_s": [connection.send_interval, connection.receive_interval],
        }

    async def _session(self, up: Callable[[_StompConnection], Awaitable[None]]) -> None:
        """One connection, from TCP connect until it fails or is dropped."""
        url = self._url
        settings = self._settings
        with anyio.fail_after(self._broker_timeout):
            stream = await connect_stream(url.host, url.port, tls=url.tls)
        async with stream:
            # Bodies triows publishes are at most TRIOWS_MAX_MESSAGE_BYTES; the
            # floor leaves room for a broker's ERROR text.
            parser = FrameParser(max_body_bytes=max(settings.max_message_bytes, MIN_BODY_BOUND))
            heartbeat_ms = settings.heartbeat * 1000
            with anyio.fail_after(self._broker_timeout):
                connected = await _handshake(stream, parser, url, heartbeat_ms)
            server = connected.headers.get("server", "")
            send_ms, receive_ms = _negotiate_heartbeats(
                heartbeat_ms, connected.headers.get("heart-beat", "0,0")
            )
            await self._prepare_destinations(server)
            async with anyio.create_task_group() as task_group:
                connection = _StompConnection(
                    stream,
                    parser,
                    server,
                    send_ms / 1000,
                    receive_ms / 1000,
                    task_group,
                    self._handed_over,
                    max(1, settings.prefetch // 2),
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
        if server.startswith("RabbitMQ") and self._template.startswith(
            f"/exchange/{settings.exchange}/"
        ):
            try:
                with anyio.fail_after(self._broker_timeout):
                    await declare_direct_exchange(
                        self._url, port=self._amqp_port, exchange=settings.exchange
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
                    amqp=f"{self._url.host}:{self._amqp_port}",
                    error=repr(error),
                )

    async def _read(self, connection: _StompConnection) -> None:
        try:
            await connection.read_frames(self._incoming_send)
        finally:
            self._lost(connection)
            connection.fail_pending(BrokerUnavailable("STOMP connection lost"))


async def _handshake(
    stream: ByteStream, parser: FrameParser, url: BrokerAddress, heartbeat_ms: int
) -> Frame:
    """Send CONNECT and return the broker's CONNECTED frame."""
    headers = {
        "accept-version": "1.2",
        "host": url.vhost,
        "heart-beat": f"{heartbeat_ms},{heartbeat_ms}",
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


def check_settings(settings: Settings) -> None:
    """Refuse a malformed broker URL at start-up (raises :class:`SettingsError`)."""
    query_int(parse_url(settings.broker_url), "amqp_port", DEFAULT_AMQP_PORT)


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
