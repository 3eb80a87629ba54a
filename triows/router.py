"""Where messages go inside one instance.

Outbound: a send request is encoded once and published to the broker under
the recipient's key (``user.<name>`` or ``room.<name>``). Inbound: each
``(key, body)`` the broker hands over is checked once and the same frame is
offered to every local connection of that key: a user's connections, or a
room's members. The router asks the backend to subscribe or unsubscribe only
on edges: the first local connection of a key, and the last one gone.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

import trio

from triows.backend import Backend, BrokerUnavailable, Outcome
from triows.connection import Connection
from triows.logs import log_event
from triows.metrics import Metrics
from triows.presence import PRESENCE_KEY_PREFIX, InvalidPresenceMessage, Presence
from triows.protocol import (
    CLOSE_DRAINING,
    ROOM_KEY_PREFIX,
    MessageTooLarge,
    SendRequest,
    check_user_name,
    encode_message,
    new_message_id,
    room_key,
    room_of_key,
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


class TooManyRooms(Exception):
    """A connection asked to join more rooms than ``TRIOWS_MAX_ROOMS``."""


def _reject_constant(name: str) -> None:
    raise InvalidDelivery(f"{name} is not JSON")


def check_delivery(key: str, frame: str) -> None:
    """Raise :class:`InvalidDelivery` unless ``frame`` is a ``message`` frame for ``key``.

    On ``user.<name>`` that is a frame ``"to": "<name>"`` without a room; on
    ``room.<name>`` a frame ``"room": "<name>"`` with ``"to": null``. Anyone
    with credentials on the broker can publish to the exchange; what reaches
    a socket must at least be what a triows instance would have sent.
    """
    try:
        value = json.loads(frame, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise InvalidDelivery("not JSON") from None
    if not isinstance(value, dict) or value.get("type") != "message":
        raise InvalidDelivery("not a message frame")
    room = room_of_key(key)
    if room is None:
        if value.get("to") != user_of_key(key) or value.get("room") is not None:
            raise InvalidDelivery("'to' is not the user of the key it arrived on")
    elif value.get("room") != room or value.get("to") is not None:
        raise InvalidDelivery("'room' is not the room of the key it arrived on")
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
class _LocalKey:
    """The local connections that receive one key (a user's or a room's)."""

    connections: set[Connection] = field(default_factory=set)
    subscribed: bool = False
    # Serialises subscribe/unsubscribe of one key so edges never interleave.
    lock: trio.Lock = field(default_factory=trio.Lock)


class Attachment:
    """:meth:`Router.attached`: a connection attached while the ``async with`` block runs.

    A class rather than an ``@asynccontextmanager``: every idle socket holds
    one, and a generator's frame and context manager cost ~0.8 KiB more.
    """

    __slots__ = ("_connection", "_router")

    def __init__(self, router: Router, connection: Connection) -> None:
        self._router = router
        self._connection = connection

    async def __aenter__(self) -> None:
        await self._router._attach(self._connection)

    async def __aexit__(self, *exc_info: object) -> None:
        connection = self._connection
        with trio.CancelScope(shield=True):
            await self._router._detach(connection, user_key(connection.user))


class Router:
    """Keeps key -> local connections and moves messages between them and the broker.

    A key is a user's (``user.<name>``: every connection of that user, held
    by :meth:`attached`) or a room's (``room.<name>``: every connection that
    joined it, :meth:`join` / :meth:`leave`). Both share one mechanism: the
    first local connection of a key subscribes it, the last one gone
    unsubscribes it.
    """

    def __init__(self, backend: Backend, metrics: Metrics, settings: Settings) -> None:
        self.backend = backend
        self._metrics = metrics
        self._unsubscribe_timeout = UNSUBSCRIBE_TIMEOUT_FACTOR * settings.broker_timeout
        self._max_message_bytes = settings.max_message_bytes
        self._max_rooms = settings.max_rooms
        self.session_prefetch = settings.session_prefetch
        self._keys: dict[str, _LocalKey] = {}
        self._connections: set[Connection] = set()
        # The rooms each connection joined (only connections that joined one).
        self._rooms_of: dict[Connection, set[str]] = {}
        self._delivered = {
            kind: metrics.messages_delivered.labels(kind) for kind in ("user", "room")
        }
        self.idle = trio.Event()
        self.idle.set()
        # Keys whose unsubscribe was cut short: the broker may still route
        # them here although nobody holds them (a 2xx for an offline user).
        self.unsettled: set[str] = set()
        self._unsettled_added = trio.Event()
        # Deliveries dropped per reason since the last log line, and when that was.
        self._dropped_since_log: dict[str, int] = {}
        self._drop_logged_at: dict[str, float] = {}
        self.released = False
        # Drain markers in flight: key -> set when it comes back (see release_all).
        self._markers: dict[str, trio.Event] = {}
        self._presence_events = {
            outcome: metrics.presence_events.labels(outcome)
            for outcome in ("joined", "left", "elsewhere", "unavailable", "dropped")
        }
        self.presence = Presence(self, settings)

    @property
    def connections(self) -> frozenset[Connection]:
        return frozenset(self._connections)

    def __len__(self) -> int:
        """Local connections attached, counted without copying them (unlike ``connections``)."""
        return len(self._connections)

    def rooms_of(self, connection: Connection) -> frozenset[str]:
        """The rooms ``connection`` is a member of."""
        return frozenset(self._rooms_of.get(connection, ()))

    def attached(self, connection: Connection) -> Attachment:
        """Route the user's messages to ``connection`` while the ``async with`` block runs.

        On entry the user's key is subscribed (if this is its first local
        connection) before anything is routed; on exit, even when cancelled,
        the connection leaves its rooms and the last connection of a user
        unsubscribes. Once :meth:`release_all` has run, a new connection is
        not subscribed but closed with 1012.
        """
        return Attachment(self, connection)

    async def _attach(self, connection: Connection) -> None:
        key = user_key(connection.user)
        try:
            await self._add(key, connection)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._detach(connection, key)
            raise
        self._connections.add(connection)
        self.idle = trio.Event() if self.idle.is_set() else self.idle
        self._metrics.connections_open.inc()
        if self.released:
            # Its subscribe was in flight when the drain began, so the drain
            # may have closed the others already: this one goes the same way
            # (release_all unsubscribes its key once that subscribe ends).
            connection.close(CLOSE_DRAINING, "instance draining, reconnect")

    async def join(self, connection: Connection, room: str) -> None:
        """Make ``connection`` a member of ``room``; returns once the room's key is subscribed.

        ``connection`` must be attached (inside :meth:`attached`). Joining a
        room it is already in does nothing. Raises :class:`TooManyRooms` over
        ``TRIOWS_MAX_ROOMS`` and :class:`BrokerUnavailable` once the instance
        is draining. The subscribe is not cut short by cancellation (it is
        bounded by ``TRIOWS_BROKER_TIMEOUT``), so the bookkeeping always
        matches what the broker holds.
        """
        if connection not in self._connections:
            raise ValueError("join() needs an attached connection")
        rooms = self._rooms_of.setdefault(connection, set())
        if room in rooms:
            return
        if len(rooms) >= self._max_rooms:
            raise TooManyRooms(f"a connection may be in at most {self._max_rooms} rooms")
        if self.released:
            raise BrokerUnavailable("this instance is draining: reconnect elsewhere")
        key = room_key(room)
        rooms.add(room)  # taken before the await, so concurrent joins cannot overshoot
        try:
            with trio.CancelScope(shield=True):
                await self._add(key, connection)
        except BaseException:
            rooms.discard(room)
            with trio.CancelScope(shield=True):
                await self._remove(key, connection)
            raise
        with trio.CancelScope(shield=True):
            if self._rooms_of.get(connection) is not rooms or room not in rooms:
                # Detached (or left) while the subscribe ran: undo it.
                await self._remove(key, connection)
            else:
                await self.presence.add(connection, room)

    async def leave(self, connection: Connection, room: str) -> None:
        """Stop delivering ``room`` to ``connection`` at once; the last member unsubscribes.

        Leaving a room the connection is not in does nothing.
        """
        rooms = self._rooms_of.get(connection)
        if rooms is None or room not in rooms:
            return
        rooms.discard(room)
        with trio.CancelScope(shield=True):
            await self._remove(room_key(room), connection)
            await self.presence.remove(connection, room)

    async def _add(self, key: str, connection: Connection) -> None:
        """Add ``connection`` to ``key``'s, subscribing the key on its first local connection."""
        local = self._keys.setdefault(key, _LocalKey())
        async with local.lock:
            if self.released:
                connection.close(CLOSE_DRAINING, "instance draining, reconnect")
            elif not local.subscribed:
                await self.backend.subscribe(key)
                local.subscribed = True
                self.unsettled.discard(key)
            local.connections.add(connection)

    async def add_member(self, key: str, connection: Connection) -> None:
        """Offer ``key``'s deliveries to ``connection`` too (a room's presence events)."""
        await self._add(key, connection)

    async def remove_member(self, key: str, connection: Connection) -> None:
        await self._remove(key, connection)

    def connections_of(self, user: str) -> int:
        """The connections of ``user`` attached here."""
        local = self._keys.get(user_key(user))
        return 0 if local is None else len(local.connections)

    def count_presence_event(self, outcome: str) -> None:
        self._presence_events[outcome].inc()

    async def _remove(self, key: str, connection: Connection) -> None:
        """Take ``connection`` off ``key``'s; the last one gone unsubscribes the key."""
        local = self._keys.get(key)
        if local is None:
            return
        local.connections.discard(connection)
        if not local.connections and local.subscribed:
            await self._unsubscribe(key, local)
        self._forget_if_unused(key, local)

    async def _detach(self, connection: Connection, key: str) -> None:
        if connection in self._connections:
            self._connections.discard(connection)
            self._metrics.connections_open.dec()
        rooms = self._rooms_of.pop(connection, set())
        # Delivery stops at once for every key; the unsubscribes follow, together.
        for held in (key, *(room_key(room) for room in rooms)):
            local = self._keys.get(held)
            if local is not None:
                local.connections.discard(connection)
        async with trio.open_nursery() as nursery:
            for room in rooms:
                nursery.start_soon(self._remove, room_key(room), connection)
                nursery.start_soon(self.presence.remove, connection, room)
            await self._remove(key, connection)
        if not self._connections:
            self.idle.set()

    async def _unsubscribe(self, key: str, local: _LocalKey) -> None:
        """Unsubscribe ``key`` if it has no connection; record it if cut short by the timeout."""
        with trio.move_on_after(self._unsubscribe_timeout) as scope:
            async with local.lock:
                if local.connections or not local.subscribed:
                    return
                # Cleared first: backends forget a key before they ask the
                # broker, so the next connection of this key subscribes again.
                local.subscribed = False
                await self.backend.unsubscribe(key)
                self.unsettled.discard(key)
        if scope.cancelled_caught and not local.connections:
            # The broker may still route this key here: retried by reconcile().
            self.unsettled.add(key)
            self._unsettled_added.set()
            log_event("unsubscribe_unsettled", level=logging.WARNING, key=key)

    def _forget_if_unused(self, key: str, local: _LocalKey) -> None:
        unused = not local.connections and not local.subscribed and not local.lock.locked()
        if unused and self._keys.get(key) is local:
            del self._keys[key]

    async def reconcile(self) -> None:
        """Retry, until they are settled, unsubscribes that were cut short by their timeout.

        A key in :attr:`unsettled` that gets a connection again is subscribed
        anew (and so settled); one that does not is unsubscribed again here,
        so the broker stops answering ``routed`` for an offline user or room.
        """
        while True:
            await self._unsettled_added.wait()
            self._unsettled_added = trio.Event()
            while self.unsettled:
                for key in sorted(self.unsettled):
                    local = self._keys.setdefault(key, _LocalKey())
                    with trio.move_on_after(self._unsubscribe_timeout):
                        async with local.lock:
                            if not local.connections:
                                local.subscribed = False
                                await self.backend.unsubscribe(key)
                            self.unsettled.discard(key)
                            log_event("unsubscribe_settled", key=key)
                    self._forget_if_unused(key, local)
                if self.unsettled:
                    await trio.sleep(RECONCILE_INTERVAL)

    async def release_all(self, timeout: float) -> None:
        """Drain step one and two: unsubscribe every held key, then flush.

        A subscribe still in flight is waited for and undone, and its
        connection is closed with 1012 once attached (as is any connection
        attaching from now on): none stays routed to after a drain.

        After the unsubscribes the broker routes nothing more here (a user
        connected only here is offline: 404). A marker published to a key of
        this instance's own then comes back behind whatever the broker had
        already queued for us, and waiting for it (at most ``timeout``
        seconds in all) lets the router hand those messages to the sockets
        before they are closed.
        """
        self.released = True
        if self.backend.sessions is not None:
            await self._release_sessions(timeout)
            return
        marker = MARKER_USER_PREFIX + new_message_id()[:16]
        arrived = trio.Event()
        self._markers[user_key(marker)] = arrived
        with trio.move_on_after(timeout):
            try:
                await self.backend.subscribe(user_key(marker))
                # Every key, not only those subscribed now: a subscribe in
                # flight holds its key's lock, and its release waits for it.
                # A subscribe that starts from now on finds ``released`` and
                # does not subscribe.
                async with trio.open_nursery() as nursery:
                    for key, local in list(self._keys.items()):
                        nursery.start_soon(self._release, key, local)
                if self.backend.ready:
                    await self.backend.publish(user_key(marker), b"{}")
                    await arrived.wait()
            finally:
                with trio.move_on_after(self._unsubscribe_timeout, shield=True):
                    await self.backend.unsubscribe(user_key(marker))
                del self._markers[user_key(marker)]

    async def _release_sessions(self, timeout: float) -> None:
        """With sessions: no more deliveries to any session here, and no key marked connected.

        The backend stops every session's consumer at once: what it had not
        acked goes back to the sessions' queues for their resume elsewhere
        (a frame written meanwhile comes back too, and the resume's cursor
        skips it), so no marker round trip is needed.
        """
        sessions = self.backend.sessions
        assert sessions is not None
        with trio.move_on_after(timeout):
            await sessions.release()
            async with trio.open_nursery() as nursery:
                for key, local in list(self._keys.items()):
                    nursery.start_soon(self._release, key, local)

    async def _release(self, key: str, local: _LocalKey) -> None:
        # Not recorded when cut short: the instance is going away with its queue.
        with trio.move_on_after(self._unsubscribe_timeout):
            async with local.lock:
                if local.subscribed:
                    local.subscribed = False
                    await self.backend.unsubscribe(key)

    async def send(self, sender: str | None, request: SendRequest) -> tuple[str, Outcome]:
        """Publish ``request`` (to a user or a room) and return its id and the broker's outcome.

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
        kind = "user" if request.room is None else "room"
        started = time.perf_counter()
        try:
            outcome = await self.backend.publish(request.key, body)
        except BrokerUnavailable as error:
            self._metrics.messages_published.labels("unavailable", kind).inc()
            log_event("publish_failed", to=request.target, error=str(error))
            raise
        self._metrics.send_seconds.observe(time.perf_counter() - started)
        self._metrics.messages_published.labels(outcome.value, kind).inc()
        return message_id, outcome

    def deliver(self, key: str, body: bytes) -> None:
        """Offer one message from the broker to every local connection of its key.

        A delivery over the size limit, or that is not a well-formed
        ``message`` frame for its key, is dropped and counted: anyone with
        credentials on the broker can publish to the exchange.
        """
        local = self._keys.get(key)
        if key.startswith(PRESENCE_KEY_PREFIX):
            try:
                self.presence.deliver(key, body, local.connections if local else set())
            except InvalidPresenceMessage as error:
                self._drop("invalid", key, len(body), str(error))
            return
        if local is None or not local.connections:
            if self._markers and key in self._markers:
                self._markers[key].set()
                return
            # A message in flight while the last connection left: nobody to give it to.
            self._metrics.messages_dropped.labels("no_connection").inc()
            return
        frame = self.checked_frame(key, body)
        if frame is None:
            return
        delivered = self._delivered["room" if key.startswith(ROOM_KEY_PREFIX) else "user"]
        for connection in tuple(local.connections):
            try:
                offered = connection.offer(frame)
            except Exception as error:  # a bug: counted and logged, the others still get it
                self._drop("error", key, len(body), repr(error))
                continue
            if offered:
                delivered.inc()
            else:
                self._metrics.messages_dropped.labels("slow_consumer").inc()

    def checked_frame(self, key: str, body: bytes) -> str | None:
        """``body`` as the frame to write, or None (dropped and counted) when it is not one.

        A delivery over the size limit, or that is not a well-formed
        ``message`` frame for its key, is dropped: anyone with credentials on
        the broker can publish to the exchange.
        """
        if len(body) > self._max_message_bytes:
            self._drop("too_large", key, len(body), "over TRIOWS_MAX_MESSAGE_BYTES")
            return None
        try:
            frame = body.decode()
            check_delivery(key, frame)
        except (UnicodeDecodeError, InvalidDelivery) as error:
            # Not from a triows instance: someone else published to our exchange.
            self._drop("invalid", key, len(body), str(error))
            return None
        return frame

    def count_delivered(self, key: str) -> None:
        """One frame of ``key`` queued to a local connection (a session's)."""
        self._delivered["room" if key.startswith(ROOM_KEY_PREFIX) else "user"].inc()

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
