"""What every broker backend shares: held keys, readiness, reconnects, errors, logs, close.

A broker backend is a :class:`Supervised` subclass that supplies only its
protocol: open a connection and set it up (:meth:`Supervised._session`),
restore the held keys on it, subscribe/unsubscribe one key, publish one
message, and feed its deliveries to ``self._incoming_send``. This module
supplies everything else, once:

Held keys. ``subscribe``/``unsubscribe`` record the key, then (while a
connection follows the keys) ask the broker within ``TRIOWS_BROKER_TIMEOUT``.
A change the broker does not confirm (lost, refused, too slow) is logged as
``broker_binding_deferred`` and the connection is dropped, so that the
reconnect restores exactly the held set. A subscribe that no connection
confirmed (none followed the keys, or it was lost under the call) then does
what the protocol can without one (``_subscribe_offline``; on RabbitMQ's
AMQP 1.0 plugin: declare the key's queue, so that what is published for it
from then on waits for the reconnect). They never raise
:class:`BrokerUnavailable`. Changes of different keys do not wait for each
other: up to ``CHANGES_IN_FLIGHT`` wait for the broker at once, so that some
users' churn does not hold up everyone's connects and joins. Ordering the
changes of one key is the caller's (the router holds a lock per key). While a
new connection restores the held keys, changes wait for the restore, and it
waits for those in flight (:class:`ChangeGate`), unless the backend queues the
restore of every key in one synchronous step (``RESTORES_AT_ONCE``), after
which a change of a key cannot overtake its restore.

Readiness. ``ready`` is true from the moment every held key is restored on a
connection until that connection is lost; :meth:`Supervised.wait_ready` waits
for it. ``publish`` raises :class:`BrokerUnavailable` at once while not ready,
and when no confirm comes within ``TRIOWS_PUBLISH_TIMEOUT`` (the only place
that timeout is applied).

Reconnects and errors. Each failure of a connection is classified:

- *transient* (:data:`TRANSIENT` and the backend's ``LOST``): a refused, reset,
  silent or closed connection. Retried forever with the shared capped, jittered
  backoff (:class:`triows.backoff.Backoff`), one ``broker_unavailable`` event
  per attempt.
- *permanent* (:class:`BrokerRejected`: authentication refused, TLS
  certificate verification failed, a configuration conflict such as an
  exchange declared with another type): reported once as one
  ``broker_rejected`` error line naming what is wrong, then retried every
  ``TRIOWS_RECONNECT_MAX`` seconds without further lines until it changes. All
  three are retried rather than ending the instance, because each is fixed on
  the broker (a password reset, a renewed certificate, an exchange deleted),
  and a process that waits for the fix recovers without a restart while its
  ``/readyz`` says 503 meanwhile.
- anything else is a bug: it ends the backend's task group, which raises out
  of the backend's context and so ends the instance. So does a backend task
  that returns while the backend is open. Never a live process with a dead
  backend.

Broker nodes. ``TRIOWS_BROKER_URL`` may list several URLs, one per node of a
cluster (:func:`backends.broker_url.broker_urls`). The backend connects to
the first; after every failure, transient or permanent, the next attempt goes
to the next node in the list (round the list), after the same backoff or
``TRIOWS_RECONNECT_MAX`` wait as with one URL, and restores the held keys
there like any reconnect. The backend's ``_address`` is the node of the
current (or next) attempt; ``broker`` in the log lines names it.

Broker URLs and TLS streams: :mod:`backends.broker_url` (one parser, one
connect that verifies certificates).

Log events: ``broker_connected``, ``broker_ready``, ``broker_not_ready``,
``broker_unavailable``, ``broker_rejected``, ``broker_binding_deferred``,
``broker_close_failed``.
"""

from __future__ import annotations

import logging
import socket
import ssl
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import anyio
from anyio.abc import ObjectReceiveStream, TaskStatus

from triows.backend import BrokerUnavailable, Delivery, Outcome, Sessions
from triows.backoff import Backoff
from triows.logs import log_event
from triows.settings import Settings

if TYPE_CHECKING:
    # broker_url imports BrokerRejected from here.
    from triows.backends.broker_url import BrokerAddress

C = TypeVar("C")


class BrokerRejected(Exception):
    """The broker refused us for a reason a quick retry cannot fix.

    ``kind`` is ``authentication``, ``tls`` or ``configuration``; ``fields``
    name what is wrong (for one clear log line).
    """

    def __init__(self, kind: str, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.kind = kind
        self.fields = fields


TRANSIENT: tuple[type[BaseException], ...] = (
    # Refused, reset or aborted sockets and our own bounds (TimeoutError).
    ConnectionError,
    TimeoutError,
    # DNS failures: the name may resolve again.
    socket.gaierror,
    # anyio.connect_tcp's "all connection attempts failed", unreachable
    # networks. TLS failures are OSErrors too, but classified first (below).
    OSError,
    # A stream that broke or ended under us.
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
)
"""What every backend treats as a lost or unreachable broker (besides its own ``LOST``)."""


def rejection(error: BaseException) -> BrokerRejected | None:
    """``error`` as a permanent failure, if it is one (TLS verification anywhere in its causes)."""
    seen: BaseException | None = error
    # A chain can loop (seen on a GarageMQ restart: aiormq's connection errors
    # end up each other's context), so every exception is looked at once.
    visited: set[int] = set()
    while seen is not None and id(seen) not in visited:
        visited.add(id(seen))
        if isinstance(seen, BrokerRejected):
            return seen
        if isinstance(seen, ssl.SSLCertVerificationError):
            return BrokerRejected("tls", f"TLS certificate verification failed: {seen}")
        seen = seen.__cause__ or seen.__context__
    return None


def first_leaf(error: BaseException, wanted: tuple[type[BaseException], ...]) -> BaseException:
    """The first exception in ``error`` (a group or not) that is one of ``wanted``; the
    group itself re-raised if any leaf is not (a bug must not pass for a broker loss)."""
    if not isinstance(error, BaseExceptionGroup):
        return error
    leaves: list[BaseException] = []

    def collect(group: BaseExceptionGroup[BaseException]) -> None:
        for inner in group.exceptions:
            if isinstance(inner, BaseExceptionGroup):
                collect(inner)
            else:
                leaves.append(inner)

    collect(error)
    if all(isinstance(leaf, wanted) or rejection(leaf) for leaf in leaves):
        return next((leaf for leaf in leaves if rejection(leaf)), leaves[0])
    raise error


class ChangeGate:
    """Up to ``limit`` subscription changes at once, or a restore alone.

    A restore waits for the changes in flight (they act on the connection
    that was lost) and holds back new ones until it is done, so that it reads
    the held keys and restores them without a change of one of them in
    between; it goes ahead of changes that are waiting, as the held keys it
    restores already include theirs.
    """

    def __init__(self, limit: int) -> None:
        self._slots = anyio.Semaphore(limit)
        self._running = 0
        self._none_running = anyio.Event()
        self._restore_done: anyio.Event | None = None

    @asynccontextmanager
    async def change(self) -> AsyncIterator[None]:
        """Run one change: once a slot is free and no restore runs or waits."""
        async with self._slots:
            while self._restore_done is not None:
                await self._restore_done.wait()
            self._running += 1
            try:
                yield
            finally:
                self._running -= 1
                if self._running == 0:
                    self._none_running.set()

    @asynccontextmanager
    async def alone(self) -> AsyncIterator[None]:
        """Run a restore: once no change runs; none starts until it is done."""
        while self._restore_done is not None:
            await self._restore_done.wait()
        done = self._restore_done = anyio.Event()
        try:
            while self._running:
                self._none_running = anyio.Event()
                await self._none_running.wait()
            yield
        finally:
            self._restore_done = None
            done.set()


# --- the shared half of every broker backend ---------------------------------


class Supervised(ABC, Generic[C]):
    """A broker backend: the shared bookkeeping around one protocol's connection ``C``.

    Open it with :func:`run_supervised`. Subclasses implement the abstract
    protocol methods; see the module docstring for what this class does.
    """

    LOST: ClassVar[tuple[type[BaseException], ...]] = ()
    """The protocol's own "connection lost" errors (transient, besides :data:`TRANSIENT`)."""

    PUBLISH_BOUNDED: ClassVar[bool] = False
    """True where :meth:`_publish_on` bounds its own wait by ``TRIOWS_PUBLISH_TIMEOUT``
    (once per batch), so that no cancel scope is opened per message here."""

    CHANGES_IN_FLIGHT: ClassVar[int] = 64
    """Subscribes/unsubscribes (of different keys) that may wait for the broker at once."""

    RESTORES_AT_ONCE: ClassVar[bool] = False
    """True where :meth:`_restore` acts on every key (queues or makes its change)
    before its first ``await``, so that changes need not wait for a restore."""

    def __init__(self, settings: Settings, addresses: Sequence[BrokerAddress]) -> None:
        if not addresses:
            raise ValueError("a broker backend needs at least one broker address")
        self._settings = settings
        self._addresses = tuple(addresses)
        self._node = 0  # the index in ``_addresses`` of the current (or next) attempt
        for line in settings.deprecations:
            log_event("setting_deprecated", logging.WARNING, detail=line)
        self._incoming_send, self._incoming_receive = anyio.create_memory_object_stream[Delivery](
            settings.incoming_queue
        )
        self._keys: set[str] = set()
        self._changes = ChangeGate(self.CHANGES_IN_FLIGHT)
        self._following: C | None = None  # the connection subscribe/unsubscribe act on
        self._ready: C | None = None  # the same, once every held key is restored on it
        self._ready_changed = anyio.Event()
        self._closing = False
        self._loss: tuple[type[BaseException], ...] = (*TRANSIENT, *self.LOST)
        self._broker_failures: tuple[type[BaseException], ...] = (
            *self._loss,
            BrokerRejected,
            BrokerUnavailable,
        )
        # One per background task; :meth:`aclose` cancels them, not the
        # caller's block (which runs inside the same task group).
        self._task_scopes: list[anyio.CancelScope] = []

    # -- the protocol (subclasses) --

    @abstractmethod
    async def _session(self, up: Callable[[C], Awaitable[None]]) -> None:
        """Connect and set up; ``await up(connection)`` once set up; run until the
        connection is lost and raise what lost it. Close the connection on exit."""

    @abstractmethod
    async def _restore(self, connection: C, keys: list[str]) -> None:
        """Subscribe every key of ``keys`` on a new connection (each step within
        ``self._broker_timeout``)."""

    @abstractmethod
    async def _subscribe_on(self, connection: C, key: str) -> None: ...

    @abstractmethod
    async def _unsubscribe_on(self, connection: C, key: str) -> None: ...

    @abstractmethod
    async def _publish_on(self, connection: C, key: str, body: bytes) -> Outcome:
        """Publish and wait for the broker's confirm (the caller bounds the time)."""

    @abstractmethod
    def _abandon(self, connection: C) -> None:
        """Drop ``connection`` at once (its session then ends and reconnects)."""

    @abstractmethod
    async def _close(self, connection: C) -> None:
        """Close ``connection`` gracefully (the caller bounds the time)."""

    async def _subscribe_offline(self, key: str) -> None:
        """What a subscribe of ``key`` does while no connection follows the held keys.

        By default nothing: the next connection restores it. A protocol whose
        broker can keep a key's messages without our connection (a queue that
        outlives it) prepares that here, so that what is published for the key
        after ``subscribe`` returned waits for the reconnect.
        """

    def _describe(self, connection: C) -> dict[str, Any]:
        """Protocol details for the ``broker_connected`` line."""
        return {}

    def _background(self) -> list[Callable[[], Awaitable[None]]]:
        """Tasks that run as long as the backend is open (besides the reconnect loop)."""
        return []

    # -- the Backend contract --

    @property
    def ready(self) -> bool:
        """Connected, and every held key subscribed."""
        return self._ready is not None

    @property
    def incoming(self) -> ObjectReceiveStream[Delivery]:
        """``(key, body)`` for the keys this instance holds, in broker order (bounded)."""
        return self._incoming_receive

    @property
    def sessions(self) -> Sessions | None:
        """Session queues; None until a backend and its broker can hold them."""
        return None

    @property
    def _address(self) -> BrokerAddress:
        """The broker node of the current connection, or of the next attempt."""
        return self._addresses[self._node]

    @property
    def _broker(self) -> str:
        """The current node, for logs and errors (no credentials)."""
        return str(self._address)

    def _next_node(self) -> None:
        """Point the next attempt at the next node of the list (round it)."""
        self._node = (self._node + 1) % len(self._addresses)

    @property
    def _broker_timeout(self) -> float:
        return self._settings.broker_timeout

    async def wait_ready(self) -> None:
        """Return once :attr:`ready` is true."""
        while self._ready is None:
            await self._ready_changed.wait()

    async def wait_not_ready(self) -> None:
        """Return once :attr:`ready` is false (for probes and tests)."""
        while self._ready is not None:
            await self._ready_changed.wait()

    async def publish(self, key: str, body: bytes) -> Outcome:
        """Publish ``body`` to ``key`` and wait (``TRIOWS_PUBLISH_TIMEOUT``) for the confirm.

        Raises :class:`BrokerUnavailable` at once while not ready, and when the
        broker refuses the message, the connection drops or the confirm is late.
        On cancellation the message may or may not have been published.
        """
        connection = self._ready
        if connection is None:
            raise BrokerUnavailable(f"not connected to the broker {self._broker}")
        timeout = self._settings.publish_timeout
        try:
            if self.PUBLISH_BOUNDED:
                return await self._publish_on(connection, key, body)
            with anyio.fail_after(timeout):
                return await self._publish_on(connection, key, body)
        except BrokerUnavailable:
            raise
        except TimeoutError:
            raise BrokerUnavailable(f"no confirm from the broker within {timeout}s") from None
        except self._loss as error:
            raise BrokerUnavailable(f"lost the broker: {error!r}") from None

    async def subscribe(self, key: str) -> None:
        """Hold ``key``; while connected, return once the broker confirmed it.

        While not connected (also when the connection is lost under this
        call), the key is recorded for the next connection to restore; see
        :meth:`_subscribe_offline` for what a protocol may do meanwhile.
        """
        async with self._changes.change():
            self._keys.add(key)
            confirmed = await self._change(self._subscribe_on, "subscribe", key)
            if not confirmed:
                await self._subscribe_offline(key)

    async def unsubscribe(self, key: str) -> None:
        """Release ``key``; while connected, return once the broker confirmed it.

        Cut short by the caller's cancellation, the key is released all the
        same and the connection dropped: the broker may still hold a binding
        this backend has forgotten (it would route messages for a user gone
        offline), and the reconnect restores exactly the held keys.
        """
        async with self._changes.change():
            self._keys.discard(key)
            await self._change(self._unsubscribe_on, "unsubscribe", key, drop_if_cut=True)

    async def _change(
        self,
        operation: Callable[[C, str], Awaitable[None]],
        name: str,
        key: str,
        *,
        drop_if_cut: bool = False,
    ) -> bool:
        """Run ``operation`` on the connection that follows the held keys; whether the
        broker confirmed it (False also with no such connection: the next one restores
        the held keys)."""
        connection = self._following
        if connection is None:
            return False
        ended = False  # with the broker's answer or a failure (not cancelled)
        error: BaseException | None = None
        try:
            with anyio.fail_after(self._broker_timeout):
                await operation(connection, key)
            ended = True
        except self._broker_failures as failure:
            ended, error = True, failure
        finally:
            # A broker that does not answer is treated as lost: the reconnect
            # restores a known state instead of guessing. (A cancelled
            # subscribe leaves the key held and its next change or the next
            # connection settles it; a cut-short unsubscribe cannot wait.)
            cut = not ended and drop_if_cut
            if self._following is connection and (cut or error is not None):
                log_event(
                    "broker_binding_deferred",
                    logging.WARNING,
                    operation=name,
                    key=key,
                    error=repr(error) if error is not None else "cut short by cancellation",
                )
                self._abandon(connection)
        return error is None

    async def aclose(self) -> None:
        """Close the connection gracefully (``TRIOWS_CLOSE_TIMEOUT``) and stop. Idempotent."""
        if self._closing:
            return
        self._closing = True
        connection = self._following
        self._lost(connection)
        if connection is not None:
            with anyio.CancelScope(shield=True), anyio.move_on_after(self._settings.close_timeout):
                try:
                    await self._close(connection)
                except self._broker_failures as error:
                    log_event("broker_close_failed", logging.WARNING, error=repr(error))
        for scope in self._task_scopes:
            scope.cancel()

    # -- connection state --

    def _lost(self, connection: C | None) -> None:
        """``connection`` is gone: stop following and publishing on it."""
        if connection is None or self._following is not connection:
            return
        self._following = None
        self._set_ready(None)

    def _set_ready(self, connection: C | None) -> None:
        if (connection is None) == (self._ready is None):
            self._ready = connection
            return
        self._ready = connection
        log_event("broker_ready" if connection is not None else "broker_not_ready")
        self._ready_changed.set()
        self._ready_changed = anyio.Event()

    def _all_changes(self) -> AbstractAsyncContextManager[object]:
        if self.RESTORES_AT_ONCE:
            return nullcontext()
        return self._changes.alone()

    async def _maintain(self, *, task_status: TaskStatus[None]) -> None:
        """Connect, and reconnect after every loss, until closed.

        Reports started after the first attempt, successful or not, so that a
        backend opened while the broker is up is ready at once.
        """
        settings = self._settings
        backoff = Backoff(max_delay=settings.reconnect_max_delay)
        started = False
        # The permanent failures logged since the last connection: one line
        # each, however often every node of the list is tried again.
        reported: set[str] = set()

        def report_started() -> None:
            nonlocal started
            if not started:
                started = True
                task_status.started()

        async def up(connection: C) -> None:
            nonlocal reported
            async with self._all_changes():
                keys = sorted(self._keys)
                self._following = connection  # same step as reading the keys
                await self._restore(connection, keys)
                self._set_ready(connection)
            backoff.reset()
            reported.clear()
            log_event(
                "broker_connected",
                broker=self._broker,
                keys=len(keys),
                **self._describe(connection),
            )
            report_started()

        lost = self._loss
        while not self._closing:
            error: BaseException
            try:
                await self._session(up)
                error = ConnectionError("the broker connection ended")
            except Exception as raised:
                error = first_leaf(raised, lost)
                if not isinstance(error, lost) and rejection(error) is None:
                    raise
            finally:
                self._lost(self._following)
            report_started()
            if self._closing:
                return
            rejected = rejection(error)
            if rejected is None:
                await backoff.wait_after_loss(self._broker, error)
                self._next_node()
                continue
            if str(rejected) not in reported:
                reported.add(str(rejected))
                log_event(
                    "broker_rejected",
                    logging.ERROR,
                    broker=self._broker,
                    kind=rejected.kind,
                    error=str(rejected),
                    retry_every=settings.reconnect_max_delay,
                    **rejected.fields,
                )
            await anyio.sleep(settings.reconnect_max_delay)
            self._next_node()


class BackendTaskEnded(RuntimeError):
    """A backend task returned while the backend was open: the instance must end."""


S = TypeVar("S", bound=Supervised[Any])


@asynccontextmanager
async def run_supervised(backend: S) -> AsyncIterator[S]:
    """Run ``backend``'s tasks for the block; close it gracefully on exit.

    Returns after the first connection attempt (ready if the broker is up). A
    task that fails with anything but a broker loss, or returns, raises out
    of this block: the instance ends rather than live on with a dead backend.
    """

    async with (
        backend._incoming_send,
        backend._incoming_receive,
        anyio.create_task_group() as tasks,
    ):
        for task in backend._background():
            tasks.start_soon(_guarded, backend, task)
        await tasks.start(_guarded_maintain, backend)
        try:
            yield backend
        finally:
            with anyio.CancelScope(shield=True):
                await backend.aclose()


async def _guarded(backend: Supervised[Any], task: Callable[[], Awaitable[None]]) -> None:
    with anyio.CancelScope() as scope:
        backend._task_scopes.append(scope)
        await task()
    if not backend._closing:
        raise BackendTaskEnded(f"backend task {task!r} ended while the backend was open")


async def _guarded_maintain(backend: Supervised[Any], *, task_status: TaskStatus[None]) -> None:
    with anyio.CancelScope() as scope:
        backend._task_scopes.append(scope)
        await backend._maintain(task_status=task_status)
    if not backend._closing:
        raise BackendTaskEnded("the backend's reconnect loop ended while the backend was open")
