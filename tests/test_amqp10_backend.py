"""The AMQP 1.0 backend against the real RabbitMQ 3.10 with its AMQP 1.0 plugin.

Each test uses its own exchange, so tests running at the same time (here or in
other engineers' suites) never see each other's links.

RabbitMQ 3.x settles every AMQP 1.0 publish ``accepted``, routed or not, so
"routed" and "unrouted" are checked by what the holding backend receives, not by
publish outcomes.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
import trio
import trio.testing

from bench.link_churn import proton_links
from deploy.brokers import BROKERS
from tests.brokers import require_broker
from tests.tcp_proxy import open_tcp_proxy, reachable
from tests.test_backend_contract import open_ready, wait_not_ready
from tests.test_router_unit import hold_until_closed
from tests.test_stomp_backend import rabbitmq_queues, wait_for_queues
from triows.backend import Outcome
from triows.backends.amqp10 import Amqp10Backend, open_amqp10_backend
from triows.backends.amqp10_links import Received
from triows.connection import Connection
from triows.metrics import Metrics
from triows.process import free_port
from triows.protocol import CLOSE_DRAINING
from triows.router import Router
from triows.settings import Settings

pytestmark = [pytest.mark.broker, pytest.mark.usefixtures("broker_events")]

RABBITMQ_PORT = BROKERS["rabbitmq"].port
# Hang guards only; no test asserts on how long something took.
READY_TIMEOUT = 30


@pytest.fixture(autouse=True)
async def rabbitmq_amqp10() -> None:
    await require_broker("rabbitmq-amqp10")


def amqp10_settings(exchange: str, *, port: int = RABBITMQ_PORT, **overrides: Any) -> Settings:
    # Keys' messages on ``incoming``: sessions (tests/test_backend_contract.py) off.
    overrides.setdefault("resume_window", 0)
    return Settings(
        backend="amqp10",
        broker_url=f"amqp://guest:guest@127.0.0.1:{port}",
        exchange=exchange,
        instance_id=f"test-{secrets.token_hex(4)}",
        **overrides,
    )


async def call_each(method: Callable[[str], Awaitable[object]], keys: list[str]) -> None:
    """``await method(key)`` for every key at once."""

    async def call(key: str) -> None:
        await method(key)

    async with anyio.create_task_group() as tasks:
        for key in keys:
            tasks.start_soon(call, key)


async def publish_names(sender: Amqp10Backend, keys: list[str]) -> None:
    """Publish each key's name to it, all at once."""
    await call_each(lambda key: sender.publish(key, key.encode()), keys)


async def assert_receives_exactly(holder: Amqp10Backend, keys: list[str]) -> None:
    """The next deliveries are one message per key, carrying its name; then nothing else.

    "Nothing else" is checked with a control message sent last: anything for
    another key was accepted by the broker before it, so would come first.
    """
    delivered = [await holder.incoming.receive() for _ in keys]
    assert sorted(delivered) == sorted((key, key.encode()) for key in keys)
    await holder.subscribe("user.control")
    await holder.publish("user.control", b"control")
    assert await holder.incoming.receive() == ("user.control", b"control")
    await holder.unsubscribe("user.control")


async def test_rabbitmq_is_recognised_from_its_open_frame(exchange: str) -> None:
    async with open_ready(amqp10_settings(exchange)) as backend:
        addressing = backend.addressing
        assert addressing is not None
        assert addressing.family == "rabbitmq"
        assert addressing.address("user.bob") == f"/exchange/{exchange}/user.bob"
        # RabbitMQ 3.x offers no anonymous relay: the key travels in the subject.
        assert addressing.sender_target == f"/exchange/{exchange}"


async def test_concurrent_publishes_each_get_their_outcome(exchange: str) -> None:
    async with open_ready(amqp10_settings(exchange)) as backend:
        await backend.subscribe("user.bob")
        outcomes: list[Outcome] = []

        async def publish(number: int) -> None:
            outcomes.append(await backend.publish("user.bob", str(number).encode()))

        with anyio.fail_after(READY_TIMEOUT):
            async with anyio.create_task_group() as tasks:
                for number in range(200):
                    tasks.start_soon(publish, number)
            bodies = {(await backend.incoming.receive())[1] for _ in range(200)}
        assert outcomes == [Outcome.ACCEPTED] * 200
        assert bodies == {str(number).encode() for number in range(200)}


async def test_closing_the_backend_detaches_its_links(exchange: str) -> None:
    async with open_ready(amqp10_settings(exchange)) as first:
        async with open_ready(amqp10_settings(exchange)) as second:
            await second.subscribe("user.bob")
        # The closed instance's queue is gone with its link: a later subscriber
        # of the same key gets the next message, and only that one.
        await first.subscribe("user.bob")
        with anyio.fail_after(READY_TIMEOUT):
            await first.publish("user.bob", b"after close")
            assert await first.incoming.receive() == ("user.bob", b"after close")


async def test_300_keys_subscribed_at_once_each_receive_then_none_once_unsubscribed_at_once(
    exchange: str,
) -> None:
    keys = [f"user.crowd{number}" for number in range(300)]
    async with (
        open_ready(amqp10_settings(exchange)) as sender,
        open_ready(amqp10_settings(exchange)) as holder,
    ):
        with anyio.fail_after(120):
            await call_each(holder.subscribe, keys)
            await publish_names(sender, keys)
            await assert_receives_exactly(holder, keys)

            await call_each(holder.unsubscribe, keys)
            await publish_names(sender, keys)
            await assert_receives_exactly(holder, [])


async def test_what_is_published_after_subscribes_cut_by_a_lost_connection_return_arrives(
    exchange: str,
) -> None:
    # The connection is cut with most of 300 subscribes still in flight or
    # waiting their turn: they return without the broker's confirmation, and
    # what is published for their keys right after (before the reconnect has
    # restored them) must wait in their queues, not be dropped unrouted.
    keys = [f"user.crowd{number}" for number in range(300)]
    async with (
        open_tcp_proxy(RABBITMQ_PORT) as proxy,
        open_ready(amqp10_settings(exchange)) as sender,
        open_ready(amqp10_settings(exchange, port=proxy.port, reconnect_max_delay=0.5)) as holder,
    ):
        with anyio.fail_after(120):
            returned = 0

            async def subscribe_then_cut_once_50_returned(key: str) -> None:
                nonlocal returned
                await holder.subscribe(key)
                returned += 1
                if returned == 50:
                    proxy.cut()

            await call_each(subscribe_then_cut_once_50_returned, keys)
            await publish_names(sender, keys)
            await assert_receives_exactly(holder, keys)


class ReconnectFailures(logging.Handler):
    """Sets ``seen`` when the backend logs a failed connection whose error mentions ``text``."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.seen = anyio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "fields", {})
        if record.getMessage() == "broker_unavailable" and self.text in str(
            fields.get("error", "")
        ):
            self.seen.set()


@pytest.fixture
def refused_link_failures() -> Iterator[ReconnectFailures]:
    handler = ReconnectFailures("refused link")
    logger = logging.getLogger("triows")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


async def test_a_key_refused_while_reattaching_makes_the_backend_reconnect_again_not_fail(
    exchange: str, refused_link_failures: ReconnectFailures
) -> None:
    # Router-checked user names never contain "/", but a key RabbitMQ refuses is
    # the one way to make a reconnect's re-attaching fail on a live connection.
    refused = "user.not/valid"
    async with (
        open_ready(amqp10_settings(exchange)) as sender,
        open_ready(amqp10_settings(exchange, reconnect_max_delay=0.5)) as holder,
    ):
        await holder.subscribe("user.bob")
        await holder.subscribe(refused)  # refused: the connection starts over, holding it
        with anyio.fail_after(READY_TIMEOUT):
            await refused_link_failures.seen.wait()
        await holder.unsubscribe(refused)
        with anyio.fail_after(READY_TIMEOUT):
            await holder.wait_ready()
            await sender.publish("user.bob", b"after")
            assert await holder.incoming.receive() == ("user.bob", b"after")


async def test_link_changes_racing_a_reconnect_leave_exactly_the_held_keys_delivered(
    exchange: str,
) -> None:
    # Hold enough keys that re-attaching them takes a while, and toggle others
    # one after another from before the drop until after ``ready`` returns, so
    # changes land before, during and after the reconnect's re-attaching.
    settled = [f"user.settled{number}" for number in range(600)]
    toggled = [f"user.toggled{number}" for number in range(100)]
    held: set[str] = set()
    async with (
        open_tcp_proxy(RABBITMQ_PORT) as proxy,
        open_ready(amqp10_settings(exchange)) as sender,
        open_ready(amqp10_settings(exchange, port=proxy.port, reconnect_max_delay=0.5)) as holder,
    ):
        with anyio.fail_after(120):
            await call_each(holder.subscribe, settled)
            reconnected = anyio.Event()

            async def toggle_until_reconnected() -> None:
                passes_after = 0
                while passes_after < 2:
                    passes_after += reconnected.is_set()
                    for key in toggled:
                        if key in held:
                            await holder.unsubscribe(key)
                            held.discard(key)
                        else:
                            await holder.subscribe(key)
                            held.add(key)

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(toggle_until_reconnected)
                proxy.cut()
                await holder.wait_not_ready()
                await holder.wait_ready()
                reconnected.set()

            # One delivery per held key (no key has two links), none for the others.
            await publish_names(sender, settled + toggled)
            await assert_receives_exactly(holder, [*settled, *held])


# --- queues that outlive the connection (RabbitMQ) ---------------------------


async def receive(backend: Amqp10Backend) -> tuple[str, bytes]:
    with anyio.fail_after(READY_TIMEOUT):
        return await backend.incoming.receive()


@asynccontextmanager
async def open_sender_and_holder(
    exchange: str,
) -> AsyncIterator[tuple[Amqp10Backend, Amqp10Backend, int]]:
    """A ready sender, and a holder whose connection goes through a proxy on the returned port.

    The test opens the proxy there; until then the holder retries every 50 ms.
    """
    port = free_port()
    async with (
        open_ready(amqp10_settings(exchange)) as sender,
        open_amqp10_backend(
            amqp10_settings(exchange, port=port, reconnect_max_delay=0.05)
        ) as holder,
    ):
        yield sender, holder, port


async def test_what_rabbitmq_confirmed_while_the_connection_was_lost_arrives_after(
    exchange: str,
) -> None:
    async with open_sender_and_holder(exchange) as (sender, holder, port):
        async with reachable(holder, RABBITMQ_PORT, port):
            await holder.subscribe("user.bob")
            await sender.publish("user.bob", b"1")
            assert await receive(holder) == ("user.bob", b"1")
        # The connection dropped and reconnects are refused meanwhile; the
        # key's queue and its binding outlive it.
        await wait_not_ready(holder)
        await sender.publish("user.bob", b"2")
        await sender.publish("user.bob", b"3")
        async with reachable(holder, RABBITMQ_PORT, port):
            assert [await receive(holder), await receive(holder)] == [
                ("user.bob", b"2"),
                ("user.bob", b"3"),
            ]
            # Exactly once: nothing else was waiting.
            await assert_receives_exactly(holder, [])


async def test_a_delivery_whose_settlement_died_with_the_connection_is_not_handed_over_twice(
    exchange: str,
) -> None:
    async with open_sender_and_holder(exchange) as (sender, holder, port):
        async with reachable(holder, RABBITMQ_PORT, port):
            await holder.subscribe("user.bob")
            # As if the connection died before the settlement reached the broker.
            accept = holder._accept
            holder._accept = lambda received: None  # type: ignore[method-assign]
            await sender.publish("user.bob", b"1")
            assert await receive(holder) == ("user.bob", b"1")
        await wait_not_ready(holder)
        redelivered: list[bytes] = []

        def note(received: Received) -> None:
            if received.redelivered:
                redelivered.append(received.body)
            accept(received)

        holder._accept = note  # type: ignore[method-assign]
        async with reachable(holder, RABBITMQ_PORT, port):
            # RabbitMQ redelivers "1" (never settled) to the new connection, as
            # not its first acquirer: it was handed over already, so it is skipped.
            for body in (b"2", b"3"):
                await sender.publish("user.bob", body)
                assert await receive(holder) == ("user.bob", body)
        assert redelivered == [b"1"]


async def test_a_key_released_while_disconnected_gets_nothing_after_the_reconnect(
    exchange: str,
) -> None:
    async with open_sender_and_holder(exchange) as (sender, holder, port):
        async with reachable(holder, RABBITMQ_PORT, port):
            await holder.subscribe("user.bob")
            await holder.subscribe("user.gone")
            queues = holder.queues
        await wait_not_ready(holder)
        await holder.unsubscribe("user.gone")
        await sender.publish("user.gone", b"kept by its queue")
        async with reachable(holder, RABBITMQ_PORT, port):
            await sender.publish("user.gone", b"0")
            await sender.publish("user.bob", b"1")
            assert await receive(holder) == ("user.bob", b"1")
            # Its queue is deleted, what it held with it.
            await wait_for_queues(holder._settings.instance_id, {queues["user.bob"]})


async def test_closing_the_backend_deletes_its_queues_on_rabbitmq(exchange: str) -> None:
    settings = amqp10_settings(exchange)
    async with open_ready(settings) as holder:
        assert isinstance(holder, Amqp10Backend)
        await holder.subscribe("user.bob")
        await holder.subscribe("user.ann")
        await holder.unsubscribe("user.ann")
        await wait_for_queues(settings.instance_id, {holder.queues["user.bob"]})
    assert await rabbitmq_queues(settings.instance_id) == set()


# One key held and released this often on one connection (a user's last
# disconnect, a room leave): enough that a leak per cycle would stand out.
CHURN_CYCLES = 1000


async def test_subscribing_and_releasing_one_key_again_and_again_keeps_no_link_behind(
    exchange: str,
) -> None:
    async with open_ready(amqp10_settings(exchange)) as backend:
        assert isinstance(backend, Amqp10Backend)
        connection = backend._following
        assert connection is not None
        links_before = proton_links(backend)
        for _ in range(CHURN_CYCLES):
            await backend.subscribe("user.bob")
            await backend.unsubscribe("user.bob")
        assert backend._following is connection  # one connection all along
        assert (proton_links(backend), connection.detached) == (links_before, set())
        await backend.subscribe("user.bob")
        await backend.publish("user.bob", b"after")
        with anyio.fail_after(READY_TIMEOUT):
            assert await backend.incoming.receive() == ("user.bob", b"after")


# Users whose first connection is being subscribed when the instance drains.
DRAINED_IN_FLIGHT = 40


async def test_a_drain_leaves_no_key_held_and_no_connection_open_of_the_subscribes_in_flight(
    exchange: str,
) -> None:
    # AMQP 1.0 attaches many links at once: the drain begins with all forty
    # still waiting for the broker's attach.
    async with open_ready(amqp10_settings(exchange)) as backend:
        assert isinstance(backend, Amqp10Backend)
        router = Router(backend, Metrics(), backend._settings)
        attaching = [Connection(f"u{n}", 8) for n in range(DRAINED_IN_FLIGHT)]
        async with trio.open_nursery() as sockets:
            sockets.start_soon(router.run)  # hands the drain's marker back
            for held in attaching:
                sockets.start_soon(hold_until_closed, router, held)
            await trio.testing.wait_all_tasks_blocked()
            with trio.fail_after(READY_TIMEOUT):
                await router.release_all(timeout=READY_TIMEOUT)
            held_after_release = set(backend._keys)
            for attached in router.connections:
                attached.close(CLOSE_DRAINING, "instance draining, reconnect")
            with trio.fail_after(READY_TIMEOUT):
                await router.idle.wait()
            sockets.cancel_scope.cancel()
        assert held_after_release == set()
        assert [held.close_code for held in attaching] == [CLOSE_DRAINING] * DRAINED_IN_FLIGHT
