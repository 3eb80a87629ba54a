"""AMQP 1.0 backend (RabbitMQ's plugin or 4.x, ActiveMQ, Artemis, Qpid ...) on qpid-proton.

Engine. python-qpid-proton's protocol engine (``Connection``, ``Transport``,
``Collector``, SASL) is sans-IO; :mod:`backends.amqp10_pump` moves its bytes
over an anyio TCP (or TLS, for ``amqps://``) stream. No proton reactor, no
threads: every engine call and every event handler runs in the event loop.

Broker mapping (DESIGN §5). One connection and one session per instance. One
sender link publishes every message; one receiver link per held key receives.
A key's *address* comes from ``settings.address_template`` (``{key}`` and
``{exchange}`` are filled in); when that is empty it is chosen from the
``product`` property of the broker's ``open`` frame and logged:

- RabbitMQ: ``/exchange/{exchange}/{key}`` (address format v1; RabbitMQ 4.x
  still accepts it while the ``amqp_address_v1`` deprecated feature is
  permitted, its default). As a *source*, RabbitMQ declares a server-named
  queue, binds it to the direct exchange with the key, and consumes from it.
  Closing the link only cancels that consumer: RabbitMQ 3.x (3.10.8 measured)
  keeps the queue, still bound, until the broker restarts (rabbitmq-server
  issue 2588), so each subscribe leaves one queue behind, and messages to the
  key pile up in it once nobody holds the key. A queue policy with
  ``expires`` for the ``amq.gen-`` queues bounds that. RabbitMQ never creates
  the exchange (a link to a missing one ends the whole session with
  ``amqp:not-found``) and AMQP 1.0 cannot declare one on 3.x, so the backend
  declares it over AMQP 0-9-1 on the same port
  (:mod:`backends.rabbitmq_exchange`), as the ``amqp091`` backend does.
- ActiveMQ Classic / Artemis: ``topic://triows.{key}`` (ActiveMQ's AMQP
  documentation: prefix an address with ``topic://`` for a topic; Artemis
  honours the prefix when its acceptor sets ``multicastPrefix=topic://``).
- any other broker: ``{key}``.

Sending. With a template ``<target>/{key}`` and no ``ANONYMOUS-RELAY``
capability offered (RabbitMQ 3.x), the sender link targets ``<target>`` and
each message carries its key in ``subject`` (RabbitMQ: the routing key). A
broker that offers ``ANONYMOUS-RELAY`` gets a sender with a null target and
each message's ``to`` set to the key's address.

Outcomes. A publish returns when the broker's disposition arrives:
``accepted`` -> ``ACCEPTED``, or ``ROUTED`` where accepted means "routed to a
queue" (RabbitMQ 4.x); ``released`` -> ``UNROUTED`` (RabbitMQ 4.x releases an
unroutable message; the spec: "not and will not be acted upon"); ``modified``
with ``undeliverable-here`` -> ``UNROUTED``; ``rejected`` or any other modified
-> :class:`BrokerUnavailable`. Measured on RabbitMQ 3.10.8: a message to
``/exchange/triows`` with a key nobody holds is settled ``accepted``, exactly
like a routed one, so on 3.x every publish is ``ACCEPTED`` and ``/send``
answers 202 ``accepted`` for an offline user; it never says 404.

Receiving. Each receiver link has at most ``settings.prefetch`` credit out.
Complete deliveries go to a backlog (bounded by the credit); one task moves
them onto the bounded ``incoming`` stream, and only then settles each with
``accepted`` (RabbitMQ 3.10 ends the session on a bare settle: "Unrecognised
state: undefined") and tops the link's credit back up once half is used. A
server that stops reading therefore stops granting credit, and the broker
stops sending: backpressure end to end.

Reconnect. A lost, refused or silent connection (the exceptions in
:data:`BROKER_LOST`, and nothing else) makes ``ready`` false; ``publish`` then
raises :class:`BrokerUnavailable` at once. The backend reconnects forever with
capped, jittered exponential backoff (``settings.reconnect_max_delay``),
attaches a receiver link for every held key, and only then is ``ready``
again. Heartbeats: the connection's idle timeout is ``settings.heartbeat``
seconds (0 disables it); the broker sends empty frames at half that, and a
broker silent for longer is treated as lost.

Link changes. ``subscribe`` and ``unsubscribe`` of different keys run
concurrently, up to :data:`LINK_CHANGES_IN_FLIGHT` waiting for the broker at
once; no backend-wide lock is held across the broker's answer (which on
RabbitMQ includes declaring and binding the link's queue). One synchronous step
of the set-up reads the held keys and marks the connection as following them
(``_Live.follows_keys``): a change made before that step only edits the held
keys, which the set-up then attaches; a change made after it opens or closes
its own link on that connection. Nothing awaits between reading that state and
acting on it, so it needs no lock. The router serialises the changes of one key.
"""

from __future__ import annotations

import logging
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

import anyio
from anyio.abc import ByteStream, ObjectReceiveStream, ObjectSendStream, TaskStatus
from proton import (
    Connection,
    Delivery,
    Endpoint,
    Event,
    Link,
    Message,
    ProtonException,
    Receiver,
    Sender,
    Session,
    Transport,
    symbol,
)

from backends.amqp10_pump import STREAM_ERRORS, ConnectionLost, ProtonPump, Wakeup
from backends.rabbitmq_exchange import ExchangeDeclareError, declare_direct_exchange
from triows.backend import BrokerUnavailable, Outcome
from triows.backend import Delivery as IncomingDelivery
from triows.backoff import Backoff
from triows.settings import Settings

logger = logging.getLogger("triows.backends.amqp10")

ANONYMOUS_RELAY = symbol("ANONYMOUS-RELAY")
DEFAULT_PORTS = {"amqp": 5672, "amqps": 5671}
RABBITMQ_TEMPLATE = "/exchange/{exchange}/{key}"
ACTIVEMQ_TEMPLATE = "topic://triows.{key}"
GENERIC_TEMPLATE = "{key}"
LINK_CHANGES_IN_FLIGHT = 16
"""The most subscribes and unsubscribes waiting for the broker's answer at once.

RabbitMQ 3.x handles one session's attaches and detaches one after another
(an attach declares and binds a queue: about 2.5 ms), so more in flight would
not finish sooner; they would only queue at the broker, where the wait for an
answer (bounded by ``settings.publish_timeout``) would count time spent behind
thousands of others, and a busy broker would be taken for a lost one."""


class LinkRefused(Exception):
    """The broker refused or closed a link or the session (its condition says why)."""


BROKER_LOST: tuple[type[BaseException], ...] = (
    # The pump's word for a peer close, a broken stream, or proton giving up
    # (idle timeout, framing error).
    ConnectionLost,
    # Refused or unreachable sockets, DNS failures, TLS failures, and our own
    # bounds on connect/attach (anyio.fail_after raises TimeoutError, an OSError).
    *STREAM_ERRORS,
    # The broker ended the session or refused a link: start over cleanly.
    LinkRefused,
    # RabbitMQ refused the exchange declaration (access refused): retry later.
    ExchangeDeclareError,
)
"""What a lost or unusable broker connection raises; anything else propagates."""


@dataclass(frozen=True)
class BrokerTarget:
    """Where to connect and how to log in, from ``settings.broker_url``."""

    host: str
    port: int
    tls: bool
    user: str | None
    password: str | None
    vhost: str

    @classmethod
    def from_url(cls, url: str) -> BrokerTarget:
        """Parse ``amqp[s]://[user:password@]host[:port][/vhost]``."""
        parts = urlsplit(url)
        if parts.scheme not in DEFAULT_PORTS:
            raise ValueError(f"an AMQP 1.0 broker URL starts with amqp:// or amqps://, got {url!r}")
        vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or DEFAULT_PORTS[parts.scheme],
            tls=parts.scheme == "amqps",
            user=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            vhost=vhost,
        )

    def __str__(self) -> str:
        return f"{'amqps' if self.tls else 'amqp'}://{self.host}:{self.port}"


@dataclass(frozen=True)
class Addressing:
    """How keys become AMQP addresses on one broker, and how messages are sent."""

    family: str
    template: str
    sender_target: str | None  # None: anonymous relay, each message names its address
    confirms_routing: bool  # ``accepted`` means "routed to at least one queue"

    def address(self, key: str) -> str:
        return self.template.replace("{key}", key)


def choose_addressing(
    settings: Settings, properties: dict[object, object] | None, capabilities: object
) -> Addressing:
    """Pick the addresses for the broker that sent these ``open`` properties."""
    properties = properties or {}
    product = str(properties.get(symbol("product"), ""))
    version = str(properties.get(symbol("version"), ""))
    if product.lower() == "rabbitmq":
        family, default = "rabbitmq", RABBITMQ_TEMPLATE
    elif "activemq" in product.lower():
        family, default = "activemq", ACTIVEMQ_TEMPLATE
    else:
        family, default = "generic", GENERIC_TEMPLATE
    template = (settings.address_template or default).replace("{exchange}", settings.exchange)
    relay = ANONYMOUS_RELAY in (capabilities or [])  # type: ignore[operator]
    prefix, _, rest = template.rpartition("/")
    # RabbitMQ 3.x's convention: target ``/exchange/X`` takes the routing key
    # from each message's subject. Preferred on RabbitMQ even where 4.x offers
    # the relay, whose ``to`` addresses must be in its v2 format.
    subject_routing = rest == "{key}" and prefix != ""
    if subject_routing and (family == "rabbitmq" or not relay):
        sender_target: str | None = prefix
    elif relay:
        sender_target = None
    else:
        raise LinkRefused(
            f"broker {product or 'unknown'!r} offers no anonymous relay and the address "
            f"template {template!r} does not end in '/{{key}}'; set TRIOWS_ADDRESS_TEMPLATE"
        )
    major = version.split(".", 1)[0]
    confirms_routing = family == "rabbitmq" and major.isdigit() and int(major) >= 4
    return Addressing(family, template, sender_target, confirms_routing)


@dataclass
class _PendingPublish:
    """A sent message waiting for the broker's disposition."""

    done: anyio.Event = field(default_factory=anyio.Event)
    state: int | None = None  # the remote delivery state; None: the connection ended
    undeliverable_here: bool = False
    condition: str = ""


@dataclass
class _Subscription:
    """The receiver link of one held key on the current connection."""

    key: str
    link: Receiver
    outstanding: int = 0  # received deliveries not yet handed to ``incoming``
    # Kicked when the broker attaches or detaches this link, or the connection
    # ends: waiting for one answer among thousands in flight wakes one task.
    changed: Wakeup = field(default_factory=Wakeup)


@dataclass
class _Received:
    subscription: _Subscription
    body: bytes
    delivery: Delivery
    live: _Live


class _Live:
    """One connection to the broker: its pump, session, sender and receiver links."""

    def __init__(
        self,
        connection: Connection,
        transport: Transport,
        on_event: Callable[[_Live, Event], None],
    ) -> None:
        self.pump = ProtonPump(connection, transport, lambda event: on_event(self, event))
        self.session = connection.session()
        self.addressing: Addressing | None = None
        self.sender: Sender | None = None
        # The open receiver link of each key (attached, or waiting for the
        # broker's attach); a link being closed is in ``by_link`` only.
        self.subscriptions: dict[str, _Subscription] = {}  # by key
        self.by_link: dict[str, _Subscription] = {}  # by link name
        # Set by the set-up in the same step that reads the held keys: from
        # then on each subscribe/unsubscribe opens or closes its own link here.
        self.follows_keys = False
        self.pending: dict[str, _PendingPublish] = {}  # by delivery tag
        # Names of links the broker detached or closed. A detach without
        # ``closed`` (RabbitMQ's answer to our close) leaves proton's remote
        # state "active", so the event is the only sign of it.
        self.detached: set[str] = set()
        self.changed = Wakeup()
        self.ended = False
        self.next_tag = 0
        self.next_link = 0

    async def wait_for(self, condition: Callable[[], bool], changed: Wakeup | None = None) -> None:
        """Wait until ``condition()`` holds, re-checking after each kick of ``changed``
        (by default: after each engine event)."""
        while not condition():
            if self.ended:
                raise ConnectionLost("the broker connection ended")
            await (changed or self.changed).wait()

    async def wait_ended(self) -> None:
        """Wait until the connection has ended (never raises :class:`ConnectionLost`)."""
        while not self.ended:
            await self.changed.wait()

    def open_receiver(self, key: str, prefetch: int) -> _Subscription:
        """Attach a receiver link for ``key`` with ``prefetch`` credit and make it the key's
        subscription; the broker answers later (see :meth:`wait_attached`)."""
        assert self.addressing is not None
        self.next_link += 1
        link = self.session.receiver(f"triows:{key}:{self.next_link}")
        link.source.address = self.addressing.address(key)
        # We settle every delivery ourselves, with an outcome (see module docstring).
        link.snd_settle_mode = Link.SND_UNSETTLED
        link.rcv_settle_mode = Link.RCV_FIRST
        subscription = _Subscription(key, link)
        self.by_link[link.name] = subscription
        self.subscriptions[key] = subscription
        link.open()
        link.flow(prefetch)
        self.pump.wake()
        return subscription

    async def wait_attached(self, subscription: _Subscription) -> None:
        """Wait for the broker's attach of the subscription's link; raise :class:`LinkRefused`
        if it refuses. Returns at once if the link was closed meanwhile (unsubscribed)."""
        link = subscription.link
        await self.wait_for(
            lambda: (
                bool(link.state & (Endpoint.REMOTE_ACTIVE | Endpoint.REMOTE_CLOSED))
                or bool(link.state & Endpoint.LOCAL_CLOSED)
                or bool(self.session.state & Endpoint.REMOTE_CLOSED)
            ),
            subscription.changed,
        )
        if link.state & Endpoint.LOCAL_CLOSED:
            return  # the unsubscribe that closed it waits for the broker's answer
        # A refusing broker attaches and at once detaches with a condition; for
        # a missing exchange RabbitMQ ends the whole session instead. Both
        # frames come in one read, so the detach is seen here already.
        refusal = _condition(link) or _condition(self.session)
        if refusal or link.name in self.detached or not link.state & Endpoint.REMOTE_ACTIVE:
            raise LinkRefused(f"the broker refused link {link.name!r}: {refusal or 'detached'}")

    async def wait_detached(self, subscription: _Subscription) -> None:
        """Wait for the broker's answer to our close of the subscription's link."""
        name = subscription.link.name
        await self.wait_for(lambda: name in self.detached, subscription.changed)

    def kick_links(self) -> None:
        """Wake every task waiting for a link's answer (the session or connection changed)."""
        for subscription in self.by_link.values():
            subscription.changed.kick()

    def fail_pending(self) -> None:
        """Wake every publish and link change still waiting: no answer will come."""
        self.ended = True
        for pending in self.pending.values():
            pending.done.set()
        self.pending.clear()
        self.changed.kick()
        self.kick_links()


# The events a task waiting for one link's attach or detach must see.
_LINK_ANSWERS = (Event.LINK_REMOTE_OPEN, Event.LINK_REMOTE_CLOSE, Event.LINK_REMOTE_DETACH)
_SESSION_ENDS = (Event.SESSION_REMOTE_CLOSE, Event.CONNECTION_REMOTE_CLOSE)


def _condition(endpoint: Link | Session | Connection) -> str:
    condition = endpoint.remote_condition
    return f"{condition.name}: {condition.description}" if condition else ""


class Amqp10Backend:
    """The :class:`triows.backend.Backend` over one AMQP 1.0 connection.

    Create it with :func:`open_amqp10_backend`; it is usable (``subscribe``
    records keys, ``publish`` raises :class:`BrokerUnavailable`) before the
    broker first answers.
    """

    def __init__(
        self,
        settings: Settings,
        incoming_send: ObjectSendStream[IncomingDelivery],
        incoming_receive: ObjectReceiveStream[IncomingDelivery],
    ) -> None:
        self._settings = settings
        self._target = BrokerTarget.from_url(settings.broker_url)
        self._incoming_send = incoming_send
        self._incoming_receive = incoming_receive
        # The held keys; after each reconnect the set-up attaches a link for each.
        self._keys: set[str] = set()
        self._link_changes = anyio.Semaphore(LINK_CHANGES_IN_FLIGHT)
        self._live: _Live | None = None
        self._ready = False
        self._ready_changed = anyio.Event()
        self._backlog: deque[_Received] = deque()
        self._backlog_changed = Wakeup()
        self._closing = False

    @property
    def ready(self) -> bool:
        """Connected and consuming: a receiver link attached for every key held when the
        connection was set up; keys subscribed since are attached by their own call."""
        return self._ready

    @property
    def incoming(self) -> ObjectReceiveStream[IncomingDelivery]:
        """``(key, body)`` for the keys this instance holds, in broker order (bounded)."""
        return self._incoming_receive

    @property
    def addressing(self) -> Addressing | None:
        """The addresses chosen for the broker of the current connection."""
        return self._live.addressing if self._live else None

    async def wait_ready(self, ready: bool = True) -> None:
        """Return once :attr:`ready` equals ``ready`` (for start-up probes and tests)."""
        while self.ready != ready:
            await self._ready_changed.wait()

    async def publish(self, key: str, body: bytes) -> Outcome:
        """Send ``body`` verbatim to ``key`` and wait for the broker's disposition.

        Raises :class:`BrokerUnavailable` at once while disconnected, and when
        the broker rejects the message, the connection drops, or no outcome
        comes within ``settings.publish_timeout``. On cancellation the message
        may or may not have been published.
        """
        live = self._live
        if not self._ready or live is None or live.sender is None or live.addressing is None:
            raise BrokerUnavailable("not connected to the AMQP 1.0 broker")
        sender, addressing = live.sender, live.addressing
        try:
            with anyio.fail_after(self._settings.publish_timeout):
                await live.wait_for(lambda: sender.credit > 0)
                message = Message(body=body)
                if addressing.sender_target is None:
                    message.address = addressing.address(key)
                else:
                    message.subject = key
                live.next_tag += 1
                tag = str(live.next_tag)
                pending = live.pending[tag] = _PendingPublish()
                sender.send(message, tag=tag)
                live.pump.wake()
                await pending.done.wait()
        except TimeoutError:
            raise BrokerUnavailable(
                f"no outcome from the broker within {self._settings.publish_timeout}s"
            ) from None
        except ConnectionLost:
            raise BrokerUnavailable("lost the AMQP 1.0 broker") from None
        return _outcome(pending, addressing)

    async def subscribe(self, key: str) -> None:
        """Attach a receiver link for ``key``; held across reconnects.

        While connected, returns once the broker attached the link. Never
        raises :class:`BrokerUnavailable`: while disconnected the key is only
        recorded, and the next connection attaches it. A broker that does not
        answer within ``settings.publish_timeout`` is treated as lost. Cancelled
        before its turn (see :data:`LINK_CHANGES_IN_FLIGHT`) it changes nothing;
        cancelled later, the key stays held and its link may still be attaching.
        """
        async with self._link_changes:
            # Read after the wait for a turn, so a reconnect meanwhile is seen.
            self._keys.add(key)
            live = self._live
            if live is None or not live.follows_keys:
                return  # the set-up of the current or next connection attaches it
            # A link already open for the key (the set-up's, or that of a
            # cancelled subscribe) is waited for, never doubled: two links
            # would deliver every message twice.
            subscription = live.subscriptions.get(key) or live.open_receiver(
                key, self._settings.prefetch
            )
            try:
                with anyio.fail_after(self._settings.publish_timeout):
                    await live.wait_attached(subscription)
            except BROKER_LOST as error:
                self._give_up(live, "subscribe", key, error)

    async def unsubscribe(self, key: str) -> None:
        """Detach (close) the receiver link of ``key``; RabbitMQ then deletes its queue.

        While connected, returns once the broker answered the detach; a broker
        that does not answer within ``settings.publish_timeout`` is treated as
        lost. Cancelled before its turn it changes nothing; cancelled later, the
        key is released all the same.
        """
        async with self._link_changes:
            self._keys.discard(key)
            live = self._live
            subscription = live.subscriptions.pop(key, None) if live else None
            if live is None or subscription is None:
                return
            link = subscription.link
            link.close()
            live.pump.wake()
            try:
                with anyio.fail_after(self._settings.publish_timeout):
                    await live.wait_detached(subscription)
            except BROKER_LOST as error:
                self._give_up(live, "unsubscribe", key, error)
            finally:
                live.by_link.pop(link.name, None)

    def _give_up(self, live: _Live, operation: str, key: str, error: BaseException) -> None:
        if live.ended or live.pump.connection.state & Endpoint.LOCAL_CLOSED:
            # Lost already: the loss is logged once by maintain_connection, not
            # once per link change that was in flight.
            return
        # A broker that does not answer is treated as lost: the reconnect
        # restores a known state instead of guessing whether the change happened.
        logger.warning(
            "link change deferred to reconnect",
            extra={"fields": {"operation": operation, "key": key, "error": repr(error)}},
        )
        live.pump.connection.close()
        live.pump.wake()

    async def maintain_connection(self, *, task_status: TaskStatus[None]) -> None:
        """Connect, and reconnect after every loss, until cancelled.

        Reports started after the first attempt, whether it succeeded or not,
        so that a backend opened while the broker is up is ready at once.
        """
        backoff = Backoff(max_delay=self._settings.reconnect_max_delay)
        started = False

        def report_started() -> None:
            nonlocal started
            if not started:
                started = True
                task_status.started()

        while True:
            try:
                await self._run_connection(backoff, report_started)
            except BROKER_LOST as error:
                if self._closing:
                    return
                report_started()
                await backoff.wait_after_loss(str(self._target), error)
            else:
                return  # closed by :meth:`close`

    async def _run_connection(self, backoff: Backoff, report_started: Callable[[], None]) -> None:
        """One connection, from connect to loss; returns only after :meth:`close`."""
        settings = self._settings
        with anyio.fail_after(settings.publish_timeout):
            stream = await _connect(self._target)
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
                self._connection_ended(live)

        # Errors are kept and raised after the task group: raised inside it
        # they would arrive wrapped in an exception group.
        async with anyio.create_task_group() as tasks:
            self._live = live
            live.pump.connection.open()
            live.session.open()
            live.pump.wake()
            tasks.start_soon(run_pump)
            try:
                await self._set_up(live)
                backoff.reset()
                assert live.addressing is not None
                logger.info(
                    "broker connected",
                    extra={
                        "fields": {
                            "broker": str(self._target),
                            "family": live.addressing.family,
                            "address_template": live.addressing.template,
                            "sender_target": live.addressing.sender_target,
                        }
                    },
                )
                report_started()
                await live.wait_for(lambda: False)  # until the connection ends
            except BROKER_LOST as error:
                failure = error
                if not live.ended:
                    live.pump.connection.close()
                    live.pump.wake()
                    # Give the close frame a moment to leave; the pump ends then.
                    # (Not ``wait_for``: its ConnectionLost, raised here, would
                    # leave the task group wrapped in a group and end the backend.)
                    with anyio.move_on_after(settings.close_timeout):
                        await live.wait_ended()
                    tasks.cancel_scope.cancel()
        if self._closing:
            return
        raise pump_failed or failure or ConnectionLost("the broker connection ended")

    def _new_connection(self) -> _Live:
        target, settings = self._target, self._settings
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
        return _Live(connection, transport, self._on_event)

    async def _set_up(self, live: _Live) -> None:
        """Open the connection's sender, attach a receiver per held key, then be ready.

        Each broker answer is bounded by ``settings.publish_timeout`` on its
        own, not the whole set-up: an instance holding many keys must not fail
        its reconnect just by holding many.
        """
        with anyio.fail_after(self._settings.publish_timeout):
            await self._open_sender(live)
        # One synchronous step: read the held keys and hand later changes to
        # subscribe/unsubscribe, so that no change falls between the two.
        live.follows_keys = True
        # Attach them all at once, then wait: one round trip, not one per key.
        opened = [live.open_receiver(key, self._settings.prefetch) for key in sorted(self._keys)]
        for subscription in opened:
            with anyio.fail_after(self._settings.publish_timeout):
                await live.wait_attached(subscription)
        self._set_ready(True)

    async def _open_sender(self, live: _Live) -> None:
        connection = live.pump.connection
        await live.wait_for(lambda: bool(connection.state & Endpoint.REMOTE_ACTIVE))
        addressing = choose_addressing(
            self._settings, connection.remote_properties, connection.remote_offered_capabilities
        )
        live.addressing = addressing
        if addressing.family == "rabbitmq" and addressing.template.startswith("/exchange/"):
            exchange = addressing.template.split("/")[2]
            if exchange and not exchange.startswith("amq."):
                await declare_direct_exchange(
                    self._target.host,
                    self._target.port,
                    login=self._target.user or "guest",
                    passcode=self._target.password or "guest",
                    vhost=self._target.vhost,
                    exchange=exchange,
                    tls=self._target.tls,
                )
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
        refusal = _condition(sender) or _condition(live.session)
        if refusal or not sender.state & Endpoint.REMOTE_ACTIVE:
            raise LinkRefused(f"the broker refused the sender link: {refusal or 'detached'}")
        live.sender = sender

    def _connection_ended(self, live: _Live) -> None:
        if self._live is live:
            self._live = None
            self._set_ready(False)
        live.fail_pending()

    def _set_ready(self, ready: bool) -> None:
        if ready == self._ready:
            return
        self._ready = ready
        logger.info("backend ready" if ready else "backend not ready")
        self._ready_changed.set()
        self._ready_changed = anyio.Event()

    def _on_event(self, live: _Live, event: Event) -> None:
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
            logger.warning(
                "broker closed an endpoint; reconnecting",
                extra={"fields": {"event": str(kind), "condition": _condition(culprit)}},
            )
            connection.close()
        live.changed.kick()
        if kind in _LINK_ANSWERS and link is not None:
            subscription = live.by_link.get(link.name)
            if subscription is not None:
                subscription.changed.kick()
        elif kind in _SESSION_ENDS:
            live.kick_links()

    def _on_outcome(self, live: _Live, delivery: Delivery) -> None:
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

    def _on_receivable(self, live: _Live, link: Receiver) -> None:
        subscription = live.by_link.get(link.name)
        while (current := link.current) is not None and current.readable and not current.partial:
            data = link.recv(current.pending) or b""
            link.advance()
            if subscription is None or not link.state & Endpoint.LOCAL_ACTIVE:
                # A late delivery on a link we closed: nobody here holds the key.
                current.update(Delivery.RELEASED)
                current.settle()
                continue
            body = _message_body(data)
            if body is None:
                logger.warning(
                    "dropped a message whose body is not binary",
                    extra={"fields": {"key": subscription.key}},
                )
                current.update(Delivery.REJECTED)
                current.settle()
                continue
            subscription.outstanding += 1
            self._backlog.append(_Received(subscription, body, current, live))
        self._backlog_changed.kick()

    async def forward_deliveries(self) -> None:
        """Hand each received message to ``incoming``, then settle it and top up credit."""
        prefetch = self._settings.prefetch
        while True:
            while not self._backlog:
                await self._backlog_changed.wait()
            received = self._backlog.popleft()
            subscription = received.subscription
            # Messages of a connection that is gone are still handed over: the
            # broker gave them to us (and told their senders so).
            await self._incoming_send.send((subscription.key, received.body))
            subscription.outstanding -= 1
            live, link = received.live, subscription.link
            if live.ended or not link.state & Endpoint.LOCAL_ACTIVE:
                continue
            received.delivery.update(Delivery.ACCEPTED)
            received.delivery.settle()
            unused = link.credit + subscription.outstanding
            if unused <= prefetch // 2:
                link.flow(prefetch - unused)
            live.pump.wake()

    async def close(self) -> None:
        """Close the broker connection gracefully, waiting at most ``settings.close_timeout``."""
        self._closing = True
        live = self._live
        self._set_ready(False)
        if live is None or live.ended:
            return
        live.pump.connection.close()
        live.pump.wake()
        with anyio.move_on_after(self._settings.close_timeout):
            await live.wait_ended()


async def _connect(target: BrokerTarget) -> ByteStream:
    if target.tls:
        # AMQP closes its own sessions, so a peer that skips TLS close_notify
        # is no truncation attack here.
        return await anyio.connect_tcp(
            target.host,
            target.port,
            ssl_context=ssl.create_default_context(),
            tls_standard_compatible=False,
        )
    return await anyio.connect_tcp(target.host, target.port)


def _message_body(data: bytes) -> bytes | None:
    message = Message()
    try:
        message.decode(data)
    except ProtonException:
        return None
    body = message.body
    if isinstance(body, bytes | bytearray | memoryview):
        return bytes(body)
    return None


def _outcome(pending: _PendingPublish, addressing: Addressing) -> Outcome:
    state = pending.state
    if state is None:
        raise BrokerUnavailable("the broker connection ended before the message's outcome came")
    if state == Delivery.ACCEPTED:
        return Outcome.ROUTED if addressing.confirms_routing else Outcome.ACCEPTED
    if state == Delivery.RELEASED:
        return Outcome.UNROUTED
    if state == Delivery.MODIFIED and pending.undeliverable_here:
        return Outcome.UNROUTED
    raise BrokerUnavailable(
        f"the broker did not take the message (outcome {state}): {pending.condition or 'no reason'}"
    )


@asynccontextmanager
async def open_amqp10_backend(settings: Settings) -> AsyncIterator[Amqp10Backend]:
    """Open the AMQP 1.0 backend; its connection and delivery tasks live in this block.

    The first connection attempt is made before the block starts (so with the
    broker up the backend is ready at once); after a failed one the backend
    keeps trying in the background. On exit the connection is closed gracefully.
    """
    send, receive = anyio.create_memory_object_stream[IncomingDelivery](settings.incoming_queue)
    async with send, receive:
        backend = Amqp10Backend(settings, send, receive)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(backend.forward_deliveries)
            await tasks.start(backend.maintain_connection)
            try:
                yield backend
            finally:
                with anyio.CancelScope(shield=True):
                    await backend.close()
                tasks.cancel_scope.cancel()
