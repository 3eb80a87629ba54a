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
- Heart-beats are negotiated from ``TRIOWS_HEARTBEAT`` (seconds; 0 disables):
  we send ours, and a broker silent for twice its interval counts as dead.
- Reconnects, held keys, readiness, timeouts and error classes are
  :mod:`backends.supervisor`'s; every held key is subscribed again before
  the backend reports ready. An ``ERROR`` answer to ``CONNECT`` (login or
  virtual host refused) is permanent; the protocol's own transient errors
  are :attr:`StompBackend.LOST`.

Broker URL: ``stomp://login:passcode@host:port/vhost`` (port 61613 and vhost
``/`` by default). The vhost goes in the ``host`` header, which RabbitMQ reads
as the virtual host. For RabbitMQ's ``/exchange/...`` destinations the
exchange must exist and STOMP cannot create it, so the backend declares it
over AMQP 0-9-1 (:mod:`backends.rabbitmq_exchange`) on the same host, port
5672 unless the URL says ``?amqp_port=N``.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
from anyio.abc import ByteStream, ObjectSendStream, TaskGroup

from backends.broker_url import BrokerAddress, connect_stream, parse_broker_url, query_int
from backends.rabbitmq_exchange import declare_direct_exchange
from backends.stomp_frames import Frame, FrameParser, StompProtocolError, encode_frame
from backends.supervisor import TRANSIENT, BrokerRejected, Supervised, run_supervised
from triows.backend import BrokerUnavailable, Delivery, Outcome
from triows.logs import log_event
from triows.settings import Settings

SCHEMES = {"stomp": (61613, False), "stomp+ssl": (61613, True)}
DEFAULT_AMQP_PORT = 5672
READ_SIZE = 65536
MIN_BODY_BOUND = 65536

# Ack mode ``auto``. Subscriptions here are non-durable (an ActiveMQ topic
# subscription, a RabbitMQ auto-delete exclusive queue): they vanish with the
# connection, so an unacknowledged message is never redelivered and client
# acks would buy no reliability, only one ACK frame per message. Flow control
# still holds without them: the reader stops reading while the bounded
# ``incoming`` stream is full, TCP pushes back, and RabbitMQ's credit flow or
# ActiveMQ's producer flow control stop the broker from pushing further. A
# ``client-individual`` window (RabbitMQ ``prefetch-count``, ActiveMQ
# ``activemq.prefetchSize``) is per subscription, i.e. per user, so it would
# not bound the instance's total anyway.
ACK_MODE = "auto"


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
        self._subscription_numbers = itertools.count(1)
        self._broken = False

    async def write(self, frame: Frame) -> None:
        await self._write_bytes(encode_frame(frame))

    async def _write_bytes(self, data: bytes) -> None:
        async with self._write_lock:
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

    async def request(self, frame: Frame) -> None:
        """Send ``frame`` with a ``receipt`` header and wait for its ``RECEIPT``.

        The caller bounds the wait. On cancellation the receipt is forgotten.
        """
        receipt = str(next(self._receipt_ids))
        pending = _Pending(anyio.Event())
        self._receipts[receipt] = pending
        try:
            await self.write(
                Frame(frame.command, {**frame.headers, "receipt": receipt}, frame.body)
            )
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
        subscription_id = f"s{next(self._subscription_numbers)}"
        self.subscription_keys[subscription_id] = key
        self.subscription_ids[key] = subscription_id
        return subscription_id

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
            key = self.subscription_keys.get(frame.headers.get("subscription", ""))
            # None: a message already in flight when we unsubscribed.
            if key is not None:
                await incoming.send((key, frame.body))
        elif frame.command == "RECEIPT":
            pending = self._receipts.pop(frame.headers.get("receipt-id", ""), None)
            if pending is not None:
                pending.done.set()
        elif frame.command == "ERROR":
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

    async def _subscribe_on(self, connection: _StompConnection, key: str) -> None:
        if key in connection.subscription_ids:
            return  # two subscriptions would deliver every message twice
        subscription_id = connection.new_subscription_id(key)
        headers = {"id": subscription_id, "destination": self.destination(key), "ack": ACK_MODE}
        await connection.request(Frame("SUBSCRIBE", headers))

    async def _unsubscribe_on(self, connection: _StompConnection, key: str) -> None:
        subscription_id = connection.subscription_ids.pop(key, None)
        if subscription_id is None:
            return
        # Keep the id -> key entry until the broker confirmed, so messages
        # already in flight still find their key; drop it afterwards.
        await connection.request(Frame("UNSUBSCRIBE", {"id": subscription_id}))
        connection.subscription_keys.pop(subscription_id, None)

    async def _restore(self, connection: _StompConnection, keys: list[str]) -> None:
        for key in keys:
            with anyio.fail_after(self._broker_timeout):
                await self._subscribe_on(connection, key)

    def _abandon(self, connection: _StompConnection) -> None:
        connection.task_group.cancel_scope.cancel()

    async def _close(self, connection: _StompConnection) -> None:
        await connection.request(Frame("DISCONNECT"))

    def _describe(self, connection: _StompConnection) -> dict[str, Any]:
        return {
            "server": connection.server,
            "destination": self.destination("{key}"),
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
                    stream, parser, server, send_ms / 1000, receive_ms / 1000, task_group
                )
                task_group.start_soon(self._read, connection)
                task_group.start_soon(connection.send_heartbeats)
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
