"""What only the ``amqp091`` backend does end to end, with real processes on the real RabbitMQ.

The scenarios every backend shares are in ``tests/test_across_instances.py``.
"""

from __future__ import annotations

from contextlib import AsyncExitStack

import httpx
import pytest
import trio

from deploy.brokers import BROKERS
from tests.brokers import require_broker
from tests.e2e import (
    STEP_TIMEOUT,
    TARGETS_BY_NAME,
    assert_next_message,
    ready_instances,
    send_confirmed,
    send_to_self_until_routed,
    serve_target,
    unique_exchange,
)
from tests.tcp_proxy import open_tcp_proxy
from triows.client import EventsClient, open_events, post_send
from triows.process import free_port, wait_for_status

pytestmark = pytest.mark.broker

RABBITMQ = TARGETS_BY_NAME["amqp091-rabbitmq"]
RABBITMQ_PORT = BROKERS["rabbitmq"].port


@pytest.fixture(autouse=True)
async def rabbitmq() -> None:
    await require_broker(RABBITMQ.broker)


async def test_users_on_different_workers_of_one_instance_reach_each_other() -> None:
    async with (
        serve_target(RABBITMQ, unique_exchange(), workers=2) as server,
        AsyncExitStack() as stack,
    ):
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
            await send_to_self_until_routed(client)

        await first.send(second.hello["user"], {"from worker": first.hello["instance"]}, ref="x")
        with trio.fail_after(STEP_TIMEOUT):
            ack = await first.receive()
            assert (ack["type"], ack["status"]) == ("ack", "routed")
            frame = await second.receive()
        assert frame["from"] == first.hello["user"]
        assert frame["message"] == {"from worker": first.hello["instance"]}


async def test_readyz_is_503_while_the_broker_is_unreachable_at_start_then_200() -> None:
    exchange = unique_exchange()
    port = free_port()
    async with (
        serve_target(
            RABBITMQ,
            exchange,
            broker_url=f"amqp://guest:guest@127.0.0.1:{port}/",
            env={"TRIOWS_RECONNECT_MAX": "0.5"},
        ) as late,
        ready_instances(RABBITMQ, 1, exchange=exchange) as (other,),
        httpx.AsyncClient() as http,
    ):
        # The instance started (``/healthz`` answered) although the broker did not.
        assert (await http.get(f"{late.base_url}/readyz")).status_code == 503
        response = await post_send(http, late.base_url, "Bob", "x", sender="Anne")
        assert response.status_code == 503
        assert "retry-after" in response.headers

        async with open_tcp_proxy(RABBITMQ_PORT, port=port):
            await wait_for_status(f"{late.base_url}/readyz", 200)
            async with open_events(late.base_url, user="Bob") as bob:
                message_id = await send_confirmed(
                    http, RABBITMQ, other.base_url, "Bob", "you are up"
                )
                await assert_next_message(bob, message_id, "you are up")
