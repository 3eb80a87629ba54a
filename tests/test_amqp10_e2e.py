"""Several real ``triows serve --backend amqp10`` processes through RabbitMQ's AMQP 1.0 plugin.

The core scenario of DESIGN §1 over AMQP 1.0: Anne's request lands on one
instance, Bob's socket lives on another, and the broker carries the message
across. Each test gives its instances an exchange of their own, so tests
running at the same time never route into each other.

RabbitMQ 3.10's AMQP 1.0 plugin settles a message ``accepted`` whether or not
a queue took it, so with this backend ``/send`` answers 202 ``accepted`` (never
``routed``, never 404): the tests pin that down rather than hide it.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import httpx
import pytest
import trio

from tests.brokers import broker_outage, require_broker
from tests.processes import Instance, serve_instance, wait_for_status
from triows.client import EventsClient, open_events, post_send

pytestmark = pytest.mark.broker

RABBITMQ_PORT = 5672
# Hang guards only; no test asserts on how long something took.
STEP_TIMEOUT = 30
OUTAGE_TIMEOUT = 180
POLL_INTERVAL = 0.05


@pytest.fixture(autouse=True)
async def rabbitmq_amqp10() -> None:
    await require_broker("rabbitmq-amqp10")


@pytest.fixture
def exchange() -> str:
    return f"triows-e2e10-{secrets.token_hex(4)}"


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


@asynccontextmanager
async def serve_amqp10(
    exchange: str, *, env: dict[str, str] | None = None, **kwargs: Any
) -> AsyncIterator[Instance]:
    """A ``triows serve --backend amqp10`` on the test's own exchange, nothing else set."""
    async with serve_instance(
        "amqp10", env={"TRIOWS_EXCHANGE": exchange, **(env or {})}, **kwargs
    ) as instance:
        yield instance


@asynccontextmanager
async def ready_instances(exchange: str, count: int) -> AsyncIterator[list[Instance]]:
    async with AsyncExitStack() as stack:
        instances = [await stack.enter_async_context(serve_amqp10(exchange)) for _ in range(count)]
        for instance in instances:
            await instance.wait_ready()
        yield instances


async def assert_next_message(client: EventsClient, message_id: str, message: Any) -> None:
    with trio.fail_after(STEP_TIMEOUT):
        frame = await client.receive()
    assert (frame["type"], frame["id"], frame["message"]) == ("message", message_id, message)


async def send_accepted(http: httpx.AsyncClient, base_url: str, to: str, message: Any) -> str:
    response = await post_send(http, base_url, to, message, sender="Anne")
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "accepted"
    message_id: str = response.json()["id"]
    return message_id


async def test_core_scenario_bob_on_b_gets_annes_send_to_a_once(
    exchange: str, http: httpx.AsyncClient
) -> None:
    async with ready_instances(exchange, 2) as (a, b), open_events(b.base_url, user="Bob") as bob:
        assert bob.hello["instance"] != (await http.get(f"{a.base_url}/healthz")).json()["instance"]

        first = await send_accepted(http, a.base_url, "Bob", {"text": "hi Bob"})
        with trio.fail_after(STEP_TIMEOUT):
            frame = await bob.receive()
        assert (frame["id"], frame["from"], frame["to"], frame["message"]) == (
            first,
            "Anne",
            "Bob",
            {"text": "hi Bob"},
        )
        # Once: the next frame is the next message, not a second copy.
        second = await send_accepted(http, a.base_url, "Bob", "marker")
        await assert_next_message(bob, second, "marker")


async def test_bob_on_a_and_b_gets_each_message_once_on_each_connection(
    exchange: str, http: httpx.AsyncClient
) -> None:
    async with (
        ready_instances(exchange, 2) as (a, b),
        open_events(a.base_url, user="Bob") as bob_on_a,
        open_events(b.base_url, user="Bob") as bob_on_b,
    ):
        ids = [await send_accepted(http, via.base_url, "Bob", n) for n, via in enumerate((a, b, a))]
        for connection in (bob_on_a, bob_on_b):
            for n, message_id in enumerate(ids):
                await assert_next_message(connection, message_id, n)
        marker = await send_accepted(http, b.base_url, "Bob", "marker")
        for connection in (bob_on_a, bob_on_b):
            await assert_next_message(connection, marker, "marker")


async def test_offline_carol_gets_202_accepted_and_nothing_is_delivered_later(
    exchange: str, http: httpx.AsyncClient
) -> None:
    async with ready_instances(exchange, 2) as (a, b):
        # RabbitMQ 3.10 cannot tell the backend that nobody holds Carol's key.
        for instance in (a, b):
            await send_accepted(http, instance.base_url, "Carol", "hello?")

        async with open_events(b.base_url, user="Carol") as carol:
            # The messages sent while she was offline were dropped by the
            # broker: the first frame she gets is the one sent after she came.
            message_id = await send_accepted(http, a.base_url, "Carol", "hello!")
            await assert_next_message(carol, message_id, "hello!")


async def test_2000_messages_from_anne_reach_bob_across_instances_complete_in_order(
    exchange: str,
) -> None:
    count = 2000
    async with (
        serve_amqp10(exchange) as a,
        # Bob's bounded queue must hold what can be in flight to him while the
        # test also reads Anne's acks; overflowing it is another test's subject.
        serve_amqp10(exchange, env={"TRIOWS_SEND_QUEUE": str(count)}) as b,
    ):
        await a.wait_ready()
        await b.wait_ready()
        async with (
            open_events(b.base_url, user="Bob") as bob,
            open_events(a.base_url, user="Anne") as anne,
        ):
            received: list[Any] = []
            acks: list[str] = []

            async def read_bob() -> None:
                while len(received) < count:
                    frame = await bob.receive()
                    assert (frame["type"], frame["from"]) == ("message", "Anne")
                    received.append(frame["message"])

            async def read_acks() -> None:
                while len(acks) < count:
                    frame = await anne.receive()
                    assert frame["type"] == "ack", frame
                    acks.append(frame["status"])

            with trio.fail_after(OUTAGE_TIMEOUT):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(read_bob)
                    nursery.start_soon(read_acks)
                    for n in range(count):
                        await anne.send("Bob", n, ref=str(n))

            assert acks == ["accepted"] * count
            assert received == list(range(count))


async def test_broker_outage_gives_503_keeps_sockets_open_and_resumes_without_restart(
    exchange: str, http: httpx.AsyncClient
) -> None:
    async with ready_instances(exchange, 2) as (a, b), open_events(b.base_url, user="Bob") as bob:
        statuses: set[int] = set()
        outage_seen = trio.Event()

        async def keep_sending() -> None:
            # Traffic flowing through the whole outage, paced lightly.
            while True:
                response = await post_send(http, a.base_url, "Bob", "traffic", sender="Anne")
                statuses.add(response.status_code)
                if response.status_code == 503:
                    assert response.headers["retry-after"].isdigit()
                    outage_seen.set()
                await trio.sleep(POLL_INTERVAL)

        async def drain_bob() -> None:
            while True:
                await bob.receive()

        with trio.fail_after(OUTAGE_TIMEOUT):
            await send_accepted(http, a.base_url, "Bob", "before")
            async with trio.open_nursery() as traffic:
                traffic.start_soon(keep_sending)
                traffic.start_soon(drain_bob)
                async with broker_outage("rabbitmq"):
                    await outage_seen.wait()
                    for instance in (a, b):
                        await wait_for_status(f"{instance.base_url}/readyz", 503)
                    assert bob.close_code is None
                for instance in (a, b):
                    await wait_for_status(f"{instance.base_url}/readyz", 200, OUTAGE_TIMEOUT)
                traffic.cancel_scope.cancel()
        assert {202, 503} <= statuses

        # Same processes, same socket: Bob's receiver link was restored by B itself.
        assert a.process.returncode is None and b.process.returncode is None
        assert bob.close_code is None
        after = await send_accepted(http, a.base_url, "Bob", "after the outage")
        with trio.fail_after(STEP_TIMEOUT):
            while (frame := await bob.receive())["message"] == "traffic":
                pass
        assert (frame["id"], frame["message"]) == (after, "after the outage")
