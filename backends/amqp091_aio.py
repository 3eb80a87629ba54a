"""Where the AMQP 0-9-1 backend crosses from Trio into aiormq's asyncio (trio-asyncio).

Every aiormq call goes through :func:`call_aio` (one crossing each), except
the two paths every message takes, which cross once per batch: publishes
(:class:`PublishBatcher` + :func:`publish_batch`) and acks (batched by the
backend's forwarder); re-binds after a reconnect are one crossing per batch
too, and so are subscription changes (:class:`BindingBatcher`, :func:`change_bindings`).

Why publishes are batched by hand: each ``channel.basic_publish`` is one
crossing from Trio into the asyncio loop (an asyncio task and a Trio wakeup)
and one socket write, and at a few hundred messages a second those dominated
the sending instance's broker-side CPU (py-spy: trio-asyncio's loop ~24 % of
the sending instance). aiormq has no batch publish, so :func:`publish_batch`
does what ``basic_publish`` does for N messages under the channel's lock — a
delivery tag and a confirmation future per message, the message id a
``basic.return`` is matched by — and hands the frames to aiormq's writer as one
payload. It relies on ``Channel``'s public attributes (``lock``,
``delivery_tag``, ``confirmations``, ``message_id_delivery_tag``,
``write_queue``), so pyproject.toml pins aiormq to 7.x. Confirms stay per
message: each message gets its own ack, return or nack. A batch is whatever
is waiting when the batcher's owner task is free: never a timer, so a lone
message goes out at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import Any

import aiormq
import aiormq.abc
import trio
import trio_asyncio
from aiormq.abc import ChannelFrame
from aiormq.exceptions import (
    AMQPChannelError,
    AMQPConnectionError,
    ChannelInvalidStateError,
    DeliveryError,
    PublishError,
)
from pamqp import commands as spec
from pamqp.header import ContentHeader

from triows.backend import BrokerUnavailable, Outcome
from triows.backends.supervisor import TRANSIENT


class AioSessionLost(ConnectionError):
    """The session's connection or channel is gone, or the broker dropped our consumer.

    Also what an aiormq operation's ``asyncio.CancelledError`` becomes: aiormq
    rejects the pending operations of a closing connection that way, and
    trio-asyncio passes it through unchanged when no Trio scope was cancelled,
    so there it means "the broker went away".
    """


SESSION_BROKEN: tuple[type[BaseException], ...] = (
    # (Besides the sockets, DNS and timeouts of backends.supervisor.TRANSIENT.)
    AioSessionLost,
    # The broker closed the connection or failed the handshake (includes
    # aiormq's ConnectionClosed family: CONNECTION_FORCED on shutdown, ...).
    AMQPConnectionError,
    # An operation on a channel whose connection already closed.
    ChannelInvalidStateError,
    # The broker closed our channel (e.g. NOT_FOUND when an operator deleted
    # the exchange): the reconnect declares and binds everything again. A
    # conflicting exchange declaration is turned into a BrokerRejected first.
    AMQPChannelError,
)
"""What ends one session but not the backend (transient; anything else propagates)."""


class AioSession:
    """One live connection with its channel, set up and consuming."""

    def __init__(
        self,
        loop: Any,
        connection: aiormq.abc.AbstractConnection,
        channel: aiormq.abc.AbstractChannel,
        queue: str,
        binding_batch: int,
    ) -> None:
        self.loop = loop
        self.connection = connection
        self.channel = channel
        self.queue = queue
        # Set when a subscription change failed: the session is rebuilt.
        self.abandoned = trio.Event()
        self.publisher = PublishBatcher()
        self.bindings = BindingBatcher(binding_batch)
        # The last delivery handed to Trio, and the last one acked.
        self.delivered_tag = 0
        self.acked_tag = 0
        self.ack_wanted = trio.Event()
        self._acking = trio.Lock()
        # With sessions: the channel their queues are consumed on, and what
        # takes its deliveries (see backends.amqp091_sessions).
        self.sessions_channel: aiormq.abc.AbstractChannel | None = None
        # Set once a drain closed the sessions channel on purpose.
        self.sessions_released = False
        # Where a resume looks for its session's queue (see backends.amqp091_sessions).
        self.probe_channel: aiormq.abc.AbstractChannel | None = None
        self.on_session_delivery: Callable[[aiormq.abc.DeliveredMessage], None] | None = None

    async def call(
        self, operation: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any
    ) -> Any:
        """Await an aiormq operation from Trio."""
        return await call_aio(self.loop, operation, *args, **kwargs)

    async def publish(self, key: str, body: bytes, exchange: str | None = None) -> Outcome:
        """Publish in the next batch and wait for the broker's confirm: the one place a
        publish crosses (see :meth:`run_publisher`). ``exchange`` None: the session's."""
        return await self.publisher.publish(key, body, exchange)

    async def run_publisher(self, exchange: str, timeout: float) -> None:
        """Send the waiting publishes, one crossing per batch, until cancelled."""

        async def send(
            keys: list[str], bodies: list[bytes], exchanges: list[str | None]
        ) -> list[BatchResult]:
            targets = [exchange if other is None else other for other in exchanges]
            try:
                results: list[BatchResult] = await self.call(
                    publish_batch, self.channel, targets, keys, bodies, timeout
                )
            except SESSION_BROKEN as error:
                return [f"lost the AMQP broker: {error!r}"] * len(keys)
            return results

        await self.publisher.run(send)

    async def run_binding_changes(self, target: BindingTarget, timeout: float) -> None:
        """Send the queued binding changes, one crossing per batch, until cancelled or
        a batch fails (which drops the session). ``target(key)``: the queue and exchange."""

        async def send(changes: list[BindingChange]) -> None:
            await self.call(change_bindings, self.channel, target, changes)

        await self.bindings.run(send, timeout)
        # It returns once a batch failed: what the channel holds (and which
        # answers are still on their way) is unknown, so the session is rebuilt.
        self.abandoned.set()

    async def ack(self) -> None:
        """Ack every delivery handed to Trio so far (``multiple``), unless done already.

        One ack at a time: each returns once its frame is in aiormq's write
        queue, so the broker gets them in the order of their tags. Two at once
        could swap there (a put waiting for room in the full queue is woken,
        and a put that just arrived takes the room first), and an ack of a tag
        a later ``multiple`` ack already settled is an unknown delivery tag to
        the broker: it closes the channel.
        """
        async with self._acking:
            tag = self.delivered_tag
            if tag <= self.acked_tag:
                return
            self.acked_tag = tag
            # If the connection is gone, so is the queue: nothing to ack.
            with suppress(*SESSION_BROKEN):
                await self.call(self.channel.basic_ack, tag, multiple=True, wait=False)


def frame_out_of_order(error: BaseException) -> bool:
    """Whether ``error`` is aiormq's channel reader meeting a frame out of place.

    aiormq 7's ``Channel`` raises a bare ``ValueError("Unexpected frame ...")``
    when the frame after a ``basic.deliver`` or ``basic.return`` is not its
    content header or body (``__get_content_header``/``__get_content_frame``),
    then closes the channel with that error: its ``closing`` future and every
    pending operation fail with it. GarageMQ does this after a half-open cut
    heals (bench/results/faults.md). The channel is unusable but nothing is
    wrong with us: a lost session, rebuilt like any other. Only that message
    counts; any other ValueError is still a bug that propagates.
    """
    return (
        isinstance(error, ValueError)
        and bool(error.args)
        and isinstance(error.args[0], str)
        and error.args[0].startswith("Unexpected frame ")
    )


async def call_aio(
    loop: Any, operation: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any
) -> Any:
    try:
        return await trio_asyncio.aio_as_trio(operation, loop=loop)(*args, **kwargs)
    except asyncio.CancelledError as error:
        raise AioSessionLost("the broker connection closed during the operation") from error
    except ValueError as error:
        if frame_out_of_order(error):
            raise AioSessionLost(f"the broker sent a frame out of order: {error!r}") from error
        raise


BindingTarget = Callable[[str], tuple[str, str]]
"""The queue and the exchange a key is bound to / unbound from."""


async def change_bindings(
    channel: aiormq.abc.AbstractChannel, target: BindingTarget, changes: list[BindingChange]
) -> None:
    """(asyncio side) Apply ``changes`` in order, written at once, and wait for the last answer.

    aiormq's ``queue_bind``/``queue_unbind`` hold the channel's lock from the
    request to its answer, so one at a time reaches the broker. Here the whole
    batch goes out in one write under that lock, the way ``rpc`` sends one
    method: every bind but a last one with ``nowait``, every unbind answered
    (``queue.unbind`` has no ``nowait``). The broker handles a channel's
    methods in order, so the last answer means the whole batch is in place. A
    method the broker refuses closes the channel; this task belongs to the
    channel (``create_task``), so that fails it too.
    """
    if not changes:
        return
    state: Any = channel
    frames: list[Any] = []
    answers = 0
    for index, change in enumerate(changes):
        queue, exchange = target(change.key)
        if change.bind:
            nowait = index < len(changes) - 1
            answers += 0 if nowait else 1
            frames.append(
                spec.Queue.Bind(
                    queue=queue, exchange=exchange, routing_key=change.key, nowait=nowait
                )
            )
        else:
            answers += 1
            frames.append(spec.Queue.Unbind(queue=queue, exchange=exchange, routing_key=change.key))

    async def send_and_wait() -> None:
        async with state.lock:
            await state.write_queue.put(
                ChannelFrame.marshall(channel_number=state.number, frames=frames)
            )
            for _ in range(answers):
                answer = await state.rpc_frames.get()
                state.rpc_frames.task_done()
                if not isinstance(answer, spec.Queue.BindOk | spec.Queue.UnbindOk):
                    raise AioSessionLost(f"unexpected answer to a binding change: {answer!r}")

    await state.create_task(send_and_wait())


class BindingChange:
    """One ``queue.bind`` (``bind``) or ``queue.unbind`` of ``key``; ``done`` once answered."""

    __slots__ = ("bind", "done", "error", "key")

    def __init__(self, bind: bool, key: str) -> None:
        self.bind = bind
        self.key = key
        self.done = trio.Event()
        self.error: BaseException | None = None

    async def wait(self) -> None:
        """Return once the broker confirmed the change; raise why it did not."""
        await self.done.wait()
        if self.error is not None:
            raise self.error

    def fail(self, error: BaseException) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()


SendBindings = Callable[[list[BindingChange]], Awaitable[None]]


class BindingBatcher:
    """Collects the binding changes of one session into ordered batches for one owner task.

    Changes reach the broker in the order :meth:`enqueue` was called, whoever
    called it, so a key's bind and unbind (and a reconnect's restore followed
    by a change of one of its keys) never overtake each other. A change waits
    for one batch at most, however many other keys are changing: the batch in
    flight when it came, then its own. A caller that stops waiting does not
    take its change back (it goes out all the same), so what the broker holds
    is always what was asked for last.
    """

    def __init__(self, batch_size: int) -> None:
        self._batch_size = batch_size
        self._waiting: list[BindingChange] = []
        self._wakeup = trio.Event()
        self._failed: BaseException | None = None

    def enqueue(self, bind: bool, key: str) -> BindingChange:
        """Queue a change of ``key`` behind every change queued before (no await)."""
        change = BindingChange(bind, key)
        if self._failed is not None:
            change.fail(self._failed)
        else:
            self._waiting.append(change)
            self._wakeup.set()
        return change

    async def run(self, send: SendBindings, timeout: float) -> None:
        """Send the waiting changes, ``batch_size`` per ``send`` and per ``timeout``.

        Once a batch fails, it and every change after it fail with that error
        (the channel's state is unknown: the session is rebuilt). On
        cancellation (the session ended) every waiting change fails.
        """
        batch: list[BindingChange] = []
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                while self._waiting:
                    batch = self._waiting[: self._batch_size]
                    del self._waiting[: self._batch_size]
                    try:
                        with trio.move_on_after(timeout) as late:
                            await send(batch)
                    except SESSION_BROKEN as error:
                        self._stop(batch, error)
                        return
                    if late.cancelled_caught:
                        self._stop(
                            batch, TimeoutError(f"no answer to a binding change in {timeout}s")
                        )
                        return
                    for change in batch:
                        change.done.set()
        finally:
            # Those of the batch out now too (``fail`` skips those answered).
            self._stop(batch, AioSessionLost("the broker session ended"))

    def _stop(self, batch: list[BindingChange], error: BaseException) -> None:
        if self._failed is None:
            self._failed = error
        for change in (*batch, *self._waiting):
            change.fail(error)
        self._waiting.clear()


async def closed(closable: aiormq.abc.AbstractConnection | aiormq.abc.AbstractChannel) -> None:
    # ``closing`` is a fresh observer future that aiormq resolves (with the
    # reason as its exception, for a loss) when the connection or channel
    # closes; cancelling the observer does not close anything.
    await closable.closing


async def close_connection(
    loop: Any, connection: aiormq.abc.AbstractConnection, grace: float
) -> None:
    # Shielded: this also runs while the backend is being cancelled, and the
    # broker should see a clean close.
    with (
        trio.CancelScope(shield=True),
        trio.move_on_after(grace),
        suppress(*TRANSIENT, *SESSION_BROKEN),
    ):
        await call_aio(loop, connection.close)


BatchResult = Outcome | str
"""Per message: the outcome, or why the broker did not take it."""


class _Batch:
    """Messages that go to the broker together; ``results`` is set before ``sent``."""

    __slots__ = ("bodies", "exchanges", "keys", "results", "sent")

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.bodies: list[bytes] = []
        self.exchanges: list[str | None] = []
        self.results: list[BatchResult] = []
        self.sent = trio.Event()


SendBatch = Callable[[list[str], list[bytes], list[str | None]], Awaitable[list[BatchResult]]]


class PublishBatcher:
    """Collects concurrent publishes into batches for one owner task to send."""

    def __init__(self) -> None:
        self._waiting = _Batch()
        self._wakeup = trio.Event()

    async def publish(self, key: str, body: bytes, exchange: str | None = None) -> Outcome:
        """Queue ``body`` for ``key``, wait for the broker's answer to it, return the outcome.

        ``exchange`` None: the one the sender publishes to.
        """
        batch = self._waiting
        index = len(batch.keys)
        batch.keys.append(key)
        batch.bodies.append(body)
        batch.exchanges.append(exchange)
        self._wakeup.set()
        await batch.sent.wait()
        result = batch.results[index]
        if isinstance(result, str):
            raise BrokerUnavailable(result)
        return result

    async def run(self, send: SendBatch, *, lost: str = "lost the AMQP broker") -> None:
        """Send batches with ``send`` until cancelled; a batch per task, so they overlap.

        On cancellation every waiting publisher gets :class:`BrokerUnavailable`.
        """
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    await self._wakeup.wait()
                    self._wakeup = trio.Event()
                    batch, self._waiting = self._waiting, _Batch()
                    nursery.start_soon(self._send, send, batch, lost)
        finally:
            self._fail(self._waiting, lost)

    async def _send(self, send: SendBatch, batch: _Batch, lost: str) -> None:
        try:
            batch.results = await send(batch.keys, batch.bodies, batch.exchanges)
        finally:
            self._fail(batch, lost)

    @staticmethod
    def _fail(batch: _Batch, reason: str) -> None:
        if not batch.sent.is_set():
            if len(batch.results) != len(batch.keys):
                batch.results = [reason] * len(batch.keys)
            batch.sent.set()


async def publish_batch(
    channel: aiormq.abc.AbstractChannel,
    exchanges: list[str],
    keys: list[str],
    bodies: list[bytes],
    timeout: float,
) -> list[BatchResult]:
    """(asyncio side) Publish ``bodies`` with ``mandatory`` in one write; wait for each confirm.

    A message without an answer within ``timeout`` seconds is reported as not
    taken. The time counts from the call: also waiting for the channel's lock
    (held by a channel method until the broker answers it, which a broker under
    a resource alarm, ``connection.blocked``, never does) and for room in
    aiormq's write queue.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        async with asyncio.timeout_at(deadline):
            confirmations = await _write_batch(channel, exchanges, keys, bodies)
    except TimeoutError:
        return [_late(timeout)] * len(keys)  # nothing of it reached the writer
    await asyncio.wait(confirmations, timeout=max(0.0, deadline - loop.time()))
    return [_result(confirmation, timeout) for confirmation in confirmations]


async def _write_batch(
    channel: aiormq.abc.AbstractChannel,
    exchanges: list[str],
    keys: list[str],
    bodies: list[bytes],
) -> list[asyncio.Future[object]]:
    """Hand the batch's frames to aiormq's writer; return each message's confirmation.

    Cancelled before that, nothing of the batch stays on the channel.
    """
    # aiormq.Channel's attributes that basic_publish uses (not on AbstractChannel).
    state: Any = channel
    confirmations: list[asyncio.Future[object]] = []
    frames: list[Any] = []
    async with state.lock:
        for exchange, key, body in zip(exchanges, keys, bodies, strict=True):
            state.delivery_tag += 1
            tag: int = state.delivery_tag
            message_id = str(tag)
            confirmation: asyncio.Future[object] = state.create_future()
            state.confirmations[tag] = confirmation
            state.message_id_delivery_tag[message_id] = tag
            confirmation.add_done_callback(_forget(state, message_id, tag))
            confirmations.append(confirmation)
            frames.append(spec.Basic.Publish(exchange=exchange, routing_key=key, mandatory=True))
            frames.append(
                ContentHeader(
                    properties=spec.Basic.Properties(delivery_mode=1, message_id=message_id),
                    body_size=len(body),
                )
            )
            frames.extend(state._split_body(body))
        try:
            await state.write_queue.put(
                ChannelFrame.marshall(channel_number=state.number, frames=frames)
            )
        except BaseException:
            # The broker never sees these delivery tags: give them back while
            # the lock is still held (as aiormq's basic_publish does).
            state.delivery_tag -= len(confirmations)
            for tag in range(state.delivery_tag + 1, state.delivery_tag + 1 + len(confirmations)):
                state.confirmations.pop(tag, None)
            for confirmation in confirmations:
                confirmation.cancel()
            raise
    return confirmations


def _forget(state: Any, message_id: str, tag: int) -> Callable[[asyncio.Future[object]], None]:
    def forget(_: asyncio.Future[object]) -> None:
        ids = state.message_id_delivery_tag
        if ids.get(message_id) == tag:
            del ids[message_id]

    return forget


def _late(timeout: float) -> str:
    return f"no confirm from the broker within {timeout}s"


def _result(confirmation: asyncio.Future[object], timeout: float) -> BatchResult:
    if not confirmation.done():
        confirmation.cancel()
        return _late(timeout)
    if confirmation.cancelled():
        return "the broker connection closed before the confirm"
    error = confirmation.exception()
    if error is None:
        return Outcome.ROUTED
    if isinstance(error, PublishError):
        return Outcome.UNROUTED
    if isinstance(error, DeliveryError):
        # A nack: with sessions, a session queue over its bound (reject-publish).
        return Outcome.FULL
    return f"lost the AMQP broker: {error!r}"
