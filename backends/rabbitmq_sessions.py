"""What the STOMP and AMQP 1.0 session queues on RabbitMQ share.

Both declare, bind and delete a session's queue over AMQP 0-9-1
(:mod:`backends.rabbitmq_exchange`) and consume it on a connection of its own
(:mod:`backends.stomp_sessions` says why, and which arguments the queue
carries; :mod:`backends.amqp10_sessions`). A connection lost under a session
is made again after the backend's backoff (:func:`wait_to_reconnect`), its
exchange, queue and bindings declared again first
(:meth:`RabbitSessionQueue.restore`). Only the consuming connection is each
protocol's own: :meth:`RabbitSessionQueue.start` and
:meth:`RabbitSessionQueue._close`. The ``amqp091`` backend consumes its
sessions on its own connection and shares only the queue's arguments.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import anyio
from anyio.abc import TaskGroup

from triows.backend import BrokerUnavailable, SessionDeliver
from triows.backends.broker_url import BrokerAddress
from triows.backends.rabbitmq_exchange import (
    DELETE_FAILURES,
    QueueOutOfReach,
    change_bindings,
    declare_direct_exchange,
    declare_session_queue,
    delete_queues,
)
from triows.backoff import Backoff
from triows.logs import log_event
from triows.settings import Settings

# What a declare or bind over AMQP 0-9-1 fails with (as a delete does); the
# contract says it as BrokerUnavailable.
UNAVAILABLE: tuple[type[BaseException], ...] = (*DELETE_FAILURES, BrokerUnavailable)


def session_queue_arguments(settings: Settings, *, overflow: str = "drop-head") -> dict[str, Any]:
    """The arguments of a session's queue (:mod:`backends.stomp_sessions`' docstring; the
    ``amqp091`` backend's overflow is ``reject-publish``)."""
    return {
        "x-expires": max(1, round(settings.resume_window * 1000)),
        "x-max-length": settings.session_max_messages,
        "x-max-length-bytes": settings.session_max_bytes,
        "x-overflow": overflow,
        "x-single-active-consumer": True,
        # quorum: replicated over a cluster, so a session outlives a node.
        "x-queue-type": settings.queue_type,
    }


async def wait_to_reconnect(backoff: Backoff, queue: str, error: BaseException) -> None:
    """Wait the backend's next delay before a session connection is made again.

    Only the first loss of a run is logged (at INFO): the backend's own
    ``broker_unavailable`` says the broker is gone, once per attempt, not once
    per session.
    """
    delay = backoff.next_delay()
    if backoff.attempts == 1:
        log_event("session_connection_lost", queue=queue, error=str(error) or repr(error))
    await anyio.sleep(delay)


class RabbitSessionQueue:
    """One session's queue: the part done over AMQP 0-9-1 (names, bindings, restore, delete).

    A subclass consumes it on a connection of its own: :meth:`start` (raises
    :class:`BrokerUnavailable`) runs the connection task, which makes the
    connection again after a loss until the session is over, in ``_scope``,
    and sets ``_gone`` when it ends; :meth:`_close` closes the connection
    gracefully.
    """

    def __init__(
        self,
        sessions: RabbitSessions[Any],
        name: str,
        key: str,
        deliver: SessionDeliver,
        waiting: int,
    ) -> None:
        self._sessions = sessions
        self._settings = sessions.settings
        # The queue's names: the session's, then any replacement (restore).
        self._names = [name]
        self._keys = {key}
        self._deliver: SessionDeliver | None = deliver
        self._waiting = waiting
        self._tags = itertools.count(1)  # of deliveries handed over
        self._over = False  # detached or ended: no connection is made again
        self._scope: anyio.CancelScope | None = None
        self._gone = anyio.Event()  # the connection task has ended

    @property
    def name(self) -> str:
        return self._names[-1]

    @property
    def waiting(self) -> int:
        return self._waiting

    async def start(self) -> None:
        raise NotImplementedError

    async def _close(self) -> None:
        raise NotImplementedError

    async def detach(self) -> None:
        """Stop and close the connection: RabbitMQ gives back every delivery not acked."""
        self._deliver = None
        if self._over:
            return
        self._over = True
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(self._settings.close_timeout):
                await self._close()
            if self._scope is not None:
                self._scope.cancel()
            await self._gone.wait()

    async def restore(self) -> None:
        """Before the session's connection is made again: its exchange, queue and bindings.

        A broker restart drops the (transient) exchange and with it the queue's
        bindings; the queue itself may have expired meanwhile. Declared again
        (idempotent), the session carries on. A queue whose cluster node is down
        cannot be declared again under its name: the session carries on live on
        a new one (its name appended to ``_names``), which a resume cannot
        find: it starts a fresh session.
        """
        address, port = self._sessions.where()
        with anyio.fail_after(self._settings.broker_timeout):
            await declare_direct_exchange(address, port=port, exchange=self._settings.exchange)
            try:
                await self._sessions.declare(self.name, self._keys)
            except QueueOutOfReach:
                self._names.append(f"{self._names[0]}.{len(self._names)}")
                await self._sessions.declare(self.name, self._keys)

    async def bind(self, key: str) -> None:
        await self._change_bindings(bind=[key])
        self._keys.add(key)

    async def unbind(self, key: str) -> None:
        self._keys.discard(key)
        await self._change_bindings(unbind=[key])

    async def _change_bindings(self, **change: list[str]) -> None:
        address, port = self._sessions.where()
        try:
            with anyio.fail_after(self._settings.broker_timeout):
                await change_bindings(
                    address, port=port, queue=self.name, exchange=self._settings.exchange, **change
                )
        except UNAVAILABLE as error:
            raise BrokerUnavailable(f"session queue {self.name!r}: {error}") from error

    async def end(self) -> None:
        """Close the connection, then delete the queue and what it holds."""
        await self.detach()
        address, port = self._sessions.where()
        with anyio.CancelScope(shield=True):
            try:
                with anyio.fail_after(self._settings.broker_timeout):
                    await delete_queues(address, port=port, queues=self._names)
            except DELETE_FAILURES as error:
                # It expires after the resume window instead.
                log_event(
                    "session_queue_not_deleted", logging.WARNING, queue=self.name, error=repr(error)
                )


Q = TypeVar("Q", bound=RabbitSessionQueue)


class RabbitSessions(Generic[Q]):
    """Every session queue this instance consumes (a :class:`triows.backend.Sessions`).

    ``where`` gives the broker node of the backend's current connection and its
    AMQP 0-9-1 port; a subclass makes its protocol's queue (:meth:`_new_queue`).
    """

    def __init__(self, settings: Settings, where: Callable[[], tuple[BrokerAddress, int]]) -> None:
        self.settings = settings
        self.where = where
        self.task_group: TaskGroup | None = None
        self.open_queues: set[Q] = set()

    async def release(self) -> None:
        """A drain: detach every session queue open here at once (each closes its connection,
        which gives back what it did not ack). Never raises."""
        async with anyio.create_task_group() as tasks:
            for queue in list(self.open_queues):
                tasks.start_soon(queue.detach)

    async def run(self) -> None:
        """The task that owns every session connection's tasks (never returns)."""
        async with anyio.create_task_group() as self.task_group:
            await anyio.sleep_forever()

    def _new_queue(self, name: str, key: str, deliver: SessionDeliver, waiting: int) -> Q:
        raise NotImplementedError

    async def declare(
        self, name: str, keys: list[str] | set[str], *, existing: bool = False
    ) -> int | None:
        """Declare and bind queue ``name`` (see :func:`declare_session_queue`)."""
        address, port = self.where()
        return await declare_session_queue(
            address,
            port=port,
            queue=name,
            arguments=session_queue_arguments(self.settings),
            exchange=self.settings.exchange,
            keys=keys,
            existing=existing,
        )

    async def open(self, name: str, key: str, deliver: SessionDeliver, *, resume: bool) -> Q | None:
        try:
            with anyio.fail_after(self.settings.broker_timeout):
                waiting = await self.declare(name, [key], existing=resume)
        except UNAVAILABLE as error:
            raise BrokerUnavailable(f"session queue {name!r} not declared: {error}") from error
        if waiting is None:
            return None
        queue = self._new_queue(name, key, deliver, waiting)
        await queue.start()
        return queue
