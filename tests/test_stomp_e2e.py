"""Real ``triows serve`` processes routing over STOMP: ActiveMQ and RabbitMQ.

The same scenarios run on both brokers, with nothing set but the backend and
the broker URL (and an exchange name of the test's own, so tests running at
the same time never route into each other): the backend picks each broker's
destination family from its ``CONNECTED`` frame.

STOMP cannot tell whether anyone is subscribed, so a confirmed send is
``202 accepted`` (never ``routed``) and an offline recipient is not a 404.
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

STOMP_URLS = {
    "activemq": "stomp://guest:guest@127.0.0.1:61614",
    "rabbitmq-stomp": "stomp://guest:guest@127.0.0.1:61613",
}
# What broker_outage takes down to stop each STOMP broker.
OUTAGE_NAMES = {"activemq": "activemq", "rabbitmq-stomp": "rabbitmq"}
# Hang guards only; no test asserts on how long something took.
STEP_TIMEOUT = 30
LONG_TIMEOUT = 180
POLL_INTERVAL = 0.05


@pytest.fixture(params=sorted(STOMP_URLS))
async def broker(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    await require_broker(name)
    return name


@pytest.fixture
def exchange() -> str:
    return f"triows-e2e-{secrets.token_hex(4)}"


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


@asynccontextmanager
async def serve_stomp(
    broker: str, exchange: str, *, env: dict[str, str] | None = None
) -> AsyncIterator[Instance]:
    """A ``triows serve --backend stomp`` on ``broker``, ready."""
    async with serve_instance(
        "stomp",
        broker_url=STOMP_URLS[broker],
        env={"TRIOWS_EXCHANGE": exchange, "TRIOWS_RECONNECT_MAX": "1", **(env or {})},
    ) as instance:
        await instance.wait_ready()
        yield instance


@asynccontextmanager
async def two_instances(broker: str, exchange: str) -> AsyncIterator[tuple[Instance, Instance]]:
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(serve_stomp(broker, exchange))
        b = await stack.enter_async_context(serve_stomp(broker, exchange))
        yield a, b


async def send_accepted(http: httpx.AsyncClient, base_url: str, to: str, message: Any) -> str:
    response = await post_send(http, base_url, to, message, sender="Anne")
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "accepted"
    message_id: str = response.json()["id"]
    return message_id


async def assert_next_message(client: EventsClient, message_id: str, message: Any) -> None:
    with trio.fail_after(STEP_TIMEOUT):
        frame = await client.receive()
    assert (frame["type"], frame["id"], frame["message"]) == ("message", message_id, message)


async def test_core_scenario_bob_on_b_gets_annes_send_to_a_once(
    broker: str, exchange: str, http: httpx.AsyncClient
) -> None:
    async with two_instances(broker, exchange) as (a, b):
        async with open_events(b.base_url, user="Bob") as bob:
            a_id = (await http.get(f"{a.base_url}/healthz")).json()["instance"]
            assert bob.hello["instance"] != a_id

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
    broker: str, exchange: str, http: httpx.AsyncClient
) -> None:
    async with (
        two_instances(broker, exchange) as (a, b),
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


async def test_send_to_an_offline_user_is_accepted_not_404(
    broker: str, exchange: str, http: httpx.AsyncClient
) -> None:
    async with serve_stomp(broker, exchange) as a:
        await send_accepted(http, a.base_url, "Carol", "nobody listens")


async def test_2000_messages_from_anne_reach_bob_across_instances_complete_in_order(
    broker: str, exchange: str
) -> None:
    count = 2000
    async with (
        serve_stomp(broker, exchange) as a,
        # Bob's bounded queue must hold what can be in flight to him while the
        # test also reads Anne's acks; overflowing it is another test's subject.
        serve_stomp(broker, exchange, env={"TRIOWS_SEND_QUEUE": str(count)}) as b,
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

        with trio.fail_after(LONG_TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_bob)
                nursery.start_soon(read_acks)
                for n in range(count):
                    await anne.send("Bob", n, ref=str(n))

        assert acks == ["accepted"] * count
        assert received == list(range(count))


async def test_broker_outage_gives_503_keeps_sockets_open_and_resumes_without_restart(
    broker: str, exchange: str, http: httpx.AsyncClient
) -> None:
    async with (
        two_instances(broker, exchange) as (a, b),
        open_events(b.base_url, user="Bob") as bob,
    ):
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

        with trio.fail_after(LONG_TIMEOUT):
            await send_accepted(http, a.base_url, "Bob", "before")
            async with trio.open_nursery() as traffic:
                traffic.start_soon(keep_sending)
                traffic.start_soon(drain_bob)
                async with broker_outage(OUTAGE_NAMES[broker]):
                    await outage_seen.wait()
                    for instance in (a, b):
                        await wait_for_status(f"{instance.base_url}/readyz", 503)
                    assert bob.close_code is None
                for instance in (a, b):
                    await wait_for_status(f"{instance.base_url}/readyz", 200, LONG_TIMEOUT)
                traffic.cancel_scope.cancel()
        assert {202, 503} <= statuses

        # Same processes, same socket: Bob's subscription was restored by B itself.
        assert a.process.returncode is None and b.process.returncode is None
        assert bob.close_code is None
        after = await send_accepted(http, a.base_url, "Bob", "after the outage")
        with trio.fail_after(STEP_TIMEOUT):
            while (frame := await bob.receive())["message"] == "traffic":
                pass
        assert (frame["id"], frame["message"]) == (after, "after the outage")
