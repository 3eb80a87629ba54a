"""A session operation the broker does not answer within TRIOWS_BROKER_TIMEOUT is
``BrokerUnavailable`` (a clean refusal of the connection), never an escaped Trio timeout."""

from __future__ import annotations

import secrets

import pytest
import trio

from bench.faults.proxy import open_fault_proxy
from tests.brokers import require_broker
from tests.test_amqp091_backend import RABBITMQ_PORT, amqp_settings
from triows.backend import BrokerUnavailable, SessionDelivery
from triows.backends.amqp091 import open_amqp091_backend

# Hang guard only.
READY_TIMEOUT = 30


def _ignore(delivery: SessionDelivery) -> None:
    """No delivery is expected: nothing is published to the session."""


async def test_a_session_open_the_broker_never_answers_is_broker_unavailable(
    exchange: str,
) -> None:
    await require_broker("rabbitmq")
    async with open_fault_proxy(RABBITMQ_PORT) as proxy:
        # The heartbeat outlasts the timeout: the connection still counts as up.
        settings = amqp_settings(
            exchange, port=proxy.port, resume_window=120, broker_timeout=1, heartbeat=60
        )
        async with open_amqp091_backend(settings) as backend:
            with trio.fail_after(READY_TIMEOUT):
                await backend.wait_ready()
            sessions = backend.sessions
            assert sessions is not None
            proxy.stall()
            try:
                with pytest.raises(BrokerUnavailable):
                    await sessions.open(
                        f"{exchange}.session.{secrets.token_hex(16)}",
                        "user.bob",
                        _ignore,
                        resume=False,
                    )
            finally:
                proxy.resume()
