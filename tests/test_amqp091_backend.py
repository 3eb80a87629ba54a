"""The AMQP 0-9-1 backend against the real RabbitMQ on 127.0.0.1:5672.

Each test uses its own exchange, so tests running at the same time (here or in
other engineers' suites) never see each other's bindings.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from typing import Any

import aiormq
import pytest
import trio
import trio_asyncio

from backends.amqp091 import Amqp091Backend, open_amqp091_backend
from tests.brokers import broker_outage, require_broker
from tests.ready_backends import open_ready_backend
from tests.tcp_proxy import open_tcp_proxy
from triows.backend import BrokerUnavailable, Outcome
from triows.process import free_port
from triows.settings import Settings

pytestmark = pytest.mark.broker

RABBITMQ_PORT = 5672
RABBITMQ_URL = f"amqp://guest:guest@127.0.0.1:{RABBITMQ_PORT}/"
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
        **overrides,
    )


@asynccontextmanager
async def open_instances(exchange: str, count: int) -> AsyncIterator[list[Amqp091Backend]]:
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(open_ready_backend(amqp_settings(exchange)))
            for _ in range(count)
        ]


async def test_publish_to_a_key_held_elsewhere_is_routed_and_delivered_verbatim(
    exchange: str,
) -> None:
    async with open_instances(exchange, 2) as (anne_side, bob_side):
        await bob_side.subscribe("user.Bob")
        body = b'{"type":"message","message":{"text":"hi \xc3\xa9"}}'

        assert await anne_side.publish("user.Bob", body) == Outcome.ROUTED
        with trio.fail_after(READY_TIMEOUT):
            assert await bob_side.incoming.receive() == ("user.Bob", body)


async def test_publish_to_a_key_nobody_holds_is_unrouted(exchange: str) -> None:
    async with open_instances(exchange, 1) as (backend,):
        assert await backend.publish("user.Carol", b"{}") == Outcome.UNROUTED


async def test_bindings_follow_subscribe_and_unsubscribe(exchange: str) -> None:
    async with open_instances(exchange, 2) as (sender, holder):
        await holder.subscribe("user.Carol")
        assert await sender.publish("user.Carol", b"1") == Outcome.ROUTED

        await holder.unsubscribe("user.Carol")
        assert await sender.publish("user.Carol", b"2") == Outcome.UNROUTED

        with trio.fail_after(READY_TIMEOUT):
            assert await holder.incoming.receive() == ("user.Carol", b"1")


async def test_each_instance_holding_a_key_receives_each_message_once(exchange: str) -> None:
    async with open_instances(exchange, 3) as (sender, first, second):
        await first.subscribe("user.Bob")
        await second.subscribe("user.Bob")

        for n in range(3):
            assert await sender.publish("user.Bob", b"%d" % n) == Outcome.ROUTED
        await sender.subscribe("user.end")
        await first.subscribe("user.end")
        await second.subscribe("user.end")
        # A marker after the messages: anything duplicated would arrive before it.
        assert await sender.publish("user.end", b"end") == Outcome.ROUTED

        with trio.fail_after(READY_TIMEOUT):
            for holder in (first, second):
                received = [await holder.incoming.receive() for _ in range(4)]
                assert received == [
                    ("user.Bob", b"0"),
                    ("user.Bob", b"1"),
                    ("user.Bob", b"2"),
                    ("user.end", b"end"),
                ]


async def test_2000_messages_arrive_complete_in_order_through_small_buffers(
    exchange: str,
) -> None:
    # Small prefetch and incoming bounds so that the consumer's backpressure
    # (ack only after handing over) is exercised, not just the happy path.
    count = 2000
    async with (
        open_ready_backend(amqp_settings(exchange)) as sender,
        open_ready_backend(amqp_settings(exchange, prefetch=8, incoming_queue=4)) as receiver,
    ):
        await receiver.subscribe("user.Bob")
        received: list[bytes] = []

        async def receive_all() -> None:
            while len(received) < count:
                key, body = await receiver.incoming.receive()
                assert key == "user.Bob"
                received.append(body)

        with trio.fail_after(OUTAGE_TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(receive_all)
                for n in range(count):
                    assert await sender.publish("user.Bob", b"%d" % n) == Outcome.ROUTED

        assert received == [b"%d" % n for n in range(count)]


async def test_broker_unreachable_at_open_then_ready_when_it_appears(exchange: str) -> None:
    port = free_port()
    async with open_amqp091_backend(
        amqp_settings(exchange, port=port, reconnect_max_delay=0.5)
    ) as backend:
        assert not backend.ready
        with pytest.raises(BrokerUnavailable):
            await backend.publish("user.Bob", b"{}")
        # Held while down, bound once connected.
        await backend.subscribe("user.Bob")

        async with open_tcp_proxy(RABBITMQ_PORT, port=port):
            with trio.fail_after(READY_TIMEOUT):
                await backend.wait_ready()
            assert await backend.publish("user.Bob", b"hello") == Outcome.ROUTED
            with trio.fail_after(READY_TIMEOUT):
                assert await backend.incoming.receive() == ("user.Bob", b"hello")


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


async def test_dropped_connection_reconnects_and_restores_subscriptions(exchange: str) -> None:
    async with (
        open_tcp_proxy(RABBITMQ_PORT) as proxy,
        open_ready_backend(amqp_settings(exchange)) as sender,
        open_ready_backend(
            amqp_settings(exchange, port=proxy.port, reconnect_max_delay=0.5)
        ) as holder,
    ):
        await holder.subscribe("user.Bob")
        await holder.subscribe("user.Gone")

        proxy.cut()
        with trio.fail_after(READY_TIMEOUT):
            await holder.wait_ready(False)
        with pytest.raises(BrokerUnavailable):
            await holder.publish("user.Bob", b"{}")
        await holder.unsubscribe("user.Gone")
        await holder.subscribe("user.New")

        with trio.fail_after(READY_TIMEOUT):
            await holder.wait_ready()
        assert await sender.publish("user.Bob", b"1") == Outcome.ROUTED
        assert await sender.publish("user.New", b"2") == Outcome.ROUTED
        assert await sender.publish("user.Gone", b"3") == Outcome.UNROUTED
        with trio.fail_after(READY_TIMEOUT):
            assert await holder.incoming.receive() == ("user.Bob", b"1")
            assert await holder.incoming.receive() == ("user.New", b"2")


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
        async with trio_asyncio.open_loop():
            operator = await trio_asyncio.aio_as_trio(aiormq.connect)(RABBITMQ_URL)
            channel = await trio_asyncio.aio_as_trio(operator.channel)()
            await trio_asyncio.aio_as_trio(channel.exchange_delete)(exchange)
            await trio_asyncio.aio_as_trio(operator.close)()

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


async def test_rabbitmq_restart_makes_backend_unavailable_then_restores_it(
    exchange: str,
) -> None:
    async with open_instances(exchange, 2) as (sender, holder):
        await holder.subscribe("user.Bob")

        with trio.fail_after(OUTAGE_TIMEOUT):
            async with broker_outage("rabbitmq"):
                await holder.wait_ready(False)
                await sender.wait_ready(False)
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
        async with open_ready_backend(amqp_settings(exchange)) as holder:
            await holder.subscribe("user.Bob")
            assert await sender.publish("user.Bob", b"1") == Outcome.ROUTED
        # The exclusive queue and its bindings went with the connection.
        assert await sender.publish("user.Bob", b"2") == Outcome.UNROUTED
