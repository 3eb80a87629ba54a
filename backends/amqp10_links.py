"""AMQP 1.0 link bookkeeping on one connection: links by key and by name, publishes
waiting for their disposition, and the waits for the broker's answers.

Nothing here does I/O: :class:`Amqp10Connection` changes proton's engine
state and wakes its :class:`~backends.amqp10_pump.ProtonPump`, which moves the
bytes. Every engine call runs in the event loop's one thread, so no lock.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
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
)

from triows.backends.amqp10_addressing import Addressing
from triows.backends.amqp10_pump import ConnectionLost, ProtonPump, Wakeup
from triows.backends.handed_over import HandedOver


class LinkRefused(Exception):
    """The broker refused or closed a link or the session (its condition says why)."""


@dataclass
class PendingPublish:
    """A sent message waiting for the broker's disposition."""

    done: anyio.Event = field(default_factory=anyio.Event)
    state: int | None = None  # the remote delivery state; None: the connection ended
    undeliverable_here: bool = False
    condition: str = ""


@dataclass
class HeldQueue:
    """A held key's queue on RabbitMQ, named by the backend; it outlives connections."""

    name: str
    # What was handed over from it lately, across connections: after a lost
    # connection the broker redelivers what it had not seen settled, at most
    # one credit window (``prefetch``) of the latest.
    handed_over: HandedOver


@dataclass
class Subscription:
    """The receiver link of one held key on the current connection.

    ``link`` is None while the key's queue is being declared (RabbitMQ); the
    link is attached afterwards if the subscription is still the key's.
    """

    key: str
    link: Receiver | None
    queue: HeldQueue | None = None
    outstanding: int = 0  # received deliveries not yet handed to ``incoming``
    # Kicked when the broker attaches or detaches this link, or the connection
    # ends: waiting for one answer among thousands in flight wakes one task.
    changed: Wakeup = field(default_factory=Wakeup)


@dataclass
class Received:
    subscription: Subscription
    body: bytes
    redelivered: bool  # not the first acquirer: the broker gave it to us before
    delivery: Delivery
    connection: Amqp10Connection


class Amqp10Connection:
    """One connection to the broker: its pump, session, sender and receiver links."""

    def __init__(
        self,
        connection: Connection,
        transport: Transport,
        on_event: Callable[[Amqp10Connection, Event], None],
    ) -> None:
        self.pump = ProtonPump(connection, transport, lambda event: on_event(self, event))
        self.session = connection.session()
        self.addressing: Addressing | None = None
        self.sender: Sender | None = None
        # The open receiver link of each key (attached, or waiting for the
        # broker's attach); a link being closed is in ``by_link`` only.
        self.subscriptions: dict[str, Subscription] = {}  # by key
        self.by_link: dict[str, Subscription] = {}  # by link name
        self.pending: dict[str, PendingPublish] = {}  # by delivery tag
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

    def add_subscription(self, key: str, queue: HeldQueue | None) -> Subscription:
        """Make a subscription, with no link yet, the key's (see :meth:`attach`)."""
        subscription = self.subscriptions[key] = Subscription(key, None, queue)
        return subscription

    def attach(self, subscription: Subscription, address: str, prefetch: int) -> None:
        """Attach the subscription's receiver link to source ``address`` with ``prefetch``
        credit; the broker answers later (see :meth:`wait_attached`)."""
        self.next_link += 1
        link = self.session.receiver(f"triows:{subscription.key}:{self.next_link}")
        link.source.address = address
        # We settle every delivery ourselves, with an outcome: unsettled ones
        # stay the broker's (see the backend's module docstring).
        link.snd_settle_mode = Link.SND_UNSETTLED
        link.rcv_settle_mode = Link.RCV_FIRST
        subscription.link = link
        self.by_link[link.name] = subscription
        link.open()
        link.flow(prefetch)
        self.pump.wake()
        subscription.changed.kick()

    def is_current(self, subscription: Subscription) -> bool:
        """Whether ``subscription`` is still its key's (not unsubscribed) on a live connection."""
        return not self.ended and self.subscriptions.get(subscription.key) is subscription

    async def wait_attached(self, subscription: Subscription) -> None:
        """Wait for the broker's attach of the subscription's link; raise :class:`LinkRefused`
        if it refuses. Returns at once if the link was closed meanwhile (unsubscribed), or
        the subscription was dropped before its link was attached."""
        await self.wait_for(
            lambda: (
                subscription.link is not None
                or self.subscriptions.get(subscription.key) is not subscription
            ),
            subscription.changed,
        )
        link = subscription.link
        if link is None:
            return  # unsubscribed while its queue was being declared
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
        refusal = condition(link) or condition(self.session)
        if refusal or link.name in self.detached or not link.state & Endpoint.REMOTE_ACTIVE:
            raise LinkRefused(f"the broker refused link {link.name!r}: {refusal or 'detached'}")

    async def wait_detached(self, subscription: Subscription) -> None:
        """Wait for the broker's answer to our close of the subscription's link."""
        assert subscription.link is not None
        name = subscription.link.name
        await self.wait_for(lambda: name in self.detached, subscription.changed)

    def kick_links(self) -> None:
        """Wake every task waiting for a link's answer (the session or connection changed)."""
        for subscription in self.by_link.values():
            subscription.changed.kick()
        for subscription in self.subscriptions.values():
            if subscription.link is None:  # waiting for its queue, not in ``by_link``
                subscription.changed.kick()

    async def send(self, key: str, body: bytes) -> PendingPublish:
        """Send ``body`` for ``key`` once the sender has credit; return its disposition.

        Raises :class:`ConnectionLost` if the connection ends first; the caller
        bounds the time.
        """
        sender, addressing = self.sender, self.addressing
        assert sender is not None and addressing is not None  # set before ready
        await self.wait_for(lambda: sender.credit > 0)
        message = Message(body=body)
        if addressing.sender_target is None:
            message.address = addressing.address(key)
        else:
            message.subject = key
        self.next_tag += 1
        tag = str(self.next_tag)
        pending = self.pending[tag] = PendingPublish()
        sender.send(message, tag=tag)
        self.pump.wake()
        await pending.done.wait()
        return pending

    def fail_pending(self) -> None:
        """Wake every publish and link change still waiting: no answer will come."""
        self.ended = True
        for pending in self.pending.values():
            pending.done.set()
        self.pending.clear()
        self.changed.kick()
        self.kick_links()


# The events a task waiting for one link's attach or detach must see.
LINK_ANSWERS = (Event.LINK_REMOTE_OPEN, Event.LINK_REMOTE_CLOSE, Event.LINK_REMOTE_DETACH)
SESSION_ENDS = (Event.SESSION_REMOTE_CLOSE, Event.CONNECTION_REMOTE_CLOSE)


def condition(endpoint: Link | Session | Connection) -> str:
    condition = endpoint.remote_condition
    return f"{condition.name}: {condition.description}" if condition else ""


def message_body(data: bytes) -> tuple[bytes, bool, str] | None:
    """The binary body of an encoded message, whether it is a redelivery
    (``first-acquirer`` false) and its subject (the routing key publishers set
    on RabbitMQ); None if it is not one triows sent."""
    message = Message()
    try:
        message.decode(data)
    except ProtonException:
        return None
    body = message.body
    if isinstance(body, bytes | bytearray | memoryview):
        return bytes(body), not message.first_acquirer, message.subject or ""
    return None
