"""What is specific to the AMQP 0-9-1 backend, against the real RabbitMQ on 127.0.0.1:5672.

The behaviour every backend shares is tests/test_backend_contract.py's. Each
test uses its own exchange, so tests running at the same time never see each
other's bindings.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from functools import partial
from typing import Any

import aiormq
import pytest
import trio
import trio.lowlevel
import trio_asyncio
from pamqp import commands as spec

import triows.backends.amqp091
from deploy.brokers import BROKERS
from tests.brokers import broker_outage, require_broker
from tests.tcp_proxy import open_tcp_proxy, reachable
from tests.test_backend_contract import open_ready, receive, wait_not_ready
from triows.backend import BrokerUnavailable, Outcome
from triows.backends.amqp091 import Amqp091Backend, open_amqp091_backend
from triows.backends.amqp091_aio import AioSessionLost, call_aio
from triows.process import free_port
from triows.settings import Settings

pytestmark = pytest.mark.broker

RABBITMQ_PORT = BROKERS["rabbitmq"].port
GARAGEMQ_PORT = BROKERS["garagemq"].port
RABBITMQ_URL = BROKERS["rabbitmq"].url
POLL_INTERVAL = 0.05
# Hang guards only; no test asserts on how long something took.
READY_TIMEOUT = 30
OUTAGE_TIMEOUT = 300


@pytest.fixture(autouse=True)
async def rabbitmq() -> None:
    await require_broker("rabbitmq")


def amqp_settings(exchange: str, *, port: int = RABBITMQ_PORT, **overrides: Any) -> Settings:
    return Settings(
        backend="amqp091",
        broker_url=f"amqp://guest:guest@127.0.0.1:{port}/",
        exchange=exchange,
        instance_id=f"test-{secrets.token_hex(4)}",
        **{"resume_window": 0, **overrides},  # the key contract; sessions: test_session_queues
    )


@asynccontextmanager
async def open_instances(exchange: str, count: int) -> AsyncIterator[list[Amqp091Backend]]:
    async with AsyncExitStack() as stack:
        backends = [
            await stack.enter_async_context(open_amqp091_backend(amqp_settings(exchange)))
            for _ in range(count)
        ]
        for backend in backends:
            with trio.fail_after(READY_TIMEOUT):
                await backend.wait_ready()
        yield backends


async def test_a_broker_closing_the_socket_during_the_handshake_is_retried(
    exchange: str,
) -> None:
    # Like a broker that is shutting down: it accepts the TCP connection and
    # closes it at once. aiormq then fails the handshake in more than one way
    # (AMQPConnectionError, or StopAsyncIteration when the close is already
    # read), each of which must be retried, not crash the backend.
    attempts = 0
    enough_attempts = trio.Event()

    async def close_at_once(stream: trio.SocketStream) -> None:
        nonlocal attempts
        await stream.aclose()
        attempts += 1
        if attempts == 20:
            enough_attempts.set()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, close_at_once, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        settings = amqp_settings(exchange, port=port, reconnect_max_delay=0.05)
        async with open_amqp091_backend(settings) as backend:
            with trio.fail_after(READY_TIMEOUT):
                await enough_attempts.wait()
            assert not backend.ready
            with pytest.raises(BrokerUnavailable):
                await backend.publish("user.Bob", b"{}")
        nursery.cancel_scope.cancel()


async def test_sends_with_sessions_cut_off_by_a_lost_connection_are_broker_unavailable(
    exchange: str,
) -> None:
    """With sessions a send to a user is two publishes at once, the message and its probe:
    when the connection is lost under them, the caller is told BrokerUnavailable (a /send:
    503), not both failures in a group (which a /send answered 500)."""
    port = free_port()
    settings = amqp_settings(exchange, port=port, resume_window=30, reconnect_max_delay=0.05)
    cut = trio.Event()

    async def keep_sending() -> None:
        # Twenty of these: some are on the connection when it goes (an outcome
        # or BrokerUnavailable is fine; a group escaping fails the test).
        while not cut.is_set():
            with suppress(BrokerUnavailable):
                await backend.publish("user.Bob", b"{}")

    async with open_tcp_proxy(RABBITMQ_PORT, port=port) as proxy:
        async with open_amqp091_backend(settings) as backend:
            with trio.fail_after(READY_TIMEOUT):
                await backend.wait_ready()
            async with trio.open_nursery() as nursery:
                for _ in range(20):
                    nursery.start_soon(keep_sending)
                await trio.sleep(0.5)
                proxy.cut()
                cut.set()
            with trio.fail_after(READY_TIMEOUT):
                # And it carries on, on a new connection (closed only then: a
                # close racing the loss is not what this is about).
                while not proxy.connections:  # noqa: ASYNC110
                    await trio.sleep(POLL_INTERVAL)
                await backend.wait_ready()


async def publish_until_routed(backend: Amqp091Backend, key: str, body: bytes) -> None:
    """Publish until the broker routes it (after a repair that takes some reconnects)."""
    with trio.fail_after(READY_TIMEOUT):
        while True:
            try:
                if await backend.publish(key, body) == Outcome.ROUTED:
                    return
            except BrokerUnavailable:
                pass
            await trio.sleep(POLL_INTERVAL)


async def test_publishing_into_a_deleted_exchange_repairs_the_backend(exchange: str) -> None:
    async with open_instances(exchange, 1) as (backend,):
        await backend.subscribe("user.Bob")
        await operator_call("exchange_delete", exchange=exchange)

        # The broker closes the channel of a publish into a missing exchange
        # (NOT_FOUND): that publish is BrokerUnavailable, not a crash, and the
        # backend reconnects, declares the exchange and binds its keys again.
        with pytest.raises(BrokerUnavailable):
            await backend.publish("user.Bob", b"lost")
        await publish_until_routed(backend, "user.Bob", b"again")
        with trio.fail_after(READY_TIMEOUT):
            assert await backend.incoming.receive() == ("user.Bob", b"again")


async def test_a_deleted_queue_is_declared_again_with_every_binding(exchange: str) -> None:
    async with open_instances(exchange, 2) as (sender, holder):
        await holder.subscribe("user.Bob")
        await trio.run_process(["rabbitmqctl", "delete_queue", holder.queue], capture_stdout=True)

        # The broker cancels the holder's consumer; the holder reconnects.
        await publish_until_routed(sender, "user.Bob", b"again")
        with trio.fail_after(READY_TIMEOUT):
            assert await holder.incoming.receive() == ("user.Bob", b"again")


async def test_aiormqs_frame_out_of_order_error_is_a_lost_session() -> None:
    # What a channel's waiters get when its reader met a frame out of place
    # (aiormq 7 channel.py); only that ValueError, no other.
    async def fail(error: BaseException) -> None:
        raise error

    frame = spec.Basic.Deliver("none", 1, False, "x", "user.Bob")
    async with trio_asyncio.open_loop() as loop:
        with pytest.raises(AioSessionLost):
            await call_aio(loop, fail, ValueError(f"Unexpected frame {frame!r}", frame))
        with pytest.raises(ValueError, match="too long"):
            await call_aio(loop, fail, ValueError("Routing key too long (max 255 bytes)"))


async def test_a_frame_out_of_order_is_a_lost_session_not_a_dead_backend(exchange: str) -> None:
    # GarageMQ, after a half-open cut heals, sends a basic.deliver where the
    # previous one's content header belongs; aiormq's channel reader then
    # closes the channel with a bare ValueError("Unexpected frame ...")
    # (bench/results/faults.md). Handed the same frames here, on RabbitMQ.
    async with open_instances(exchange, 1) as (backend,):
        await backend.subscribe("user.Bob")
        session = backend._following
        assert session is not None
        channel = session.channel
        deliver = spec.Basic.Deliver("none", 1, False, exchange, "user.Bob")

        async def hand_to_reader() -> None:
            channel.frames.put_nowait((0, deliver))
            channel.frames.put_nowait((0, deliver))

        await session.call(hand_to_reader)
        # The backend rebuilds its session (a new channel) and carries messages again.
        await publish_until_routed(backend, "user.Bob", b"again")
        with trio.fail_after(READY_TIMEOUT):
            assert await backend.incoming.receive() == ("user.Bob", b"again")
        assert channel.is_closed
        assert backend._following is not session


async def test_rabbitmq_restart_makes_backend_unavailable_then_restores_it(
    exchange: str,
) -> None:
    async with open_instances(exchange, 2) as (sender, holder):
        await holder.subscribe("user.Bob")

        with trio.fail_after(OUTAGE_TIMEOUT):
            async with broker_outage("rabbitmq"):
                await holder.wait_not_ready()
                await sender.wait_not_ready()
                with pytest.raises(BrokerUnavailable):
                    await sender.publish("user.Bob", b"{}")
                await holder.subscribe("user.Dana")
            await sender.wait_ready()
            await holder.wait_ready()

        assert await sender.publish("user.Bob", b"after") == Outcome.ROUTED
        assert await sender.publish("user.Dana", b"too") == Outcome.ROUTED
        with trio.fail_after(READY_TIMEOUT):
            assert await holder.incoming.receive() == ("user.Bob", b"after")
            assert await holder.incoming.receive() == ("user.Dana", b"too")


async def test_closing_the_backend_deletes_its_queue(exchange: str) -> None:
    async with open_instances(exchange, 1) as (sender,):
        async with open_ready(amqp_settings(exchange)) as holder:
            await holder.subscribe("user.Bob")
            assert await sender.publish("user.Bob", b"1") == Outcome.ROUTED
        # The queue outlives a lost connection, not a close: it and its
        # bindings are gone at once.
        assert await sender.publish("user.Bob", b"2") == Outcome.UNROUTED


@asynccontextmanager
async def open_holder_behind_a_proxy(exchange: str) -> AsyncIterator[tuple[Amqp091Backend, int]]:
    """A backend whose broker connection goes through a proxy on the returned port."""
    port = free_port()
    settings = amqp_settings(exchange, port=port, reconnect_max_delay=0.05)
    async with open_amqp091_backend(settings) as holder:
        yield holder, port


async def test_what_the_broker_confirmed_while_the_connection_was_lost_arrives_after(
    exchange: str,
) -> None:
    async with (
        open_instances(exchange, 1) as (sender,),
        open_holder_behind_a_proxy(exchange) as (holder, port),
    ):
        async with reachable(holder, RABBITMQ_PORT, port):
            await holder.subscribe("user.Bob")
            assert await sender.publish("user.Bob", b"1") == Outcome.ROUTED
            assert await receive(holder) == ("user.Bob", b"1")
        # The connection dropped and reconnects are refused meanwhile; the
        # queue and its binding outlive it, so the broker confirms and keeps.
        await wait_not_ready(holder)
        assert await sender.publish("user.Bob", b"2") == Outcome.ROUTED
        assert await sender.publish("user.Bob", b"3") == Outcome.ROUTED
        async with reachable(holder, RABBITMQ_PORT, port):
            assert [await receive(holder), await receive(holder)] == [
                ("user.Bob", b"2"),
                ("user.Bob", b"3"),
            ]


async def test_a_delivery_whose_ack_died_with_the_connection_is_not_handed_over_twice(
    exchange: str,
) -> None:
    async def ack_lost() -> None:
        pass

    async with (
        open_instances(exchange, 1) as (sender,),
        open_holder_behind_a_proxy(exchange) as (holder, port),
    ):
        async with reachable(holder, RABBITMQ_PORT, port):
            await holder.subscribe("user.Bob")
            session = holder._following
            assert session is not None
            # As if the connection died before the ack reached the broker.
            session.ack = ack_lost  # type: ignore[method-assign]
            assert await sender.publish("user.Bob", b"1") == Outcome.ROUTED
            assert await receive(holder) == ("user.Bob", b"1")
        await wait_not_ready(holder)
        async with reachable(holder, RABBITMQ_PORT, port):
            # The broker redelivers "1" (never acked) to the new connection:
            # it was handed over already, so the next message is the next one.
            for body in (b"2", b"3"):
                assert await sender.publish("user.Bob", body) == Outcome.ROUTED
                assert await receive(holder) == ("user.Bob", body)


class Rejections(logging.Handler):
    """Collects the fields of every ``broker_rejected`` event."""

    def __init__(self) -> None:
        super().__init__()
        self.fields: list[dict[str, object]] = []
        self.seen = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "broker_rejected":
            self.fields.append(getattr(record, "fields", {}))
            self.seen.set()


@pytest.fixture
def rejections() -> Iterator[Rejections]:
    handler = Rejections()
    logger = logging.getLogger("triows")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


async def operator_call(method: str, *args: object, **kwargs: object) -> None:
    """One exchange operation as an operator would do it, on its own connection."""
    async with trio_asyncio.open_loop():
        operator = await trio_asyncio.aio_as_trio(aiormq.connect)(RABBITMQ_URL)
        channel = await trio_asyncio.aio_as_trio(operator.channel)()
        await trio_asyncio.aio_as_trio(getattr(channel, method))(*args, **kwargs)
        await trio_asyncio.aio_as_trio(operator.close)()


async def test_an_exchange_of_another_type_is_reported_once_and_retried_until_it_is_gone(
    exchange: str, rejections: Rejections
) -> None:
    # PRECONDITION_FAILED used to end the backend's task for
    # good (a live process with a dead backend).
    await operator_call("exchange_declare", exchange=exchange, exchange_type="fanout")
    settings = amqp_settings(exchange, reconnect_max_delay=0.05)
    async with open_amqp091_backend(settings) as backend:
        with trio.fail_after(READY_TIMEOUT):
            await rejections.seen.wait()
        # Several retries later: still alive, not ready, and reported once.
        for _ in range(5):
            await trio.sleep(settings.reconnect_max_delay)
        assert not backend.ready
        assert len(rejections.fields) == 1
        fields = rejections.fields[0]
        assert (fields["kind"], fields["exchange"]) == ("configuration", exchange)
        assert (fields["wanted_type"], fields["current_type"]) == ("direct", "fanout")

        await backend.subscribe("user.Bob")
        await operator_call("exchange_delete", exchange)
        with trio.fail_after(READY_TIMEOUT):
            await backend.wait_ready()
        assert await backend.publish("user.Bob", b"at last") == Outcome.ROUTED
        with trio.fail_after(READY_TIMEOUT):
            assert await backend.incoming.receive() == ("user.Bob", b"at last")


# Connections lost, each after a key was held on it and released while down.
RECONNECT_CYCLES = 20


async def test_keys_released_while_down_are_forgotten_where_each_connection_has_a_new_queue(
    exchange: str,
) -> None:
    # GarageMQ: the queue goes with its connection, and the next connection
    # declares one of another name, with no binding. What the backend counts
    # as possibly bound must start over with it, or it grows by every key
    # released while the connection was down.
    await require_broker("garagemq")
    port = free_port()
    settings = amqp_settings(exchange, port=port, reconnect_max_delay=0.05)
    async with open_amqp091_backend(settings) as holder:
        for cycle in range(RECONNECT_CYCLES):
            async with reachable(holder, GARAGEMQ_PORT, port):
                await holder.subscribe(f"user.u{cycle}")
            await wait_not_ready(holder)
            await holder.unsubscribe(f"user.u{cycle}")
        async with reachable(holder, GARAGEMQ_PORT, port):
            await holder.subscribe("user.kept")
            assert holder._maybe_bound == {"user.kept"}


async def test_two_acks_at_once_reach_aiormq_one_after_the_other(
    exchange: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Acks with ``multiple`` must reach the broker in the order of their tags.

    Two tasks ack (the forwarder every half prefetch, the timer every
    ACK_INTERVAL). Each ack returns once aiormq has put its frame in the
    connection's write queue (``wait=False``), and the writer sends that queue
    in order. But asyncio's ``Queue.put`` only waits while the queue is full:
    when the writer takes a frame from a full queue it wakes the oldest waiting
    put, and a put that starts before that one runs takes the free slot first.
    So with the queue full (ten frames: a burst of publish batches), an ack of
    tag 20 can overtake one of tag 10; the broker, which settled 10 with 20,
    answers the late ``ack 10`` with PRECONDITION_FAILED (unknown delivery tag)
    and closes the channel. Hence acks cross one at a time: the second starts
    once the first's frame is in the queue. What is checked here: the crossings
    of two acks started together never overlap.
    """
    # Only this test's acks: no timer, no batch ack.
    monkeypatch.setattr(triows.backends.amqp091, "ACK_INTERVAL", 3600.0)
    async with open_ready(amqp_settings(exchange, prefetch=100)) as backend:
        assert isinstance(backend, Amqp091Backend)
        session = backend._following
        assert session is not None
        await backend.subscribe("user.bob")
        for body in (b"1", b"2"):
            await backend.publish("user.bob", body)
            await receive(backend)
        first, second = session.delivered_tag - 1, session.delivered_tag
        crossing, most_crossing = 0, 0
        call = session.call

        async def counted_call(operation: Any, *args: Any, **kwargs: Any) -> Any:
            nonlocal crossing, most_crossing
            crossing += 1
            most_crossing = max(most_crossing, crossing)
            try:
                return await call(operation, *args, **kwargs)
            finally:
                crossing -= 1

        monkeypatch.setattr(session, "call", counted_call)
        async with trio.open_nursery() as nursery:
            session.delivered_tag = first  # as when the first delivery was handed over
            nursery.start_soon(session.ack)
            while session.acked_tag != first:
                await trio.lowlevel.checkpoint()
            session.delivered_tag = second
            nursery.start_soon(session.ack)
        assert (most_crossing, session.acked_tag) == (1, second)
        # The channel is still open: the broker took both acks.
        await backend.publish("user.bob", b"3")
        assert await receive(backend) == ("user.bob", b"3")
