"""What is specific to the STOMP backend; the shared contract is tests/test_backend_contract.py's.

Real brokers: RabbitMQ's STOMP plugin and ActiveMQ. Every broker test runs
on both brokers. Each test uses its own exchange name (the prefix of every
destination), so tests running at the same time, here or in other suites,
never see each other's messages.
"""

from __future__ import annotations

import contextlib
import random
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import pytest
import trio
import trio.testing
from anyio.abc import ByteStream

import triows.backends.stomp
from deploy.brokers import BROKERS
from tests.brokers import require_broker
from tests.tcp_proxy import reachable
from tests.test_backend_contract import open_ready, wait_not_ready
from triows.backend import BrokerUnavailable, Outcome
from triows.backends.broker_url import connect_stream, query_int
from triows.backends.stomp import (
    StompBackend,
    StompBrokerError,
    check_settings,
    default_destination_template,
    open_stomp_backend,
    parse_url,
)
from triows.backends.stomp_frames import Frame, FrameParser, encode_frame
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
    # Keys' messages on ``incoming``: sessions (tests/test_backend_contract.py) off.
    overrides.setdefault("resume_window", 0)
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


@pytest.mark.broker
async def test_messages_in_flight_at_an_unsubscribe_do_not_drop_the_connection(
    broker: str, exchange: str
) -> None:
    # A message the broker had already handed to its STOMP adapter when the
    # UNSUBSCRIBE arrived: RabbitMQ answers it with an ERROR frame ("Subscription
    # not found") and keeps the connection open. Publishing to a key while it is
    # being unsubscribed, on the same connection, is what a /send racing the
    # last socket of its recipient does.
    rounds, burst = 5, 50
    async with open_ready(stomp_settings(STOMP_PORTS[broker], exchange)) as backend:
        assert isinstance(backend, StompBackend)
        received: list[tuple[str, bytes]] = []
        after = trio.Event()
        lost = False

        async def watch() -> None:
            nonlocal lost
            await backend.wait_not_ready()
            lost = True

        async def drain() -> None:
            async for delivery in backend.incoming:
                received.append(delivery)
                if delivery == ("user.dave", b"after"):
                    after.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            nursery.start_soon(drain)
            for _ in range(rounds):
                await backend.subscribe("user.carol")
                async with trio.open_nursery() as sends:
                    for n in range(burst):
                        sends.start_soon(backend.publish, "user.carol", b"%d" % n)
                    await backend.unsubscribe("user.carol")
            assert not lost
            # Still the same connection, and it still delivers.
            await backend.subscribe("user.dave")
            await backend.publish("user.dave", b"after")
            with trio.fail_after(DELIVERY_TIMEOUT):
                await after.wait()
            assert not lost
            nursery.cancel_scope.cancel()


@pytest.mark.broker
async def test_a_subscribe_cut_short_before_its_frame_went_out_is_sent_by_the_next_one(
    broker: str, exchange: str
) -> None:
    # A socket that goes away while its user's SUBSCRIBE waits behind another
    # write: nothing reached the broker, so the next subscribe of that key must
    # send one (not take the key for subscribed), and no UNSUBSCRIBE may name
    # an id the broker never saw (RabbitMQ answers that with ERROR and a close).
    async with open_ready(stomp_settings(STOMP_PORTS[broker], exchange)) as backend:
        assert isinstance(backend, StompBackend)
        connection = backend._following
        assert connection is not None
        writes_free = trio.Event()

        async def hold_writes(*, task_status: trio.TaskStatus[None]) -> None:
            async with connection._write_lock:
                task_status.started()
                await writes_free.wait()

        async with trio.open_nursery() as nursery:
            await nursery.start(hold_writes)
            with trio.CancelScope() as cut:

                async def cut_once_blocked() -> None:
                    await trio.testing.wait_all_tasks_blocked()
                    cut.cancel()  # the subscribe waits for the write lock

                nursery.start_soon(cut_once_blocked)
                await backend.subscribe("user.erin")
            assert cut.cancelled_caught
            writes_free.set()

        await backend.subscribe("user.erin")
        await backend.publish("user.erin", b"after")
        assert await receive(backend) == ("user.erin", b"after")
        await backend.unsubscribe("user.erin")
        await backend.publish("user.erin", b"settled")  # answered before any ERROR's close
        assert backend.ready and backend._following is connection


# Cancelled publishes: how many, and where each is cut (yields of the
# publishing task before its cancel, or a deadline in seconds).
CANCELLED_PUBLISHES = 200
MOST_YIELDS_BEFORE_THE_CANCEL = 8
LONGEST_DEADLINE = 0.002


@pytest.mark.broker
async def test_publishes_cancelled_anywhere_before_their_frame_went_out_keep_the_connection(
    broker: str, exchange: str
) -> None:
    # What a socket closed while its user sends does to its publish (a token
    # expiry, a slow-consumer close, a drain): cancelled waiting for the write
    # lock, right after taking it, or waiting for the receipt. None of these
    # leaves part of a frame on the wire, so none may drop the connection
    # (every /send of the instance would answer 503 meanwhile).
    rng = random.Random(23)
    async with open_ready(stomp_settings(STOMP_PORTS[broker], exchange)) as backend:
        assert isinstance(backend, StompBackend)
        connection = backend._following
        assert connection is not None
        for attempt in range(CANCELLED_PUBLISHES):
            async with trio.open_nursery() as nursery:
                with trio.CancelScope() as cut:
                    if attempt % 2:
                        cut.deadline = trio.current_time() + rng.uniform(0, LONGEST_DEADLINE)
                    else:

                        async def cut_after(yields: int) -> None:
                            for _ in range(yields):
                                await trio.lowlevel.checkpoint()
                            cut.cancel()

                        nursery.start_soon(cut_after, rng.randrange(MOST_YIELDS_BEFORE_THE_CANCEL))
                    await backend.publish("user.bob", b"%d" % attempt)
            assert backend._following is connection, f"dropped at publish {attempt}"
        assert backend.ready
        await backend.subscribe("user.bob")
        await backend.publish("user.bob", b"after")
        while (delivery := await receive(backend)) != ("user.bob", b"after"):
            assert delivery[0] == "user.bob"


class HalfFrameStream(ByteStream):
    """A real connection to the broker whose next frame stalls half-way out.

    Once :attr:`stall` is set, the next write (a heart-beat aside) sends the
    first half of its bytes, sets :attr:`half_sent` and waits for its cancel:
    what a socket whose buffer filled up mid-frame does.
    """

    def __init__(self, inner: ByteStream) -> None:
        self.inner = inner
        self.stall = False
        self.half_sent = trio.Event()

    async def send(self, item: bytes) -> None:
        if self.stall and item != b"\n":
            self.stall = False
            await self.inner.send(item[: len(item) // 2])
            self.half_sent.set()
            await trio.sleep_forever()
        await self.inner.send(item)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        return await self.inner.receive(max_bytes)

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.mark.broker
async def test_a_publish_cancelled_with_half_its_frame_sent_drops_the_connection(
    broker: str, exchange: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nothing more can be written after half a frame: the broker would read
    # the next frame as the rest of this one. The connection must go, and the
    # next one carries on.
    streams: list[HalfFrameStream] = []

    async def connect_half_frame_stream(
        host: str, port: int, *, tls: bool, cafile: str | None
    ) -> ByteStream:
        stream = HalfFrameStream(await connect_stream(host, port, tls=tls, cafile=cafile))
        streams.append(stream)
        return stream

    monkeypatch.setattr(triows.backends.stomp, "connect_stream", connect_half_frame_stream)
    async with open_ready(stomp_settings(STOMP_PORTS[broker], exchange)) as backend:
        assert isinstance(backend, StompBackend)
        connection = backend._following
        streams[-1].stall = True
        async with trio.open_nursery() as nursery:
            with trio.CancelScope() as cut:

                async def cut_once_half_sent() -> None:
                    await streams[-1].half_sent.wait()
                    cut.cancel()

                nursery.start_soon(cut_once_half_sent)
                await backend.publish("user.bob", b"cut mid-frame")
        # The reconnect may be done within one poll of "not ready", so the
        # test waits for what must follow a drop: another connection, ready.
        with trio.fail_after(READY_TIMEOUT):
            while backend._following is connection or not backend.ready:  # noqa: ASYNC110
                await trio.sleep(0.01)
        assert await backend.publish("user.bob", b"after") == Outcome.ACCEPTED


# --- each subscription outlives its connection: RabbitMQ queues, ActiveMQ durable subscriptions


async def rabbitmq_queues(instance_id: str) -> set[str]:
    """The names of the queues RabbitMQ holds for ``instance_id``."""
    listed = await trio.run_process(["rabbitmqctl", "list_queues", "name"], capture_stdout=True)
    names = listed.stdout.decode().split()
    return {name for name in names if name.startswith(f"triows.{instance_id}.")}


async def wait_for_queues(instance_id: str, expected: set[str]) -> None:
    with trio.fail_after(READY_TIMEOUT):
        # Polling: rabbitmqctl is the only witness.
        while await rabbitmq_queues(instance_id) != expected:  # noqa: ASYNC110
            await trio.sleep(0.1)


@asynccontextmanager
async def open_holder_behind_a_proxy(
    exchange: str, broker: str = "rabbitmq-stomp"
) -> AsyncIterator[tuple[StompBackend, int]]:
    """A backend whose STOMP connection goes through a proxy on the returned port.

    The test opens the proxy there; until then the backend retries every 50 ms.
    """
    await require_broker(broker)
    port = free_port()
    settings = stomp_settings(port, exchange, reconnect_max_delay=0.05)
    async with open_stomp_backend(settings) as holder:
        yield holder, port


def upstream(broker: str = "rabbitmq-stomp") -> int:
    return STOMP_PORTS[broker]


@pytest.mark.broker
async def test_what_the_broker_confirmed_while_the_connection_was_lost_arrives_after(
    broker: str, exchange: str
) -> None:
    async with (
        open_ready(stomp_settings(upstream(broker), exchange)) as sender,
        open_holder_behind_a_proxy(exchange, broker) as (holder, port),
    ):
        async with reachable(holder, upstream(broker), port):
            await holder.subscribe("user.Bob")
            await sender.publish("user.Bob", b"1")
            assert await receive(holder) == ("user.Bob", b"1")
        # The connection dropped and reconnects are refused meanwhile; the
        # subscription's queue and its binding (ActiveMQ: the durable
        # subscription) outlive it.
        await wait_not_ready(holder)
        await sender.publish("user.Bob", b"2")
        await sender.publish("user.Bob", b"3")
        async with reachable(holder, upstream(broker), port):
            assert [await receive(holder), await receive(holder)] == [
                ("user.Bob", b"2"),
                ("user.Bob", b"3"),
            ]


@pytest.mark.broker
async def test_a_key_released_while_disconnected_gets_nothing_after_the_reconnect(
    exchange: str,
) -> None:
    async with (
        open_ready(stomp_settings(upstream(), exchange)) as sender,
        open_holder_behind_a_proxy(exchange) as (holder, port),
    ):
        async with reachable(holder, upstream(), port):
            await holder.subscribe("user.Bob")
            await holder.subscribe("user.Gone")
            queues = holder.queues
        await wait_not_ready(holder)
        await holder.unsubscribe("user.Gone")
        await sender.publish("user.Gone", b"kept by its queue")
        async with reachable(holder, upstream(), port):
            await sender.publish("user.Gone", b"0")
            await sender.publish("user.Bob", b"1")
            assert await receive(holder) == ("user.Bob", b"1")
            # Its queue is deleted, what it held with it.
            await wait_for_queues(holder._settings.instance_id, {queues["user.Bob"]})


@pytest.mark.broker
async def test_closing_the_backend_deletes_its_queues_on_rabbitmq(exchange: str) -> None:
    await require_broker("rabbitmq-stomp")
    settings = stomp_settings(upstream(), exchange)
    async with open_ready(settings) as holder:
        assert isinstance(holder, StompBackend)
        await holder.subscribe("user.Bob")
        await holder.subscribe("user.Ann")
        await holder.unsubscribe("user.Ann")
        await wait_for_queues(settings.instance_id, {holder.queues["user.Bob"]})
    assert await rabbitmq_queues(settings.instance_id) == set()


@pytest.mark.broker
async def test_a_delivery_whose_ack_died_with_the_connection_is_not_handed_over_twice(
    broker: str, exchange: str
) -> None:
    async with (
        open_ready(stomp_settings(upstream(broker), exchange)) as sender,
        open_holder_behind_a_proxy(exchange, broker) as (holder, port),
    ):
        async with reachable(holder, upstream(broker), port):
            await holder.subscribe("user.Bob")
            connection = holder._following
            assert connection is not None
            # As if the connection died before the ACK reached the broker.
            connection._take_ack = lambda: b""  # type: ignore[method-assign]
            await sender.publish("user.Bob", b"1")
            assert await receive(holder) == ("user.Bob", b"1")
        await wait_not_ready(holder)
        async with reachable(holder, upstream(broker), port):
            # The broker redelivers "1" (never acked) to the new connection
            # (RabbitMQ marks it redelivered, ActiveMQ does not): it was
            # handed over already, so it is skipped.
            for body in (b"2", b"3"):
                await sender.publish("user.Bob", body)
                assert await receive(holder) == ("user.Bob", body)


# --- ActiveMQ: durable subscriptions, removed when released ----------------


async def kept_by_durable_subscription(client_id: str, name: str, destination: str) -> list[bytes]:
    """What ActiveMQ kept for the durable subscription ``name`` of ``client_id``, which
    is then removed. Only once that client-id's backend is disconnected: this
    connection would take the client-id over (link stealing).

    A durable subscription that was removed (or never existed) is created
    here, empty: a marker published after the SUBSCRIBE is the first delivery.
    """
    stream = await trio.open_tcp_stream("127.0.0.1", STOMP_PORTS["activemq"])
    parser = FrameParser()
    frames: list[Frame] = []
    delivered: list[bytes] = []

    async def next_frame() -> Frame:
        while not frames:
            frames.extend(parser.feed(await stream.receive_some()))
        return frames.pop(0)

    async def request(frame: Frame) -> None:
        with_receipt = Frame(frame.command, {**frame.headers, "receipt": "r"}, frame.body)
        await stream.send_all(encode_frame(with_receipt))
        while (answer := await next_frame()).command == "MESSAGE":
            delivered.append(answer.body)
        assert answer.command == "RECEIPT", answer

    marker = f"marker-{secrets.token_hex(4)}".encode()
    connect = {"accept-version": "1.2", "host": "/", "client-id": client_id}
    with trio.fail_after(DELIVERY_TIMEOUT):
        async with stream:
            await stream.send_all(encode_frame(Frame("CONNECT", connect)))
            assert (await next_frame()).command == "CONNECTED"
            subscribe = {"id": "probe", "destination": destination, "ack": "auto"}
            await request(Frame("SUBSCRIBE", {**subscribe, "activemq.subscriptionName": name}))
            await request(Frame("SEND", {"destination": destination}, marker))
            while marker not in delivered:
                frame = await next_frame()
                assert frame.command == "MESSAGE", frame
                delivered.append(frame.body)
            await request(Frame("UNSUBSCRIBE", {"id": "probe"}))
            await request(Frame("UNSUBSCRIBE", {"id": name, "activemq.subscriptionName": name}))
            await request(Frame("DISCONNECT"))
    return delivered[: delivered.index(marker)]


@pytest.mark.broker
async def test_a_released_key_leaves_no_durable_subscription_on_activemq(exchange: str) -> None:
    # The connection is lost after an UNSUBSCRIBE: Bob's durable subscription
    # keeps what was published meanwhile, Ann's (released) was removed.
    async with (
        open_ready(stomp_settings(upstream("activemq"), exchange)) as sender,
        open_holder_behind_a_proxy(exchange, "activemq") as (holder, port),
    ):
        async with reachable(holder, upstream("activemq"), port):
            await holder.subscribe("user.Bob")
            await holder.subscribe("user.Ann")
            names = holder.queues
            await holder.unsubscribe("user.Ann")
        await wait_not_ready(holder)
        await sender.publish("user.Ann", b"to Ann")
        await sender.publish("user.Bob", b"to Bob")
        kept = {
            key: await kept_by_durable_subscription(
                holder.client_id, names[key], holder.destination(key)
            )
            for key in ("user.Ann", "user.Bob")
        }
    assert kept == {"user.Ann": [], "user.Bob": [b"to Bob"]}


@pytest.mark.broker
async def test_a_key_released_while_disconnected_leaves_no_durable_subscription_on_activemq(
    exchange: str,
) -> None:
    async with (
        open_ready(stomp_settings(upstream("activemq"), exchange)) as sender,
        open_holder_behind_a_proxy(exchange, "activemq") as (holder, port),
    ):
        async with reachable(holder, upstream("activemq"), port):
            await holder.subscribe("user.Gone")
            name = holder.queues["user.Gone"]
        await wait_not_ready(holder)
        await holder.unsubscribe("user.Gone")
        await sender.publish("user.Gone", b"kept until the reconnect")
        async with reachable(holder, upstream("activemq"), port):
            # Ready: restored (no key), the released key's subscription removed.
            assert holder.queues == {}
        await wait_not_ready(holder)
        await sender.publish("user.Gone", b"after")
        kept = await kept_by_durable_subscription(
            holder.client_id, name, holder.destination("user.Gone")
        )
    assert kept == []


@pytest.mark.broker
async def test_closing_the_backend_removes_its_durable_subscriptions_on_activemq(
    exchange: str,
) -> None:
    await require_broker("activemq")
    async with open_ready(stomp_settings(upstream("activemq"), exchange)) as sender:
        async with open_ready(stomp_settings(upstream("activemq"), exchange)) as holder:
            assert isinstance(holder, StompBackend)
            await holder.subscribe("user.Bob")
            await holder.subscribe("user.Ann")
            names = holder.queues
            client_id = holder.client_id
        await sender.publish("user.Bob", b"after the close")
        kept = [
            await kept_by_durable_subscription(client_id, names[key], sender.destination(key))
            for key in ("user.Bob", "user.Ann")
        ]
    assert kept == [[], []]
