"""Drain order (docs/operations.md) on real processes and the real RabbitMQ: no routed send is lost.

Bob is connected only to instance B; Anne sends to him through A as fast as
A answers while B gets SIGTERM. B releases Bob's key first (the broker stops
routing to B: Anne's sends are now ``offline``), flushes what the broker had
already delivered, and only then closes Bob's socket with 1012. So every
send A acknowledged ``routed`` reached Bob before the 1012. (Before, B closed
the sockets first and released the key after: sends routed in between were
acknowledged and dropped.)
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed

from tests.brokers import require_broker
from tests.e2e import LONG_TIMEOUT, TARGETS_BY_NAME, ready_instances
from triows.client import EventsClient, open_events
from triows.protocol import CLOSE_DRAINING

pytestmark = pytest.mark.broker

RABBITMQ = TARGETS_BY_NAME["amqp091-rabbitmq"]
SENDERS = 3
# Bounds of each send loop; it stops earlier, once Bob is offline.
MAX_SENDS = 20000
OFFLINE_ANSWERS_TO_STOP = 5
RECEIVED_BEFORE_SIGTERM = 200
# Frames a sender may have sent and not yet had answered.
IN_FLIGHT = 32


@pytest.fixture(autouse=True)
async def rabbitmq() -> None:
    await require_broker(RABBITMQ.broker)


async def test_every_routed_send_during_a_drain_reaches_bob_before_1012() -> None:
    routed: set[str] = set()
    offline_after_close = 0
    received: list[str] = []
    close: list[int] = []
    enough_received = trio.Event()
    stop = trio.Event()

    async def send_loop(anne: EventsClient, sender: int) -> None:
        credit = trio.Semaphore(IN_FLIGHT)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_answers, anne, credit)
            for n in range(MAX_SENDS):
                if stop.is_set():
                    break
                await credit.acquire()
                await anne.send("Bob", [sender, n], ref=f"{sender}-{n}")
            # Every send answered: all the credit is back.
            for _ in range(IN_FLIGHT):
                await credit.acquire()
            nursery.cancel_scope.cancel()

    async def read_answers(anne: EventsClient, credit: trio.Semaphore) -> None:
        nonlocal offline_after_close
        while True:
            answer = await anne.receive()
            if answer["type"] == "ack":
                assert answer["status"] == "routed", answer
                routed.add(answer["id"])
            else:
                assert (answer["type"], answer["code"]) == ("error", "offline"), answer
                if close:
                    offline_after_close += 1
                    if offline_after_close >= OFFLINE_ANSWERS_TO_STOP:
                        stop.set()
            credit.release()

    async with (
        # Without sessions (with them a drain gives 0 refused and 0 lost, Bob
        # resuming elsewhere: tests/test_session_resume.py).
        ready_instances(
            RABBITMQ, env={"TRIOWS_SEND_QUEUE": "100000", "TRIOWS_RESUME_WINDOW": "0"}
        ) as (a, b),
        open_events(b.base_url, user="Bob") as bob,
        AsyncExitStack() as stack,
    ):
        annes = [
            await stack.enter_async_context(open_events(a.base_url, user="Anne"))
            for _ in range(SENDERS)
        ]
        with trio.fail_after(LONG_TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_read_until_closed, bob, received, enough_received, close)
                async with trio.open_nursery() as senders:
                    for sender, anne in enumerate(annes):
                        senders.start_soon(send_loop, anne, sender)
                    await enough_received.wait()
                    b.terminate()
                nursery.cancel_scope.cancel()

    assert close == [CLOSE_DRAINING]
    lost = routed - set(received)
    assert not lost, f"{len(lost)} of {len(routed)} routed messages never reached Bob"
    # Bob is offline everywhere after the 1012: sends are answered offline.
    assert offline_after_close >= OFFLINE_ANSWERS_TO_STOP


async def _read_until_closed(
    client: EventsClient, into: list[str], enough: trio.Event, close: list[int]
) -> None:
    try:
        while True:
            frame: dict[str, Any] = await client.receive()
            assert frame["type"] == "message", frame
            into.append(frame["id"])
            if len(into) >= RECEIVED_BEFORE_SIGTERM:
                enough.set()
    except ConnectionClosed as closed:
        close.append(closed.reason.code if closed.reason is not None else 1005)
