"""What is specific to the STOMP backend; the shared contract is tests/test_backend_contract.py's.

Real brokers: RabbitMQ's STOMP plugin and ActiveMQ. Every broker test runs
on both brokers. Each test uses its own exchange name (the prefix of every
destination), so tests running at the same time, here or in other suites,
never see each other's messages.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import pytest
import trio

from backends.broker_url import query_int
from backends.stomp import (
    StompBackend,
    StompBrokerError,
    check_settings,
    default_destination_template,
    open_stomp_backend,
    parse_url,
)
from backends.stomp_frames import Frame, FrameParser, encode_frame
from deploy.brokers import BROKERS
from tests.brokers import require_broker
from tests.test_backend_contract import open_ready
from triows.backend import BrokerUnavailable
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
    url = parse_url("stomp+ssl://al%40x:p%3Aw@broker.example:61999/prod?amqp_port=5999")

    assert (url.host, url.port, url.user, url.password) == ("broker.example", 61999, "al@x", "p:w")
    assert (url.vhost, url.tls, query_int(url, "amqp_port", 0)) == ("prod", True, 5999)


def test_url_defaults_to_port_61613_and_root_vhost() -> None:
    url = parse_url("stomp://127.0.0.1")

    assert (url.port, url.vhost, url.user, url.tls) == (61613, "/", None, False)


@pytest.mark.parametrize(
    "url", ["amqp://127.0.0.1", "stomp://127.0.0.1:port", "stomp://h/?amqp_port=x"]
)
def test_a_malformed_url_fails_the_start_up_check(url: str) -> None:
    with pytest.raises(SettingsError, match="TRIOWS_BROKER_URL"):
        check_settings(replace(stomp_settings(61613, "unused"), broker_url=url))


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
                await backend.wait_not_ready()
                # ...and the backend connects again on its own.
                assert await broker.accepted.receive() == 2


async def test_publish_without_receipt_raises_broker_unavailable() -> None:
    async with mute_broker() as broker:
        settings = stomp_settings(broker.port, "unused", publish_timeout=0.5)
        async with open_stomp_backend(settings) as backend:
            assert backend.ready
            with pytest.raises(BrokerUnavailable, match="no confirm"):
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
async def test_destination_matches_the_broker_family(broker: str, exchange: str) -> None:
    async with open_ready(stomp_settings(STOMP_PORTS[broker], exchange)) as backend:
        expected = {
            "rabbitmq-stomp": f"/exchange/{exchange}/user.bob",
            "activemq": f"/topic/{exchange}.user.bob",
        }[broker]

        assert backend.destination("user.bob") == expected


@pytest.mark.broker
async def test_error_frame_becomes_a_clear_exception(exchange: str) -> None:
    await require_broker("rabbitmq-stomp")
    # RabbitMQ refuses a SEND to an exchange that does not exist.
    settings = stomp_settings(
        STOMP_PORTS["rabbitmq-stomp"], exchange, address_template="/exchange/no-such-{key}/x"
    )
    async with open_ready(settings) as backend:
        with pytest.raises(StompBrokerError, match=r"no exchange 'no-such-user\.bob'"):
            await backend.publish("user.bob", b"{}")


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
    async with open_ready(stomp_settings(STOMP_PORTS["rabbitmq-stomp"], exchange)) as backend:
        await backend.subscribe("user.bob")
        await backend.publish("user.bob", b"declared")

        assert await receive(backend) == ("user.bob", b"declared")
