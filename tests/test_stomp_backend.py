"""The STOMP backend against real brokers: RabbitMQ's STOMP plugin and ActiveMQ.

Every broker test runs on both brokers. Each test uses its own exchange name
(the prefix of every destination), so tests running at the same time, here or
in other suites, never see each other's messages.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import pytest
import trio

from backends.stomp import (
    StompBackend,
    StompBrokerError,
    default_destination_template,
    open_stomp_backend,
    parse_stomp_url,
)
from backends.stomp_frames import Frame, FrameParser, encode_frame
from deploy.brokers import BROKERS
from tests.brokers import require_broker
from tests.ready_backends import open_ready_backend
from tests.tcp_proxy import open_tcp_proxy
from triows.backend import BrokerUnavailable, Outcome
from triows.process import free_port
from triows.settings import Settings, SettingsError

# Hang guards only; no test asserts on how long something took.
READY_TIMEOUT = 30
DELIVERY_TIMEOUT = 60

# The broker table's STOMP brokers and their ports.
STOMP_PORTS = {name: BROKERS[name].port for name in ("rabbitmq-stomp", "activemq")}


@pytest.fixture(params=sorted(STOMP_PORTS))
async def broker(request: pytest.FixtureRequest) -> str:
    """The name of a STOMP broker; the test fails if it is not running."""
    name: str = request.param
    await require_broker(name)
    return name


def stomp_settings(port: int, exchange: str, **overrides: Any) -> Settings:
    return Settings(
        backend="stomp",
        broker_url=f"stomp://guest:guest@127.0.0.1:{port}",
        exchange=exchange,
        instance_id=f"test-{secrets.token_hex(4)}",
        **overrides,
    )


async def receive(backend: StompBackend) -> tuple[str, bytes]:
    with trio.fail_after(DELIVERY_TIMEOUT):
        return await backend.incoming.receive()


# --- without a broker ------------------------------------------------------


def test_url_gives_login_vhost_and_ports() -> None:
    url = parse_stomp_url("stomp+ssl://al%40x:p%3Aw@broker.example:61999/prod?amqp_port=5999")

    assert (url.host, url.port, url.login, url.passcode) == ("broker.example", 61999, "al@x", "p:w")
    assert (url.vhost, url.tls, url.amqp_port) == ("prod", True, 5999)


def test_url_defaults_to_port_61613_and_root_vhost() -> None:
    url = parse_stomp_url("stomp://127.0.0.1")

    assert (url.port, url.vhost, url.login, url.tls) == (61613, "/", "", False)


def test_url_with_another_scheme_is_refused() -> None:
    with pytest.raises(SettingsError, match="stomp://"):
        parse_stomp_url("amqp://127.0.0.1")


@pytest.mark.parametrize(
    ("server", "template"),
    [
        ("ActiveMQ/5.17.2", "/topic/triows.{key}"),
        ("RabbitMQ/3.10.8", "/exchange/triows/{key}"),
        ("ActiveMQ-Artemis/2.31.2", "/topic/triows.{key}"),
        ("", "/topic/triows.{key}"),
    ],
)
def test_destination_is_chosen_from_the_server_header(server: str, template: str) -> None:
    assert default_destination_template(server, "triows") == template


async def test_publish_while_broker_is_down_raises_at_once() -> None:
    settings = stomp_settings(free_port(), "unused")
    async with open_stomp_backend(settings) as backend:
        assert not backend.ready
        await backend.subscribe("user.bob")  # held, restored once connected
        with pytest.raises(BrokerUnavailable, match="not connected"):
            await backend.publish("user.bob", b"{}")


@dataclass
class MuteBroker:
    """A STOMP server on loopback that answers CONNECT and DISCONNECT, nothing else.

    It sends no heart-beats and no receipts for other frames: a broker that
    hangs while the TCP connection stays open.
    """

    port: int
    accepted: trio.MemoryReceiveChannel[int]  # each accepted connection's number
    frames: trio.MemoryReceiveChannel[Frame]  # every frame after CONNECT


@asynccontextmanager
async def mute_broker(heart_beat: str = "0,0") -> AsyncIterator[MuteBroker]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    accepted_send, accepted = trio.open_memory_channel[int](10)
    frames_send, frames = trio.open_memory_channel[Frame](100)
    count = 0

    async def handle(stream: trio.SocketStream) -> None:
        # The backend drops the connection of a hung broker: a reset, expected.
        with contextlib.suppress(trio.BrokenResourceError):
            await serve(stream)

    async def serve(stream: trio.SocketStream) -> None:
        nonlocal count
        count += 1
        await accepted_send.send(count)
        parser = FrameParser()
        while not parser.feed(await stream.receive_some()):
            pass
        connected = Frame("CONNECTED", {"version": "1.2", "heart-beat": heart_beat})
        await stream.send_all(encode_frame(connected))
        while data := await stream.receive_some():
            for frame in parser.feed(data):
                await frames_send.send(frame)
                if frame.command == "DISCONNECT":
                    receipt = Frame("RECEIPT", {"receipt-id": frame.headers["receipt"]})
                    await stream.send_all(encode_frame(receipt))

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handle, listeners)
        yield MuteBroker(listeners[0].socket.getsockname()[1], accepted, frames)
        nursery.cancel_scope.cancel()


async def test_silent_broker_is_detected_by_heart_beats_and_reconnected() -> None:
    async with mute_broker(heart_beat="1000,1000") as broker:
        settings = stomp_settings(broker.port, "unused", heartbeat=1, reconnect_max_delay=0.5)
        async with open_stomp_backend(settings) as backend:
            assert await broker.accepted.receive() == 1
            with trio.fail_after(READY_TIMEOUT):
                await backend.wait_ready()
                # Ready drops when the silence exceeds twice the heart-beat...
                await backend.wait_ready_change()
                assert not backend.ready
                # ...and the backend connects again on its own.
                assert await broker.accepted.receive() == 2


async def test_publish_without_receipt_raises_broker_unavailable() -> None:
    async with mute_broker() as broker:
        settings = stomp_settings(broker.port, "unused", publish_timeout=0.5)
        async with open_stomp_backend(settings) as backend:
            assert backend.ready
            with pytest.raises(BrokerUnavailable, match="no RECEIPT"):
                await backend.publish("user.bob", b"{}")
            assert (await broker.frames.receive()).command == "SEND"


async def test_close_sends_disconnect_and_waits_for_its_receipt() -> None:
    async with mute_broker() as broker:
        async with open_stomp_backend(stomp_settings(broker.port, "unused")) as backend:
            assert backend.ready
        frame = await broker.frames.receive()

        assert (frame.command, list(frame.headers)) == ("DISCONNECT", ["receipt"])
        assert not backend.ready


# --- against the real brokers ----------------------------------------------


@pytest.mark.broker
async def test_published_message_reaches_the_subscriber(broker: str, exchange: str) -> None:
    async with open_ready_backend(stomp_settings(STOMP_PORTS[broker], exchange)) as backend:
        await backend.subscribe("user.bob")

        assert await backend.publish("user.bob", b'{"hello":"bob"}') == Outcome.ACCEPTED
        assert await receive(backend) == ("user.bob", b'{"hello":"bob"}')


@pytest.mark.broker
async def test_body_bytes_arrive_unchanged(broker: str, exchange: str) -> None:
    body = '{"m":"\\u0000 ü\\n:"}\n'.encode() + bytes(range(256))
    async with open_ready_backend(stomp_settings(STOMP_PORTS[broker], exchange)) as backend:
        await backend.subscribe("user.bob")
        await backend.publish("user.bob", body)

        assert await receive(backend) == ("user.bob", body)


@pytest.mark.broker
async def test_destination_matches_the_broker_family(broker: str, exchange: str) -> None:
    async with open_ready_backend(stomp_settings(STOMP_PORTS[broker], exchange)) as backend:
        expected = {
            "rabbitmq-stomp": f"/exchange/{exchange}/user.bob",
            "activemq": f"/topic/{exchange}.user.bob",
        }[broker]

        assert backend.destination("user.bob") == expected


@pytest.mark.broker
async def test_every_subscribed_instance_receives(broker: str, exchange: str) -> None:
    settings = stomp_settings(STOMP_PORTS[broker], exchange)
    async with open_ready_backend(settings) as first, open_ready_backend(settings) as second:
        await first.subscribe("user.bob")
        await second.subscribe("user.bob")

        await first.publish("user.bob", b"1")

        assert await receive(first) == ("user.bob", b"1")
        assert await receive(second) == ("user.bob", b"1")


@pytest.mark.broker
async def test_message_goes_only_to_the_key_subscribed(broker: str, exchange: str) -> None:
    settings = stomp_settings(STOMP_PORTS[broker], exchange)
    async with open_ready_backend(settings) as anne, open_ready_backend(settings) as bob:
        await anne.subscribe("user.anne")
        await bob.subscribe("user.bob")

        await anne.publish("user.bob", b"for bob")
        await anne.publish("user.anne", b"for anne")

        assert await receive(bob) == ("user.bob", b"for bob")
        assert await receive(anne) == ("user.anne", b"for anne")


@pytest.mark.broker
async def test_unsubscribed_key_gets_no_message(broker: str, exchange: str) -> None:
    async with open_ready_backend(stomp_settings(STOMP_PORTS[broker], exchange)) as backend:
        await backend.subscribe("user.bob")
        await backend.unsubscribe("user.bob")
        # Confirmed while nobody held the key: the broker drops it.
        assert await backend.publish("user.bob", b"dropped") == Outcome.ACCEPTED

        await backend.subscribe("user.bob")
        await backend.publish("user.bob", b"kept")

        assert await receive(backend) == ("user.bob", b"kept")


@pytest.mark.broker
async def test_2000_messages_arrive_in_order(broker: str, exchange: str) -> None:
    count = 2000
    settings = stomp_settings(STOMP_PORTS[broker], exchange)
    async with open_ready_backend(settings) as sender, open_ready_backend(settings) as receiver:
        await receiver.subscribe("user.bob")

        async def send_all() -> None:
            for number in range(count):
                await sender.publish("user.bob", str(number).encode())

        received: list[bytes] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_all)
            while len(received) < count:
                received.append((await receive(receiver))[1])

        assert received == [str(number).encode() for number in range(count)]


@pytest.mark.broker
async def test_error_frame_becomes_a_clear_exception(exchange: str) -> None:
    await require_broker("rabbitmq-stomp")
    # RabbitMQ refuses a SEND to an exchange that does not exist.
    settings = stomp_settings(
        STOMP_PORTS["rabbitmq-stomp"], exchange, address_template="/exchange/no-such-{key}/x"
    )
    async with open_ready_backend(settings) as backend:
        with pytest.raises(StompBrokerError, match=r"no exchange 'no-such-user\.bob'"):
            await backend.publish("user.bob", b"{}")


@pytest.mark.broker
async def test_connection_drop_is_survived_and_subscriptions_restored(
    broker: str, exchange: str
) -> None:
    async with AsyncExitStack() as stack:
        proxy = await stack.enter_async_context(open_tcp_proxy(STOMP_PORTS[broker]))
        settings = stomp_settings(proxy.port, exchange, reconnect_max_delay=0.5)
        backend = await stack.enter_async_context(open_ready_backend(settings))
        await backend.subscribe("user.bob")
        await backend.subscribe("user.anne")

        proxy.cut()
        with trio.fail_after(READY_TIMEOUT):
            while backend.ready:
                await backend.wait_ready_change()
            with pytest.raises(BrokerUnavailable):
                await backend.publish("user.bob", b"{}")
            await backend.wait_ready()

        await backend.publish("user.anne", b"after")
        await backend.publish("user.bob", b"after")
        assert sorted([await receive(backend), await receive(backend)]) == [
            ("user.anne", b"after"),
            ("user.bob", b"after"),
        ]


@pytest.mark.broker
async def test_refused_login_leaves_the_backend_not_ready(exchange: str) -> None:
    await require_broker("rabbitmq-stomp")
    # RabbitMQ checks credentials; the test ActiveMQ has no authentication plugin.
    port = STOMP_PORTS["rabbitmq-stomp"]
    settings = replace(
        stomp_settings(port, exchange),
        broker_url=f"stomp://guest:wrong-{secrets.token_hex(2)}@127.0.0.1:{port}",
    )
    async with open_stomp_backend(settings) as backend:
        assert not backend.ready
        with pytest.raises(BrokerUnavailable):
            await backend.publish("user.bob", b"{}")


@pytest.mark.broker
async def test_exchange_missing_on_rabbitmq_is_declared_by_the_backend(exchange: str) -> None:
    await require_broker("rabbitmq-stomp")
    # A fresh exchange name: RabbitMQ's STOMP plugin would answer not_found
    # had the backend not declared it over AMQP 0-9-1.
    async with open_ready_backend(
        stomp_settings(STOMP_PORTS["rabbitmq-stomp"], exchange)
    ) as backend:
        await backend.subscribe("user.bob")
        await backend.publish("user.bob", b"declared")

        assert await receive(backend) == ("user.bob", b"declared")
