"""Where messages go inside one instance.

Outbound: a send request is encoded once and published to the broker under
the recipient's key. Inbound: each ``(key, body)`` the broker hands over is
decoded once and the same frame is offered to every local connection of that
user. The router asks the backend to subscribe or unsubscribe only on edges:
the first local connection of a user, and the last one gone.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from triows.backend import Backend, BrokerUnavailable, Outcome
from triows.connection import Connection
from triows.logs import log_event
from triows.metrics import Metrics
from triows.protocol import (
    CLOSE_DRAINING,
    MessageTooLarge,
    SendRequest,
    check_user_name,
    encode_message,
    new_message_id,
    user_key,
    user_of_key,
)
from triows.settings import Settings

# A detaching connection's unsubscribe is cut short after this many broker
# timeouts: the backend bounds the change itself (TRIOWS_BROKER_TIMEOUT) and
# drops its connection when the broker is late, so this guard only catches a
# backend that does not.
UNSUBSCRIBE_TIMEOUT_FACTOR = 2
# How often an unsubscribe cut short by its timeout is tried again.
RECONCILE_INTERVAL = 5.0
# Dropped deliveries are counted each; a log line per reason at most this often.
DROP_LOG_INTERVAL = 10.0
# The user name of the key a draining instance publishes to itself (a random suffix follows).
MARKER_USER_PREFIX = "triows-drain-"


class InvalidDelivery(ValueError):
    """A broker delivery that is not a well-formed ``message`` frame for its key."""


def _reject_constant(name: str) -> None:
    raise InvalidDelivery(f"{name} is not JSON")


def check_delivery(user: str, frame: str) -> None:
    """Raise :class:`InvalidDelivery` unless ``frame`` is a ``message`` frame to ``user``.

    Anyone with credentials on the broker can publish to the exchange; what
    reaches a socket must at least be what a triows instance would have sent.
    """
    try:
        value = json.loads(frame, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise InvalidDelivery("not JSON") from None
    if not isinstance(value, dict) or value.get("type") != "message":
        raise InvalidDelivery("not a message frame")
    if value.get("to") != user:
        raise InvalidDelivery("'to' is not the user of the key it arrived on")
    if not isinstance(value.get("id"), str) or "message" not in value:
        raise InvalidDelivery("no 'id' or 'message'")
    ts = value.get("ts")
    if not isinstance(ts, int) or isinstance(ts, bool):
        raise InvalidDelivery("'ts' is not an integer")
    sender = value.get("from")
    if sender is not None:
        try:
            check_user_name(sender)
        except ValueError:
            raise InvalidDelivery("'from' is not a user name") from None


@dataclass
class _LocalUser:
    connections: set[Connection] = field(default_factory=set)
    subscribed: bool = False
    # Serialises subscribe/unsubscribe of one user so edges never interleave.
    lock: trio.Lock = field(default_factory=trio.Lock)


class Router:
    """Keeps user -> local connections and moves messages between them and the broker."""

    def __init__(self, backend: Backend, metrics: Metrics, settings: Settings) -> None:
        self.backend = backend
        self._metrics = metrics
        self._unsubscribe_timeout = UNSUBSCRIBE_TIMEOUT_FACTOR * settings.broker_timeout
        self._max_message_bytes = settings.max_message_bytes
        self._users: dict[str, _LocalUser] = {}
        self._connections: set[Connection] = set()
        self.idle = trio.Event()
        self.idle.set()
        # Users whose unsubscribe was cut short: the broker may still route
        # their key here although nobody holds it (a 2xx for an offline user).
        self.unsettled: set[str] = set()
        self._unsettled_added = trio.Event()
        # Deliveries dropped per reason since the last log line, and when that was.
        self._dropped_since_log: dict[str, int] = {}
        self._drop_logged_at: dict[str, float] = {}
        self.released = False
        # Drain markers in flight: key -> set when it comes back (see release_all).
        self._markers: dict[str, trio.Event] = {}

    @property
    def connections(self) -> frozenset[Connection]:
        return frozenset(self._connections)

    def __len__(self) -> int:
        """Local connections attached, counted without copying them (unlike ``connections``)."""
        return len(self._connections)

    @asynccontextmanager
    async def attached(self, connection: Connection) -> AsyncIterator[None]:
        """Route the user's messages to ``connection`` while the block runs.

        On entry the user's key is subscribed (if this is its first local
        connection) before anything is routed; on exit, even when cancelled,
        the last connection of a user unsubscribes. Once :meth:`release_all`
        has run, a new connection is not subscribed but closed with 1012.
        """
        user = self._users.setdefault(connection.user, _LocalUser())
        try:
            async with user.lock:
                if self.released:
                    connection.close(CLOSE_DRAINING, "instance draining, reconnect")
                elif not user.subscribed:
                    await self.backend.subscribe(user_key(connection.user))
                    user.subscribed = True
                    self.unsettled.discard(connection.user)
                user.connections.add(connection)
                self._connections.add(connection)
                self.idle = trio.Event() if self.idle.is_set() else self.idle
                self._metrics.connections_open.inc()
            yield
        finally:
            with trio.CancelScope(shield=True):
                await self._detach(connection, user)

    async def _detach(self, connection: Connection, user: _LocalUser) -> None:
        if connection in self._connections:
            self._connections.discard(connection)
            user.connections.discard(connection)
            self._metrics.connections_open.dec()
        if not user.connections and user.subscribed:
            await self._unsubscribe(connection.user, user)
        self._forget_if_unused(connection.user, user)
        if not self._connections:
            self.idle.set()

    async def _unsubscribe(self, name: str, user: _LocalUser) -> None:
        """Unsubscribe ``user`` if it has no connection; record it if cut short by the timeout."""
        with trio.move_on_after(self._unsubscribe_timeout) as scope:
            async with user.lock:
                if user.connections or not user.subscribed:
                    return
                # Cleared first: backends forget a key before they ask the
                # broker, so the next connection of this user subscribes again.
                user.subscribed = False
                await self.backend.unsubscribe(user_key(name))
                self.unsettled.discard(name)
        if scope.cancelled_caught and not user.connections:
            # The broker may still route this key here: retried by reconcile().
            self.unsettled.add(name)
            self._unsettled_added.set()
            log_event("unsubscribe_unsettled", level=logging.WARNING, user=name)

    def _forget_if_unused(self, name: str, user: _LocalUser) -> None:
        unused = not user.connections and not user.subscribed and not user.lock.locked()
        if unused and self._users.get(name) is user:
            del self._users[name]

    async def reconcile(self) -> None:
        """Retry, until they are settled, unsubscribes that were cut short by their timeout.

        A user in :attr:`unsettled` who connects again is subscribed anew
        (and so settled); one who does not is unsubscribed again here, so the
        broker stops answering ``routed`` for an offline user.
        """
        while True:
            await self._unsettled_added.wait()
            self._unsettled_added = trio.Event()
            while self.unsettled:
                for name in sorted(self.unsettled):
                    user = self._users.setdefault(name, _LocalUser())
                    with trio.move_on_after(self._unsubscribe_timeout):
                        async with user.lock:
                            if not user.connections:
                                user.subscribed = False
                                await self.backend.unsubscribe(user_key(name))
                            self.unsettled.discard(name)
                            log_event("unsubscribe_settled", user=name)
                    self._forget_if_unused(name, user)
                if self.unsettled:
                    await trio.sleep(RECONCILE_INTERVAL)

    async def release_all(self, timeout: float) -> None:
        """Drain step one and two: unsubscribe every held key, then flush.

        After the unsubscribes the broker routes nothing more here (a user
        connected only here is offline: 404). A marker published to a key of
        this instance's own then comes back behind whatever the broker had
        already queued for us, and waiting for it (at most ``timeout``
        seconds in all) lets the router hand those messages to the sockets
        before they are closed.
        """
        self.released = True
        marker = MARKER_USER_PREFIX + new_message_id()[:16]
        arrived = trio.Event()
        self._markers[user_key(marker)] = arrived
        with trio.move_on_after(timeout):
            try:
                await self.backend.subscribe(user_key(marker))
                async with trio.open_nursery() as nursery:
                    for name, user in list(self._users.items()):
                        if user.subscribed:
                            nursery.start_soon(self._release, name, user)
                if self.backend.ready:
                    await self.backend.publish(user_key(marker), b"{}")
                    await arrived.wait()
            finally:
                with trio.move_on_after(self._unsubscribe_timeout, shield=True):
                    await self.backend.unsubscribe(user_key(marker))
                del self._markers[user_key(marker)]

    async def _release(self, name: str, user: _LocalUser) -> None:
        # Not recorded when cut short: the instance is going away with its queue.
        with trio.move_on_after(self._unsubscribe_timeout):
            async with user.lock:
                if user.subscribed:
                    user.subscribed = False
                    await self.backend.unsubscribe(user_key(name))

    async def send(self, sender: str | None, request: SendRequest) -> tuple[str, Outcome]:
        """Publish ``request`` and return its id and the broker's outcome.

        Raises :class:`BrokerUnavailable` when the broker is down or does not
        confirm within ``TRIOWS_PUBLISH_TIMEOUT`` (the backend's bound), and
        :class:`MessageTooLarge` when the encoded frame exceeds
        ``TRIOWS_MAX_MESSAGE_BYTES``.
        """
        message_id = new_message_id()
        body = encode_message(message_id, sender, request)
        if len(body) > self._max_message_bytes:
            raise MessageTooLarge(
                f"the message frame is {len(body)} bytes; the limit is {self._max_message_bytes}"
            )
        started = time.perf_counter()
        try:
            outcome = await self.backend.publish(user_key(request.to), body)
        except BrokerUnavailable as error:
            self._metrics.messages_published.labels("unavailable").inc()
            log_event("publish_failed", to=request.to, error=str(error))
            raise
        self._metrics.send_seconds.observe(time.perf_counter() - started)
        self._metrics.messages_published.labels(outcome.value).inc()
        return message_id, outcome

    def deliver(self, key: str, body: bytes) -> None:
        """Offer one message from the broker to every local connection of its user.

        A delivery over the size limit, or that is not a well-formed
        ``message`` frame to the user of its key, is dropped and counted:
        anyone with credentials on the broker can publish to the exchange.
        """
        name = user_of_key(key)
        user = self._users.get(name) if name is not None else None
        if user is None or not user.connections:
            if self._markers and key in self._markers:
                self._markers[key].set()
                return
            # A message in flight while the last connection left: nobody to give it to.
            self._metrics.messages_dropped.labels("no_connection").inc()
            return
        assert name is not None  # a user was found by it
        if len(body) > self._max_message_bytes:
            self._drop("too_large", key, len(body), "over TRIOWS_MAX_MESSAGE_BYTES")
            return
        try:
            frame = body.decode()
            check_delivery(name, frame)
        except (UnicodeDecodeError, InvalidDelivery) as error:
            # Not from a triows instance: someone else published to our exchange.
            self._drop("invalid", key, len(body), str(error))
            return
        for connection in tuple(user.connections):
            try:
                offered = connection.offer(frame)
            except Exception as error:  # a bug: counted and logged, the others still get it
                self._drop("error", key, len(body), repr(error))
                continue
            if offered:
                self._metrics.messages_delivered.inc()
            else:
                self._metrics.messages_dropped.labels("slow_consumer").inc()

    def _drop(self, reason: str, key: str, size: int, detail: str) -> None:
        """Count a dropped delivery; log at most one line per reason per interval."""
        self._metrics.messages_dropped.labels(reason).inc()
        count = self._dropped_since_log.get(reason, 0) + 1
        now = time.monotonic()
        if now - self._drop_logged_at.get(reason, -DROP_LOG_INTERVAL) < DROP_LOG_INTERVAL:
            self._dropped_since_log[reason] = count
            return
        self._dropped_since_log[reason] = 0
        self._drop_logged_at[reason] = now
        level = logging.ERROR if reason == "error" else logging.WARNING
        log_event(
            "delivery_dropped",
            level=level,
            reason=reason,
            dropped=count,
            last_key=key,
            last_size=size,
            last_detail=detail,
        )

    async def run(self) -> None:
        """Hand every message the backend receives to the local connections.

        Also retries unsettled unsubscribes (:meth:`reconcile`). A delivery
        that raises is counted (``reason="error"``) and logged, and the pump
        goes on: one bad delivery must not stop routing for everyone. If the
        backend's stream ends, this returns; the caller treats that as fatal.
        """
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.reconcile)
            async for key, body in self.backend.incoming:
                try:
                    self.deliver(key, body)
                except Exception as error:  # counted and logged (ERROR), see above
                    self._drop("error", key, len(body), repr(error))
            nursery.cancel_scope.cancel()
