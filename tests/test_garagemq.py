"""The ``amqp091`` backend's core scenario on GarageMQ, a second AMQP 0-9-1 broker.

Two real ``triows serve`` processes route through GarageMQ on 127.0.0.1:5673.
GarageMQ returns unroutable ``mandatory`` messages, so the backend reports
``routed`` and ``404`` on GarageMQ exactly as on RabbitMQ.

The instances are started one after the other, each ready before the next:
GarageMQ (Debian's build) hangs for good, every later connection included,
when two connections declare the same exchange and then their queues at the
same moment; see the README's broker notes.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import httpx
import pytest
import trio

from tests.brokers import require_broker
from tests.processes import Instance, serve_instance
from triows.client import open_events, post_send

pytestmark = pytest.mark.broker

GARAGEMQ_URL = "amqp://guest:guest@127.0.0.1:5673/"
# A hang guard only; no test asserts on how long something took.
STEP_TIMEOUT = 30


@pytest.fixture(autouse=True)
async def garagemq() -> None:
    await require_broker("garagemq")


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


@asynccontextmanager
async def two_instances() -> AsyncIterator[tuple[Instance, Instance]]:
    env = {"TRIOWS_EXCHANGE": f"triows-garage-{secrets.token_hex(4)}"}
    async with AsyncExitStack() as stack:
        instances: list[Instance] = []
        for _ in range(2):
            instance = await stack.enter_async_context(
                serve_instance("amqp091", broker_url=GARAGEMQ_URL, env=env)
            )
            await instance.wait_ready()
            instances.append(instance)
        yield instances[0], instances[1]


async def test_core_scenario_bob_on_b_gets_annes_send_to_a(http: httpx.AsyncClient) -> None:
    async with two_instances() as (a, b), open_events(b.base_url, user="Bob") as bob:
        response = await post_send(http, a.base_url, "Bob", {"text": "hi Bob"}, sender="Anne")
        assert response.status_code == 202, response.text
        assert response.json()["status"] == "routed"

        with trio.fail_after(STEP_TIMEOUT):
            frame = await bob.receive()
        assert (frame["id"], frame["from"], frame["message"]) == (
            response.json()["id"],
            "Anne",
            {"text": "hi Bob"},
        )


async def test_send_to_a_user_connected_nowhere_is_404(http: httpx.AsyncClient) -> None:
    async with two_instances() as (a, _b):
        response = await post_send(http, a.base_url, "Carol", "hello?", sender="Anne")

        assert response.status_code == 404
        assert response.headers["content-type"] == "application/problem+json"
