"""The AMQP 0-9-1 backend on a RabbitMQ node under a memory alarm (``connection.blocked``).

An alarm makes RabbitMQ stop reading from every connection that publishes:
nothing sent after that is answered until the alarm clears. The node is this
suite's own (``rabbitmq-alarm`` in the broker table): its alarm would stall
every other test's publishes on the shared node.
"""

from __future__ import annotations

import asyncio
import secrets

import pytest
import trio

from deploy.brokers import BROKERS
from tests.brokers import memory_alarm, require_broker
from tests.test_backend_contract import open_ready
from triows.backend import BrokerUnavailable
from triows.backends.amqp091 import Amqp091Backend
from triows.settings import Settings

pytestmark = pytest.mark.broker

ALARM = BROKERS["rabbitmq-alarm"]
# Far above what the test waits: a publish still waiting when its own timeout
# is long past waits for this one.
LONG_BROKER_TIMEOUT = 3600.0
# A hang guard, not a timing assertion: a publish that honours its timeout
# answers well within it; one that does not waits LONG_BROKER_TIMEOUT.
HANG_GUARD = 60.0


async def bind_waiting_for_its_answer(backend: Amqp091Backend) -> None:
    """Return once a channel method holds the channel's lock (aiormq holds it until the answer)."""
    session = backend._following
    assert session is not None
    # aiormq 7's Channel.lock is a context manager around this asyncio.Lock.
    lock: asyncio.Lock = getattr(session.channel, "_Channel__lock")  # noqa: B009
    with trio.fail_after(HANG_GUARD):
        # Polling: the lock is asyncio's, no Trio event says when it is taken.
        while not lock.locked():  # noqa: ASYNC110
            await trio.sleep(0.01)


async def test_a_publish_behind_a_change_the_blocked_broker_never_answers_gets_its_timeout() -> (
    None
):
    await require_broker("rabbitmq-alarm")
    settings = Settings(
        backend="amqp091",
        broker_url=ALARM.url,
        exchange=f"triows-test-{secrets.token_hex(4)}",
        instance_id=f"test-{secrets.token_hex(4)}",
        publish_timeout=1.0,
        broker_timeout=LONG_BROKER_TIMEOUT,
        resume_window=0,  # a user key's binding, on the instance's queue
    )
    async with open_ready(settings) as backend:
        assert isinstance(backend, Amqp091Backend)
        await backend.subscribe("user.bob")
        async with memory_alarm(), trio.open_nursery() as nursery:
            # The first publish under the alarm: the broker stops reading.
            with pytest.raises(BrokerUnavailable, match="no confirm"):
                await backend.publish("user.bob", b"blocked")
            # A user connects: its bind waits for an answer that cannot come.
            nursery.start_soon(backend.subscribe, "user.carol")
            await bind_waiting_for_its_answer(backend)
            with trio.fail_after(HANG_GUARD), pytest.raises(BrokerUnavailable, match="no confirm"):
                await backend.publish("user.bob", b"behind the bind")
            nursery.cancel_scope.cancel()
