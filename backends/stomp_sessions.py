"""Session queues over STOMP on RabbitMQ (:class:`triows.backend.Sessions`).

A session's queue is declared and bound over AMQP 0-9-1
(:func:`backends.rabbitmq_exchange.declare_session_queue`): RabbitMQ 3.10's
STOMP plugin passes neither ``x-overflow`` nor ``x-single-active-consumer``
from a ``SUBSCRIBE`` (``rabbit_stomp_util:build_arguments`` reads only the
expiry, length, TTL, dead-letter, priority and queue-type headers), and a
``SUBSCRIBE`` binds one key. The queue carries:

- ``x-expires`` = ``TRIOWS_RESUME_WINDOW``: deleted once nothing consumed it
  (nor declared it) that long;
- ``x-max-length`` / ``x-max-length-bytes`` = ``TRIOWS_SESSION_MAX_MESSAGES``
  / ``TRIOWS_SESSION_MAX_BYTES`` with ``x-overflow: drop-head``: past a
  bound the *oldest* message goes. ``reject-publish`` is what the contract
  wants (the sender told ``full``), but RabbitMQ 3.x's STOMP and AMQP 1.0
  plugins crash on the ``basic.nack`` that brings: the publisher's whole
  connection is dropped without an ``ERROR`` (``rabbit_stomp_reader`` has no
  clause for it), so one full queue would cut every instance that sends to
  its user off the broker. Publishes are therefore ``accepted`` as before;
  no ``full`` outcome here;
- ``x-single-active-consumer``: a second consumer (a resume while the old
  connection has not gone yet) waits until the first goes, then gets what
  it left unacked;
- ``x-queue-type`` = ``TRIOWS_QUEUE_TYPE`` (as the ``amqp091`` backend's).

Each session is consumed on a STOMP connection of its own, ``SUBSCRIBE``
``/amq/queue/<name>`` (consumes the queue, declares nothing) with
``ack:client-individual`` and ``prefetch-count`` = ``TRIOWS_SESSION_PREFETCH``;
a delivery is acked by its own ``ACK`` once written to the socket. Why not
the instance's one connection: on RabbitMQ 3.10 the deliveries a
subscription left unacked cannot be given back while its connection lives.
After ``UNSUBSCRIBE`` they stay unacked on the connection's channel until
the connection closes (an ``ACK`` or ``NACK`` naming them is an ``ERROR``);
a ``NACK`` before it requeues them to the same, still active, consumer. Closing the
session's own connection gives every unacked delivery back at once, in
order, flagged ``redelivered:true`` for the next consumer: that is
:meth:`StompSessionQueue.detach`. A connection lost under a session is made
again (same backoff as the backend's) and the queue subscribed again; what
it had handed over unacked comes back redelivered. What is done over AMQP
0-9-1 (declare, bind, restore, delete) is shared with the AMQP 1.0 sessions:
:mod:`backends.rabbitmq_sessions`.

The session's note is a ``SEND`` to ``/amq/queue/<name>`` (the default
exchange): it comes back with ``destination:/queue/<name>``, which is how a
note is told from a message (``destination:/exchange/<exchange>/<key>``).
:meth:`StompSessionQueue.end` closes the connection first, then deletes the
queue over AMQP 0-9-1 (a consumer whose queue is deleted gets ``ERROR``
"Server cancelled subscription").
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import anyio
from anyio.abc import ByteStream

from triows.backend import NOTE_KEY, BrokerUnavailable, SessionDeliver, SessionDelivery
from triows.backends.broker_url import BrokerAddress, connect_stream
from triows.backends.rabbitmq_sessions import RabbitSessionQueue, RabbitSessions, wait_to_reconnect
from triows.backends.stomp_frames import Frame, FrameParser, StompProtocolError, encode_frame
from triows.backends.stomp_session import READ_SIZE, HeartbeatTimeout, StompBrokerError
from triows.backends.supervisor import TRANSIENT, BrokerRejected, first_leaf
from triows.backoff import Backoff
from triows.settings import Settings

# What ends one session connection (it is then made again) or fails a request.
LOST: tuple[type[BaseException], ...] = (
    *TRANSIENT,
    StompBrokerError,
    StompProtocolError,
    HeartbeatTimeout,
    BrokerRejected,
    BrokerUnavailable,
)
# How a served connection ends: a loss, alone or among its tasks' (a group).
SERVING_ENDS: tuple[type[BaseException], ...] = (*LOST, BaseExceptionGroup)
REQUEST_FAILURES: tuple[type[BaseException], ...] = (*TRANSIENT, BrokerUnavailable)


class StompSessions(RabbitSessions["StompSessionQueue"]):
    """Every session queue this instance consumes over STOMP on RabbitMQ."""

    def __init__(
        self,
        settings: Settings,
        where: Callable[[], tuple[BrokerAddress, int]],
        handshake: Callable[[ByteStream, FrameParser, BrokerAddress], Any],
    ) -> None:
        # The broker node (STOMP address) and AMQP 0-9-1 port of the backend's current connection.
        super().__init__(settings, where)
        self.handshake = handshake

    def _new_queue(
        self, name: str, key: str, deliver: SessionDeliver, waiting: int
    ) -> StompSessionQueue:
        return StompSessionQueue(self, name, key, deliver, waiting)


class StompSessionQueue(RabbitSessionQueue):
    """One session's queue, consumed on a STOMP connection of its own (module docstring)."""

    _sessions: StompSessions

    def __init__(
        self, sessions: StompSessions, name: str, key: str, deliver: SessionDeliver, waiting: int
    ) -> None:
        super().__init__(sessions, name, key, deliver, waiting)
        # tag -> (connection number, STOMP ack id): an ack id of a lost
        # connection means nothing on the next one.
        self._ack_ids: dict[int, tuple[int, str]] = {}
        self._acks: list[str] = []
        self._acks_due = anyio.Event()
        self._connections = itertools.count(1)
        self._connection = 0
        self._stream: ByteStream | None = None
        self._write_lock = anyio.Lock()
        self._receipts: dict[str, anyio.Event] = {}
        self._receipt_ids = itertools.count(1)
        self._exchange_prefix = f"/exchange/{self._settings.exchange}/"
        self._early: list[Frame] = []  # deliveries that came before the SUBSCRIBE's receipt

    # -- the connection --

    async def start(self) -> None:
        """Connect and subscribe (raises :class:`BrokerUnavailable`); then serve in the
        background."""
        try:
            with anyio.fail_after(self._settings.broker_timeout):
                stream, parser, intervals = await self._connect()
        except LOST as error:
            raise BrokerUnavailable(f"session queue {self.name!r} not consumed: {error}") from error
        task_group = self._sessions.task_group
        if task_group is None:
            await stream.aclose()
            raise BrokerUnavailable("the STOMP backend is not running")
        self._sessions.open_queues.add(self)
        self._adopt(stream)
        task_group.start_soon(self._serve_and_reconnect, stream, parser, intervals)

    def _adopt(self, stream: ByteStream) -> None:
        """Make ``stream`` the session's connection (requests and acks go out on it)."""
        self._connection = next(self._connections)
        self._stream = stream
        self._acks = []

    async def _connect(self) -> tuple[ByteStream, FrameParser, tuple[float, float]]:
        address, _amqp_port = self._sessions.where()
        stream = await connect_stream(
            address.host, address.port, tls=address.tls, cafile=address.cafile
        )
        try:
            parser = FrameParser(max_body_bytes=max(self._settings.max_message_bytes, 65536))
            intervals = await self._sessions.handshake(stream, parser, address)
            headers = {
                "id": "session",
                "destination": f"/amq/queue/{self.name}",
                "ack": "client-individual",
                "prefetch-count": str(self._settings.session_prefetch),
                "receipt": "subscribed",
            }
            await stream.send(encode_frame(Frame("SUBSCRIBE", headers)))
            # Deliveries may come before the receipt: kept for the serving loop.
            self._early = []
            while True:
                frames = parser.feed(await stream.receive(READ_SIZE))
                receipt = next((f for f in frames if f.command == "RECEIPT"), None)
                for frame in frames:
                    if frame.command == "ERROR":
                        raise StompBrokerError(f"STOMP broker error: {_detail(frame)}")
                    if frame.command == "MESSAGE":
                        self._early.append(frame)
                if receipt is not None:
                    break
        except BaseException:
            await stream.aclose()
            raise
        return stream, parser, intervals

    async def _serve_and_reconnect(
        self, stream: ByteStream, parser: FrameParser, intervals: tuple[float, float]
    ) -> None:
        backoff = Backoff(self._settings.reconnect_max_delay)
        try:
            with anyio.CancelScope() as self._scope:
                while not self._over:
                    try:
                        await self._serve(stream, parser, intervals)
                    except SERVING_ENDS as raised:
                        error = first_leaf(raised, LOST)
                        if self._over:
                            return
                        await wait_to_reconnect(backoff, self.name, error)
                    while not self._over:
                        try:
                            await self.restore()
                            with anyio.fail_after(self._settings.broker_timeout):
                                stream, parser, intervals = await self._connect()
                            self._adopt(stream)
                            backoff.reset()
                            break
                        except LOST as error:
                            await wait_to_reconnect(backoff, self.name, error)
        finally:
            with anyio.CancelScope(shield=True):
                await stream.aclose()  # also one made or adopted but never served
            self._sessions.open_queues.discard(self)
            self._stream = None
            self._gone.set()

    async def _serve(
        self, stream: ByteStream, parser: FrameParser, intervals: tuple[float, float]
    ) -> None:
        """One connection, until it fails (raises) or the session is over (returns)."""
        send_interval, receive_interval = intervals
        try:
            async with stream, anyio.create_task_group() as tasks:
                tasks.start_soon(self._send_acks)
                if send_interval:
                    tasks.start_soon(self._send_heartbeats, send_interval)
                for frame in self._early:
                    self._handle(frame)
                timeout = 2 * receive_interval if receive_interval else math.inf
                while True:
                    with anyio.move_on_after(timeout) as silent:
                        data = await stream.receive(READ_SIZE)
                    if silent.cancelled_caught:
                        raise HeartbeatTimeout(f"STOMP broker silent for {timeout:.1f} s")
                    for frame in parser.feed(data):
                        self._handle(frame)
        finally:
            self._stream = None
            for event in self._receipts.values():
                event.set()  # the request finds the connection gone

    def _handle(self, frame: Frame) -> None:
        if frame.command == "MESSAGE":
            tag = next(self._tags)
            self._ack_ids[tag] = (self._connection, frame.headers.get("ack", ""))
            destination = frame.headers.get("destination", "")
            if destination.startswith(self._exchange_prefix):
                key = destination[len(self._exchange_prefix) :]
            else:
                key = NOTE_KEY  # sent to the queue itself (/queue/<name>)
            if self._deliver is not None:
                redelivered = frame.headers.get("redelivered") == "true"
                self._deliver(SessionDelivery(key, frame.body, tag, redelivered))
            # Detached: left unacked, given back when the connection closes.
        elif frame.command == "RECEIPT":
            event = self._receipts.pop(frame.headers.get("receipt-id", ""), None)
            if event is not None:
                event.set()
        elif frame.command == "ERROR":
            raise StompBrokerError(f"STOMP broker error: {_detail(frame)}")
        else:
            raise StompProtocolError(f"unexpected {frame.command} frame from the broker")

    async def _write(self, data: bytes) -> None:
        stream = self._stream
        if stream is None:
            raise BrokerUnavailable(f"session queue {self.name!r}: no connection")
        async with self._write_lock:
            await stream.send(data)

    async def _send_acks(self) -> None:
        while True:
            await self._acks_due.wait()
            self._acks_due = anyio.Event()
            acks, self._acks = self._acks, []
            if acks:
                await self._write(b"".join(encode_frame(Frame("ACK", {"id": i})) for i in acks))

    async def _send_heartbeats(self, interval: float) -> None:
        while True:
            # Twice per interval, so a late timer on either side cannot make
            # the broker see a gap.
            await anyio.sleep(interval / 2)
            await self._write(b"\n")

    async def _request(self, frame: Frame) -> None:
        """Send ``frame`` with a receipt and wait for it (bounded by TRIOWS_BROKER_TIMEOUT)."""
        receipt = f"r{next(self._receipt_ids)}"
        done = self._receipts[receipt] = anyio.Event()
        connection = self._connection
        try:
            with anyio.fail_after(self._settings.broker_timeout):
                await self._write(
                    encode_frame(
                        Frame(frame.command, {**frame.headers, "receipt": receipt}, frame.body)
                    )
                )
                await done.wait()
        except REQUEST_FAILURES as error:
            raise BrokerUnavailable(f"session queue {self.name!r}: {error}") from error
        finally:
            self._receipts.pop(receipt, None)
        if self._connection != connection or self._stream is None:
            raise BrokerUnavailable(f"session queue {self.name!r}: the connection was lost")

    # -- the contract --

    async def note(self, body: bytes) -> None:
        await self._request(Frame("SEND", {"destination": f"/amq/queue/{self.name}"}, body))

    def ack(self, tag: int) -> None:
        ack_id = self._ack_ids.pop(tag, None)
        if ack_id is None or ack_id[0] != self._connection or self._stream is None:
            return  # of a lost connection: the broker gives it back anyway
        self._acks.append(ack_id[1])
        self._acks_due.set()

    async def _close(self) -> None:
        try:
            # Acks written before the DISCONNECT are settled before it.
            acks, self._acks = self._acks, []
            frames = [Frame("ACK", {"id": i}) for i in acks]
            await self._write(b"".join(encode_frame(f) for f in frames))
            await self._request(Frame("DISCONNECT"))
        except BrokerUnavailable:
            pass  # gone already: the broker gave them back itself


def _detail(frame: Frame) -> str:
    detail = frame.headers.get("message", "")
    if frame.body:
        detail = f"{detail}: {frame.body.decode('utf-8', 'replace').strip()}"
    return detail
