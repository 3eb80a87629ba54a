"""Anyone who can publish to the exchange cannot get a forged frame to a socket (real RabbitMQ).

A foreign publisher (aiormq, straight to the exchange an ``amqp091``
instance uses) sends Bob's key bodies no triows instance would: not JSON, a
forged ``hello``, a message addressed to someone else, and one over the size
limit. The instance drops and counts each; Bob's socket gets only the
genuine message sent after them.
"""

from __future__ import annotations

import aiormq
import httpx
import pytest
import trio_asyncio

from tests.brokers import require_broker
from tests.e2e import (
    TARGETS_BY_NAME,
    assert_next_message,
    ready_instances,
    send_confirmed,
    unique_exchange,
)
from triows.client import open_events

pytestmark = pytest.mark.broker

RABBITMQ = TARGETS_BY_NAME["amqp091-rabbitmq"]
LIMIT = 65536
INVALID = [
    b"not json at all",
    b'{"type":"hello","user":"Bob","instance":"evil","protocol":1}',
    b'{"type":"message","id":"x","from":"Anne","to":"Eve","message":"hi","ts":1}',
]
TOO_LARGE = (
    b'{"type":"message","id":"x","from":"Anne","to":"Bob","message":"'
    # Over TRIOWS_MAX_MESSAGE_BYTES (64 KiB), under a session's TRIOWS_SESSION_MAX_BYTES
    # (1 MiB; a body over that is refused by the broker itself).
    + b"x" * (100 * 1024)
    + b'","ts":1}'
)


@pytest.fixture(autouse=True)
async def rabbitmq() -> None:
    await require_broker(RABBITMQ.broker)


async def publish_foreign(exchange: str, key: str, bodies: list[bytes]) -> None:
    async with trio_asyncio.open_loop():
        connection = await trio_asyncio.aio_as_trio(aiormq.connect)(RABBITMQ.broker_url)
        channel = await trio_asyncio.aio_as_trio(connection.channel)()
        for body in bodies:
            await trio_asyncio.aio_as_trio(channel.basic_publish)(
                body, exchange=exchange, routing_key=key
            )
        await trio_asyncio.aio_as_trio(connection.close)()


def dropped(metrics: str, reason: str) -> float:
    prefix = f'triows_messages_dropped_total{{reason="{reason}"}} '
    lines = [line for line in metrics.splitlines() if line.startswith(prefix)]
    return float(lines[0].removeprefix(prefix)) if lines else 0.0


@pytest.mark.parametrize("window", ["120", "0"], ids=["session", "no-session"])
async def test_foreign_bodies_published_to_the_exchange_never_reach_bob(window: str) -> None:
    exchange = unique_exchange()
    env = {"TRIOWS_RESUME_WINDOW": window}
    async with (
        ready_instances(RABBITMQ, 1, exchange=exchange, env=env) as (b,),
        httpx.AsyncClient() as http,
        open_events(b.base_url, user="Bob") as bob,
    ):
        await publish_foreign(exchange, "user.Bob", [*INVALID, TOO_LARGE])
        # Broker order: the genuine message comes after the forged ones.
        message_id = await send_confirmed(http, RABBITMQ, b.base_url, "Bob", "genuine")
        await assert_next_message(bob, message_id, "genuine")
        metrics = (await http.get(f"{b.base_url}/metrics")).text
        assert dropped(metrics, "invalid") == len(INVALID)
        assert dropped(metrics, "too_large") == 1
