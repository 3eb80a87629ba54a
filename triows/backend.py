"""The backend contract: what the server needs from a message broker.

The server reaches a backend only through :func:`open_backend`, which looks the
name up in the built-in registry or in the ``triows.backends`` entry-point
group and imports it lazily, so a third party can ship a backend as its own
package.
"""

from __future__ import annotations

import enum
import importlib
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Protocol

from anyio.abc import ObjectReceiveStream

if TYPE_CHECKING:
    from triows.settings import Settings


class Outcome(enum.Enum):
    """What the broker said about a published message."""

    ROUTED = "routed"  # confirmed, and at least one instance holds the key
    UNROUTED = "unrouted"  # confirmed, and nobody holds the key (recipient offline)
    ACCEPTED = "accepted"  # confirmed; this backend cannot tell whether anyone holds it
    # With sessions: confirmed and held for the user's sessions, none of them connected now.
    QUEUED = "queued"
    # With sessions: a session of the key holds its maximum, so the broker refused the message.
    FULL = "full"


class BrokerUnavailable(Exception):
    """The broker cannot take the message now (not connected, or it failed to confirm)."""


class UnknownBackend(Exception):
    """``TRIOWS_BACKEND`` names no registered backend."""


Delivery = tuple[str, bytes]
"""A message handed over by the broker: ``(key, body)``."""


NOTE_KEY = "session.note"
"""The key of a session's own note (:meth:`SessionQueue.note`) among its deliveries."""
LOST_KEY = "session.lost"
"""The key of a delivery (empty, never acked) by which a backend says it lost the
session's consumer: the connection closes, so that its client resumes."""


@dataclass(frozen=True, slots=True)
class SessionDelivery:
    """A message a session's queue handed over: ack ``tag`` once it is written to the socket."""

    key: str  # user.<name>, room.<name>, or NOTE_KEY
    body: bytes
    tag: int
    # The broker handed it over before (to a connection that went away without acking it).
    redelivered: bool


SessionDeliver = Callable[[SessionDelivery], None]
"""Called by the backend, in queue order, for each delivery of a session; must not block."""


class SessionQueue(Protocol):
    """One session's messages, held by the broker while the session is inside its window.

    The queue is bound to the session's keys and consumed with manual acks;
    at most ``prefetch`` deliveries are unacknowledged at a time, so what the
    broker hands over is bounded. What is not acked when the session is
    detached (the connection went away, the instance drains or dies) goes back
    to the queue, in order, for the next connection that resumes it.
    """

    @property
    def waiting(self) -> int:
        """Messages (notes included) the broker held for the session when it was opened."""
        ...

    async def bind(self, key: str) -> None:
        """Hold ``key``'s messages from now on (raises :class:`BrokerUnavailable`)."""
        ...

    async def unbind(self, key: str) -> None:
        """Stop holding ``key``'s messages (raises :class:`BrokerUnavailable`)."""
        ...

    async def note(self, body: bytes) -> None:
        """Put ``body`` in the queue itself; it comes back as a delivery on :data:`NOTE_KEY`.

        The session keeps its latest note unacked, so a resume finds it again
        (the rooms joined). Raises :class:`BrokerUnavailable`.
        """
        ...

    def ack(self, tag: int) -> None:
        """The delivery ``tag`` is done (written to the socket): the broker forgets it."""
        ...

    async def detach(self) -> None:
        """Take no more deliveries, and give back every one not acked; the queue stays for
        the window.

        Idempotent; never raises (a broker that is gone gives them back itself).
        """
        ...

    async def end(self) -> None:
        """Delete the queue and what it holds: the session is over. Idempotent, never raises."""
        ...


class Sessions(Protocol):
    """What a backend that can resume offers: session queues at the broker."""

    async def release(self) -> None:
        """A drain: stop every session's consumer here at once; what is not acked goes back.

        Every :class:`SessionQueue` opened here is detached by it (their own
        ``detach`` then does nothing). Never raises.
        """
        ...

    async def open(
        self, name: str, key: str, deliver: SessionDeliver, *, resume: bool
    ) -> SessionQueue | None:
        """Open session ``name``'s queue, bound to ``key``, and start handing its deliveries over.

        ``resume``: the queue must exist already (None when it does not: it
        expired or never was); otherwise it is made. Raises
        :class:`BrokerUnavailable`.
        """
        ...


class Backend(Protocol):
    """One broker connection per instance, shared by every WebSocket of it.

    ``subscribe`` and ``unsubscribe`` never raise :class:`BrokerUnavailable`:
    the backend keeps the set of held keys and restores all of them after it
    reconnects. While the broker is up they return once the broker has
    confirmed the change, so a message sent after ``subscribe`` returns reaches
    this instance. ``publish`` returns once the broker has taken responsibility
    for the message and raises :class:`BrokerUnavailable` at once while the
    broker is down, or when the broker's confirm takes longer than
    ``TRIOWS_PUBLISH_TIMEOUT`` (the backend applies that bound; callers need
    not). ``wait_ready`` returns once ``ready`` is true; ``aclose`` closes the
    broker connection gracefully and may be called more than once (the
    opener's context calls it on exit).

    A backend module may also define ``check_settings(settings)``, raising
    :class:`triows.settings.SettingsError` for settings it cannot work with
    (a malformed broker URL): ``triows serve`` calls it before starting.
    """

    @property
    def ready(self) -> bool:
        """Connected and consuming."""
        ...

    @property
    def incoming(self) -> ObjectReceiveStream[Delivery]:
        """Messages for the keys this instance holds, in broker order (bounded)."""
        ...

    @property
    def sessions(self) -> Sessions | None:
        """Session queues, or None: this backend (or its broker) cannot hold sessions.

        With sessions, ``subscribe`` and ``unsubscribe`` mark a key as
        *connected here* (no messages arrive for it on :attr:`incoming`), and
        ``publish`` answers ``QUEUED`` for a key held only by sessions away.
        """
        ...

    async def publish(self, key: str, body: bytes) -> Outcome: ...

    async def subscribe(self, key: str) -> None: ...

    async def unsubscribe(self, key: str) -> None: ...

    async def wait_ready(self) -> None: ...

    async def aclose(self) -> None: ...


BackendOpener = Callable[["Settings"], AbstractAsyncContextManager[Backend]]
"""``open_<name>_backend(settings)``: an async context manager that owns the
backend's background tasks and closes its broker connection on exit."""

BUILTIN_BACKENDS: dict[str, str] = {
    "memory": "triows.backends.memory:open_memory_backend",
    "amqp091": "triows.backends.amqp091:open_amqp091_backend",
    "amqp10": "triows.backends.amqp10:open_amqp10_backend",
    "stomp": "triows.backends.stomp:open_stomp_backend",
}
ENTRY_POINT_GROUP = "triows.backends"


def known_backends() -> list[str]:
    """Every backend name: the built-in ones and those of installed packages."""
    names = set(BUILTIN_BACKENDS)
    names.update(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
    return sorted(names)


def load_backend(name: str) -> BackendOpener:
    """Import the opener of backend ``name``; raise :class:`UnknownBackend` if none."""
    target = BUILTIN_BACKENDS.get(name)
    if target is None:
        for ep in entry_points(group=ENTRY_POINT_GROUP, name=name):
            opener: BackendOpener = ep.load()
            return opener
        raise UnknownBackend(
            f"unknown backend {name!r}; known backends: {', '.join(known_backends())}"
        )
    module_name, _, attribute = target.partition(":")
    module = importlib.import_module(module_name)
    opener = getattr(module, attribute)
    return opener


def check_backend_settings(settings: Settings) -> None:
    """Load the backend ``settings.backend`` names and let it check its settings.

    Raises :class:`UnknownBackend`, or the backend's
    :class:`~triows.settings.SettingsError` (e.g. a malformed broker URL).
    """
    opener = load_backend(settings.backend)
    module = importlib.import_module(opener.__module__)
    check: Callable[[Settings], None] | None = getattr(module, "check_settings", None)
    if check is not None:
        check(settings)


def open_backend(settings: Settings) -> AbstractAsyncContextManager[Backend]:
    """Open the backend that ``settings.backend`` names."""
    return load_backend(settings.backend)(settings)
