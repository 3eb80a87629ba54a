"""Presence across real ``triows serve`` processes on every broker (docs/protocol.md#presence).

Bob's and Carol's sockets are on instance B, Anne's on A: A answers for
both, and Anne gets Carol's join and leave through the broker.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import trio

from tests.brokers import require_broker
from tests.e2e import STEP_TIMEOUT, TARGETS, Target, ready_instances
from triows.client import EventsClient, open_client, open_events

pytestmark = pytest.mark.broker
# Under the default pace of presence queries (5 a second per user).
POLL_INTERVAL = 0.25


async def presence(http: httpx.AsyncClient, base_url: str, **query: str) -> dict[str, Any]:
    response = await http.get(f"{base_url}/presence", params=query)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


async def settled(
    http: httpx.AsyncClient,
    base_url: str,
    until: Callable[[dict[str, Any]], bool] = lambda answer: True,
    **query: str,
) -> dict[str, Any]:
    """The first complete answer (that ``until`` accepts): a new instance calls its
    answers incomplete until it knows every other instance (one announce interval)."""
    with trio.fail_after(STEP_TIMEOUT):
        while True:
            answer = await presence(http, base_url, **query)
            if answer["complete"] and until(answer):
                return answer
            await trio.sleep(POLL_INTERVAL)


async def joined(client: EventsClient, room: str) -> None:
    await client.join(room, ref="j")
    while (await client.receive()).get("ref") != "j":
        pass


async def next_event(client: EventsClient) -> dict[str, Any]:
    with trio.fail_after(STEP_TIMEOUT):
        while True:
            frame = await client.receive()
            if frame["type"] == "presence" and "ref" not in frame:
                return frame


@pytest.mark.parametrize("target", TARGETS, ids=lambda target: target.name)
async def test_any_instance_answers_for_all_and_events_cross_the_broker(target: Target) -> None:
    await require_broker(target.broker)
    async with (
        ready_instances(target) as (a, b),
        httpx.AsyncClient() as http,
        open_events(a.base_url, user="Anne", presence=True) as anne,
        open_events(b.base_url, user="Bob") as bob,
    ):
        await joined(anne, "general")
        assert await next_event(anne) == {"type": "presence", "room": "general", "joined": "Anne"}
        await joined(bob, "general")
        assert (await next_event(anne))["joined"] == "Bob"
        assert await settled(http, a.base_url, user="Bob") == {
            "user": "Bob",
            "online": True,
            "connections": 1,
            "complete": True,
        }
        room = await settled(http, a.base_url, room="general")
        assert (room["users"], room["truncated"]) == (["Anne", "Bob"], False)
        async with open_events(b.base_url, user="Carol") as carol:
            await joined(carol, "general")
            assert await next_event(anne) == {
                "type": "presence",
                "room": "general",
                "joined": "Carol",
            }
        # Carol closed normally (1000): a leave at once.
        assert await next_event(anne) == {"type": "presence", "room": "general", "left": "Carol"}
        # Offline once B has detached her socket (which may come just after the event).
        await settled(http, a.base_url, lambda answer: not answer["online"], user="Carol")


async def test_an_instance_that_does_not_answer_makes_the_answer_incomplete() -> None:
    target = TARGETS[0]
    await require_broker(target.broker)
    env = {"TRIOWS_PRESENCE_TIMEOUT": "0.5"}
    async with (
        ready_instances(target, env=env) as (a, b),
        httpx.AsyncClient() as http,
        open_events(b.base_url, user="Bob"),
    ):
        assert (await settled(http, a.base_url, user="Bob"))["online"] is True
        b.process.send_signal(signal.SIGSTOP)
        try:
            answer = await presence(http, a.base_url, user="Bob")
            # Not "offline": incomplete, since B (which holds Bob) did not answer.
            assert (answer["online"], answer["complete"]) == (False, False)
        finally:
            b.process.send_signal(signal.SIGCONT)
        assert (await settled(http, a.base_url, user="Bob"))["online"] is True


async def test_a_session_resumed_on_another_instance_after_a_drain_is_no_leave_and_no_join() -> (
    None
):
    target = TARGETS[0]
    await require_broker(target.broker)
    async with (
        ready_instances(target) as (a, b),
        httpx.AsyncClient() as http,
        open_events(a.base_url, user="Anne", presence=True) as anne,
    ):
        await joined(anne, "general")
        await next_event(anne)
        async with open_client([b.base_url, a.base_url], user="Bob", reconnect_max=0.2) as bob:
            await bob.join("general")
            assert (await next_event(anne))["joined"] == "Bob"
            b.terminate()  # a drain: 1012 to Bob, whose session waits for his resume on A
            with trio.fail_after(STEP_TIMEOUT):
                while (frame := await bob.receive())["type"] != "reconnected":
                    pass
            assert (frame["resumed"], bob.url) == (True, a.base_url)
            room = await settled(http, a.base_url, room="general")
            assert room["users"] == ["Anne", "Bob"]
            async with open_events(a.base_url, user="Carol") as carol:
                await joined(carol, "general")
                # The next event is Carol's: Bob neither left nor joined.
                assert (await next_event(anne))["joined"] == "Carol"
