"""Several real ``triows serve`` processes routing through the real RabbitMQ.

This is what triows exists for (DESIGN §1): Anne's request lands on one
instance, Bob's socket lives on another, and the broker carries the message
across. Each test gives its instances an exchange of their own, so tests
running at the same time never route into each other.
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
from tests.processes import Instance, free_port, serve_instance, wait_for_status
from tests.tcp_proxy import open_tcp_proxy
from triows.client import EventsClient, open_events, post_send

pytestmark = pytest.mark.broker

RABBITMQ_PORT = 5672
# Hang guards only; no test asserts on how long something took.
STEP_TIMEOUT = 30
OUTAGE_TIMEOUT = 300
POLL_INTERVAL = 0.05


@pytest.fixture(autouse=True)
async def rabbitmq() -> None:
    await require_broker("rabbitmq")


@pytest.fixture
def exchange() -> str:
    return f"triows-e2e-{secrets.token_hex(4)}"


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


@asynccontextmanager
async def serve_amqp091(
    exchange: str, *, env: dict[str, str] | None = None, **kwargs: Any
) -> AsyncIterator[Instance]:
    """A ``triows serve --backend amqp091`` on the test's own exchange."""
    async with serve_instance(
        "amqp091", env={"TRIOWS_EXCHANGE": exchange, **(env or {})}, **kwargs
    ) as instance:
        yield instance


@asynccontextmanager
async def ready_instances(exchange: str, count: int) -> AsyncIterator[list[Instance]]:
    async with AsyncExitStack() as stack:
        instances = [await stack.enter_async_context(serve_amqp091(exchange)) for _ in range(count)]
        for instance in instances:
            await instance.wait_ready()
        yield instances


async def wait_until_offline(http: httpx.AsyncClient, base_url: str, user: str) -> None:
    """Poll ``/send`` until the broker reports ``user`` offline (404)."""
    with trio.fail_after(STEP_TIMEOUT):
        while True:
            response = await post_send(http, base_url, user, "ping?", sender="probe")
            if response.status_code == 404:
                return
            await trio.sleep(POLL_INTERVAL)


async def assert_next_message(client: EventsClient, message_id: str, message: Any) -> None:
    with trio.fail_after(STEP_TIMEOUT):
        frame = await client.receive()
    assert (frame["type"], frame["id"], frame["message"]) == ("message", message_id, message)


async def send_routed(http: httpx.AsyncClient, base_url: str, to: str, message: Any) -> str:
    response = await post_send(http, base_url, to, message, sender="Anne")
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "routed"
    message_id: str = response.json()["id"]
    return message_id


async def test_core_scenario_bob_on_b_gets_annes_send_to_a_once(
    exchange: str, http: httpx.AsyncClient
) -> None:
    async with ready_instances(exchange, 2) as (a, b), open_events(b.base_url, user="Bob") as bob:
        assert bob.hello["instance"] != (await http.get(f"{a.base_url}/healthz")).json()["instance"]

        first = await send_routed(http, a.base_url, "Bob", {"text": "hi Bob"})
        with trio.fail_after(STEP_TIMEOUT):
            frame = await bob.receive()
        assert (frame["id"], frame["from"], frame["to"], frame["message"]) == (
            first,
            "Anne",
            "Bob",
            {"text": "hi Bob"},
        )
        # Once: the next frame is the next message, not a second copy.
        second = await send_routed(http, a.base_url, "Bob", "marker")
        await assert_next_message(bob, second, "marker")


async def test_bob_on_a_and_b_gets_each_message_once_on_each_connection(
    exchange: str, http: httpx.AsyncClient
) -> None:
    async with (
        ready_instances(exchange, 2) as (a, b),
        open_events(a.base_url, user="Bob") as bob_on_a,
        open_events(b.base_url, user="Bob") as bob_on_b,
    ):
        ids = [await send_routed(http, via.base_url, "Bob", n) for n, via in enumerate((a, b, a))]
        for connection in (bob_on_a, bob_on_b):
            for n, message_id in enumerate(ids):
                await assert_next_message(connection, message_id, n)
        marker = await send_routed(http, b.base_url, "Bob", "marker")
        for connection in (bob_on_a, bob_on_b):
            await assert_next_message(connection, marker, "marker")


async def test_carol_is_offline_until_she_connects_and_after_she_leaves(
    exchange: str, http: httpx.AsyncClient
) -> None:
    async with ready_instances(exchange, 2) as (a, b):
        for instance in (a, b):
            response = await post_send(http, instance.base_url, "Carol", "hello?", sender="Anne")
            assert response.status_code == 404
            assert response.headers["content-type"] == "application/problem+json"

        async with open_events(b.base_url, user="Carol") as carol:
            message_id = await send_routed(http, a.base_url, "Carol", "hello!")
            await assert_next_message(carol, message_id, "hello!")

        # The server unbinds once it has seen the close: wait for that, bounded.
        await wait_until_offline(http, a.base_url, "Carol")
        assert (await post_send(http, b.base_url, "Carol", "x", sender="Anne")).status_code == 404


async def test_users_on_different_workers_of_one_instance_reach_each_other(
    exchange: str,
) -> None:
    async with serve_amqp091(exchange, workers=2) as server, AsyncExitStack() as stack:
        # The kernel spreads connections over the two workers sharing the
        # port; connect users until two of them landed on different workers.
        by_worker: dict[str, EventsClient] = {}
        for n in range(200):
            client = await stack.enter_async_context(open_events(server.base_url, user=f"user{n}"))
            by_worker.setdefault(client.hello["instance"], client)
            if len(by_worker) == 2:
                break
        assert len(by_worker) == 2, "every connection landed on the same worker"
        first, second = by_worker.values()
        assert first.hello["instance"] != second.hello["instance"]

        # Each worker connects to the broker on its own: a send to oneself is
        # routed once that user's worker is connected with its binding made.
        for client in (first, second):
            with trio.fail_after(STEP_TIMEOUT):
                await send_to_self_until_routed(client)

        await first.send(second.hello["user"], {"from worker": first.hello["instance"]}, ref="x")
        with trio.fail_after(STEP_TIMEOUT):
            ack = await first.receive()
            assert (ack["type"], ack["status"]) == ("ack", "routed")
            frame = await second.receive()
        assert frame["from"] == first.hello["user"]
        assert frame["message"] == {"from worker": first.hello["instance"]}


async def send_to_self_until_routed(client: EventsClient) -> None:
    """Send to oneself until acked ``routed``, and read that message back."""
    me = client.hello["user"]
    while True:
        await client.send(me, "self", ref="self")
        # The message may overtake its own ack: the broker delivers while the
        # sending side is still writing the ack.
        answer = await client.receive()
        if answer["type"] == "message":
            assert answer["message"] == "self"
            answer = await client.receive()
            assert (answer["type"], answer["status"]) == ("ack", "routed")
            return
        if answer["type"] == "ack":
            assert answer["status"] == "routed"
            assert (await client.receive())["message"] == "self"
            return
        assert (answer["type"], answer["code"]) == ("error", "unavailable"), answer
        await trio.sleep(POLL_INTERVAL)


async def test_2000_messages_from_anne_reach_bob_across_instances_complete_in_order(
    exchange: str,
) -> None:
    count = 2000
    async with (
        serve_amqp091(exchange) as a,
        # Bob's bounded queue must hold what can be in flight to him while the
        # test also reads Anne's acks; overflowing it is another test's subject.
        serve_amqp091(exchange, env={"TRIOWS_SEND_QUEUE": str(count)}) as b,
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

            assert acks == ["routed"] * count
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
                    assert response.json()["status"] == 503
                    outage_seen.set()
                await trio.sleep(POLL_INTERVAL)

        async def drain_bob() -> None:
            while True:
                await bob.receive()

        with trio.fail_after(OUTAGE_TIMEOUT):
            await send_routed(http, a.base_url, "Bob", "before")
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

        # Same processes, same socket: Bob's binding was restored by B itself.
        assert a.process.returncode is None and b.process.returncode is None
        assert bob.close_code is None
        after = await send_routed(http, a.base_url, "Bob", "after the outage")
        with trio.fail_after(STEP_TIMEOUT):
            while (frame := await bob.receive())["message"] == "traffic":
                pass
        assert (frame["id"], frame["message"]) == (after, "after the outage")


async def test_readyz_is_503_while_the_broker_is_unreachable_at_start_then_200(
    exchange: str, http: httpx.AsyncClient
) -> None:
    port = free_port()
    async with (
        serve_amqp091(
            exchange,
            broker_url=f"amqp://guest:guest@127.0.0.1:{port}/",
            env={"TRIOWS_RECONNECT_MAX": "0.5"},
        ) as late,
        ready_instances(exchange, 1) as (other,),
    ):
        # The instance started (``/healthz`` answered) although the broker did not.
        assert (await http.get(f"{late.base_url}/readyz")).status_code == 503
        response = await post_send(http, late.base_url, "Bob", "x", sender="Anne")
        assert response.status_code == 503
        assert "retry-after" in response.headers

        async with open_tcp_proxy(RABBITMQ_PORT, port=port):
            await wait_for_status(f"{late.base_url}/readyz", 200)
            async with open_events(late.base_url, user="Bob") as bob:
                message_id = await send_routed(http, other.base_url, "Bob", "you are up")
                await assert_next_message(bob, message_id, "you are up")
