"""Where messages go inside one instance.

Outbound: a send request is encoded once and published to the broker under
the recipient's key. Inbound: each ``(key, body)`` the broker hands over is
decoded once and the same frame is offered to every local connection of that
user. The router asks the backend to subscribe or unsubscribe only on edges:
the first local connection of a user, and the last one gone.
"""

from __future__ import annotations

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
    MessageTooLarge,
    SendRequest,
    encode_message,
    new_message_id,
    user_key,
    user_of_key,
)
from triows.settings import Settings

# How long a detaching connection may take to unsubscribe once it is being torn down.
UNSUBSCRIBE_TIMEOUT = 5.0


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
        self._publish_timeout = settings.publish_timeout
        self._max_message_bytes = settings.max_message_bytes
        self._users: dict[str, _LocalUser] = {}
        self._connections: set[Connection] = set()
        self.idle = trio.Event()
        self.idle.set()

    @property
    def connections(self) -> frozenset[Connection]:
        return frozenset(self._connections)

    @asynccontextmanager
    async def attached(self, connection: Connection) -> AsyncIterator[None]:
        """Route the user's messages to ``connection`` while the block runs.

        On entry the user's key is subscribed (if this is its first local
        connection) before anything is routed; on exit, even when cancelled,
        the last connection of a user unsubscribes.
        """
        user = self._users.setdefault(connection.user, _LocalUser())
        try:
            async with user.lock:
                if not user.subscribed:
                    await self.backend.subscribe(user_key(connection.user))
                    user.subscribed = True
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
        with trio.move_on_after(UNSUBSCRIBE_TIMEOUT):
            async with user.lock:
                if not user.connections and user.subscribed:
                    # Cleared first: backends forget a key before they ask the
                    # broker, so even an unsubscribe cut short by the timeout
                    # leaves the next connection of this user to subscribe again.
                    user.subscribed = False
                    await self.backend.unsubscribe(user_key(connection.user))
        unused = not user.connections and not user.subscribed and not user.lock.locked()
        if unused and self._users.get(connection.user) is user:
            del self._users[connection.user]
        if not self._connections:
            self.idle.set()

    async def send(self, sender: str | None, request: SendRequest) -> tuple[str, Outcome]:
        """Publish ``request`` and return its id and the broker's outcome.

        Raises :class:`BrokerUnavailable` when the broker is down or does not
        confirm within the publish timeout, and :class:`MessageTooLarge` when
        the encoded frame exceeds ``TRIOWS_MAX_MESSAGE_BYTES``.
        """
        message_id = new_message_id()
        body = encode_message(message_id, sender, request)
        if len(body) > self._max_message_bytes:
            raise MessageTooLarge(
                f"the message frame is {len(body)} bytes; the limit is {self._max_message_bytes}"
            )
        started = time.perf_counter()
        try:
            with trio.fail_after(self._publish_timeout):
                outcome = await self.backend.publish(user_key(request.to), body)
        except (BrokerUnavailable, trio.TooSlowError) as error:
            self._metrics.messages_published.labels("unavailable").inc()
            log_event("publish_failed", to=request.to, error=str(error) or "confirm timed out")
            raise BrokerUnavailable(str(error) or "the broker did not confirm in time") from None
        self._metrics.send_seconds.observe(time.perf_counter() - started)
        self._metrics.messages_published.labels(outcome.value).inc()
        return message_id, outcome

    def deliver(self, key: str, body: bytes) -> None:
        """Offer one message from the broker to every local connection of its user."""
        name = user_of_key(key)
        user = self._users.get(name) if name is not None else None
        if user is None or not user.connections:
            # A message in flight while the last connection left: nobody to give it to.
            self._metrics.messages_dropped.labels("no_connection").inc()
            return
        try:
            frame = body.decode()
        except UnicodeDecodeError:
            # Not from a triows instance: someone else published to our exchange.
            self._metrics.messages_dropped.labels("invalid").inc()
            log_event("invalid_delivery", level=logging.WARNING, key=key, size=len(body))
            return
        for connection in user.connections:
            if connection.offer(frame):
                self._metrics.messages_delivered.inc()
            else:
                self._metrics.messages_dropped.labels("slow_consumer").inc()

    async def run(self) -> None:
        """Hand every message the backend receives to the local connections."""
        async for key, body in self.backend.incoming:
            self.deliver(key, body)
