"""One STOMP 1.2 session on a connected stream: frames out, frames in, receipts, acks.

:class:`StompSession` is what :class:`backends.stomp.StompBackend` runs per
broker connection: it writes frames under one lock (a write cut short drops
the connection, since half a frame may be on the wire), matches ``RECEIPT``
frames to the requests waiting for them, maps each ``MESSAGE`` back to its key,
acks cumulatively where subscriptions use client acks (never naming a
subscription whose ``UNSUBSCRIBE`` is written), skips redeliveries of bodies an
earlier session handed over, and sends and checks heart-beats. A cumulative
``ACK`` settles what its connection received before it on RabbitMQ (one
channel per connection), but only its own subscription's on ActiveMQ
(``ProtocolConverter.onStompAck`` acks through the subscription of the
message named): there one ``ACK`` per subscription with deliveries to settle. The broker
mapping, reconnects and queue bookkeeping are :mod:`backends.stomp`'s.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import anyio
import anyio.lowlevel
from anyio.abc import ByteStream, ObjectSendStream, TaskGroup

from triows.backend import BrokerUnavailable, Delivery
from triows.backends.handed_over import HandedOver
from triows.backends.stomp_frames import Frame, FrameParser, StompProtocolError, encode_frame

READ_SIZE = 65536

# At most this long between a delivery and its (cumulative) ACK while traffic is light.
ACK_INTERVAL = 0.02

# RabbitMQ's answer to a message it had already handed to its STOMP adapter
# when our UNSUBSCRIBE of that subscription was processed (a send racing the
# last socket of its recipient). Unlike every other ERROR it is not followed by
# a close (rabbit_stomp_processor's send_delivery uses send_error, not error):
# it stands for a MESSAGE in flight, which is dropped as one.
LATE_DELIVERY_MESSAGE = "Subscription not found"
LATE_DELIVERY_TAG = re.compile(r"no current subscription with tag 'T_s(\d+)'")


class StompBrokerError(BrokerUnavailable):
    """The broker answered with an ``ERROR`` frame (the connection is then closed,
    except after a request sent with ``survivable=True``)."""


class ConnectionLost(BrokerUnavailable):
    """The connection ended while a frame waited for its ``RECEIPT``."""


class HeartbeatTimeout(Exception):
    """The broker sent nothing, not even a heart-beat, for longer than agreed."""


class ConnectionClosedByUs(Exception):
    """A write was interrupted half-way, so the connection had to be dropped."""


@dataclass
class _Pending:
    """A frame waiting for its ``RECEIPT``."""

    done: anyio.Event
    # An ERROR naming its receipt fails only this request: the broker keeps
    # the connection open after it (see :meth:`StompSession.request`).
    survivable: bool = False
    error: BaseException | None = None


class StompSession:
    """One connected STOMP session: writes frames, reads them, matches receipts."""

    def __init__(
        self,
        stream: ByteStream,
        parser: FrameParser,
        server: str,
        send_interval: float,
        receive_interval: float,
        task_group: TaskGroup,
        handed_over: HandedOver,
        ack_batch: int,
        *,
        acks_per_subscription: bool = False,
        marks_redeliveries: bool = True,
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
        # RabbitMQ marks a redelivery ``redelivered:true``; ActiveMQ's STOMP
        # MESSAGE carries no such header, so there a body handed over before
        # is skipped on its own (bodies hold a unique message id).
        self._marks_redeliveries = marks_redeliveries
        # Subscriptions whose UNSUBSCRIBE is not written yet: an ACK naming
        # another is an ERROR (and a close) on RabbitMQ.
        self.ackable: set[str] = set()
        # The latest delivery an ACK may name, per subscription where a
        # cumulative ACK settles only its own subscription's, else under "".
        self._acks_per_subscription = acks_per_subscription
        self._ack_ids: dict[str, str] = {}
        self._unacked = 0
        self._ack_batch = ack_batch
        self._ack_wanted = anyio.Event()
        self._ack_due = anyio.Event()

    async def write(self, frame: Frame, *, unsubscribing: str | None = None) -> None:
        """Write ``frame``; for the ``UNSUBSCRIBE`` of ``unsubscribing``, the pending ACK first.

        Cancelled before its first byte went out, nothing was written and the
        connection carries on; cancelled or failed after that, the connection
        is dropped (see :meth:`_send_locked`).
        """
        async with self._write_lock:
            await self._unsent_if_cancelled()
            data = encode_frame(frame)
            if unsubscribing is not None:
                # In the same step, so that no ACK naming it follows.
                self.ackable.discard(unsubscribing)
                data = self._take_ack() + data
            await self._send_locked(data)

    async def _write_bytes(self, data: bytes) -> None:
        async with self._write_lock:
            await self._unsent_if_cancelled()
            await self._send_locked(data)

    async def _unsent_if_cancelled(self) -> None:
        """Raise a cancellation that is pending now, before anything is taken or sent.

        Taking the write lock yields even when it is free, so the publish of a
        socket being closed (its reader's scope cancelled: a token expiry, a
        slow consumer, a drain) is often cancelled right there. Raised here,
        that cancel cannot pass for a write cut short: nothing was sent. From
        here to the stream handing its first byte to the socket nothing
        yields, so no cancel lands in between; one raised by the stream after
        that may leave part of a frame on the wire.
        """
        await anyio.lowlevel.checkpoint_if_cancelled()

    async def _send_locked(self, data: bytes) -> None:
        """Send ``data``; called under the write lock, right after :meth:`_unsent_if_cancelled`."""
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
        acks = b"".join(
            encode_frame(Frame("ACK", {"id": ack_id})) for ack_id in self._ack_ids.values()
        )
        self._ack_ids.clear()
        self._unacked = 0
        return acks

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
                await self._unsent_if_cancelled()
                if ack := self._take_ack():
                    await self._send_locked(ack)

    async def request(
        self,
        frame: Frame,
        *,
        unsent: Callable[[], None] | None = None,
        unsubscribing: str | None = None,
        survivable: bool = False,
    ) -> None:
        """Send ``frame`` with a ``receipt`` header and wait for its ``RECEIPT``.

        The caller bounds the wait. On cancellation the receipt is forgotten,
        and ``unsent`` is called if the frame was not written (whole).
        ``survivable``: an ``ERROR`` answering it (naming its receipt) raises
        :class:`StompBrokerError` here and the connection carries on; only
        for a command the broker fails on its own without closing (ActiveMQ:
        "a command can fail.. but that does not invalidate the connection",
        ``ProtocolConverter``).
        """
        receipt = str(next(self._receipt_ids))
        pending = _Pending(anyio.Event(), survivable)
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
            redelivered = frame.headers.get("redelivered") == "true" or not self._marks_redeliveries
            if key is not None and not (redelivered and body in self.handed_over):
                await incoming.send((key, body))
                if ack_id is not None:
                    self.handed_over.add(body)
            if ack_id is not None:
                # A cumulative ACK of a later delivery also settles one whose
                # subscription ended.
                if subscription_id in self.ackable:
                    self._ack_ids[subscription_id if self._acks_per_subscription else ""] = ack_id
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
            answered = self._receipts.get(frame.headers.get("receipt-id", ""))
            if answered is not None and answered.survivable:
                del self._receipts[frame.headers["receipt-id"]]
                answered.error = error
                answered.done.set()
                return
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
