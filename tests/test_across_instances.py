"""Real ``triows serve`` processes routing through each real broker (DESIGN §1 and §6).

This is what triows exists for: Anne's request lands on one instance, Bob's
socket lives on another, and the broker carries the message across. Every
test runs on every target of ``tests.e2e.TARGETS`` (a backend on a broker),
with nothing set but the backend, the broker URL and an exchange of the
test's own. Where a broker cannot tell whether anyone is subscribed, a
confirmed send is ``202 accepted`` rather than ``routed`` and an offline
recipient is not a 404: the tests pin that down per target rather than hide it.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import trio

from tests.brokers import broker_outage, require_broker
from tests.e2e import (
    LONG_TIMEOUT,
    POLL_INTERVAL,
    STEP_TIMEOUT,
    TARGETS,
    Target,
    assert_next_message,
    assert_offline_answer,
    collect_frames,
    ready_instances,
    send_confirmed,
    wait_until_offline,
)
from triows.client import open_events, post_send
from triows.process import wait_for_status

pytestmark = pytest.mark.broker

every_target = pytest.mark.parametrize("target", TARGETS, ids=lambda target: target.name)
# GarageMQ is left out: the broker script has no outage for it.
targets_with_an_outage = pytest.mark.parametrize(
    "target", [target for target in TARGETS if target.outage], ids=lambda target: target.name
)


@pytest.fixture(autouse=True)
async def broker_running(target: Target) -> None:
    await require_broker(target.broker)


@every_target
async def test_core_scenario_bob_on_b_gets_annes_send_to_a_once(target: Target) -> None:
    async with (
        ready_instances(target) as (a, b),
        httpx.AsyncClient() as http,
        open_events(b.base_url, user="Bob") as bob,
    ):
        assert bob.hello["instance"] != (await http.get(f"{a.base_url}/healthz")).json()["instance"]

        first = await send_confirmed(http, target, a.base_url, "Bob", {"text": "hi Bob"})
        with trio.fail_after(STEP_TIMEOUT):
            frame = await bob.receive()
        assert (frame["id"], frame["from"], frame["to"], frame["message"]) == (
            first,
            "Anne",
            "Bob",
            {"text": "hi Bob"},
        )
        # Once: the next frame is the next message, not a second copy.
        second = await send_confirmed(http, target, a.base_url, "Bob", "marker")
        await assert_next_message(bob, second, "marker")


@every_target
async def test_bob_on_a_and_b_gets_each_message_once_on_each_connection(
    target: Target,
) -> None:
    async with (
        ready_instances(target) as (a, b),
        httpx.AsyncClient() as http,
        open_events(a.base_url, user="Bob") as bob_on_a,
        open_events(b.base_url, user="Bob") as bob_on_b,
    ):
        ids = [
            await send_confirmed(http, target, via.base_url, "Bob", n)
            for n, via in enumerate((a, b, a))
        ]
        for connection in (bob_on_a, bob_on_b):
            for n, message_id in enumerate(ids):
                await assert_next_message(connection, message_id, n)
        marker = await send_confirmed(http, target, b.base_url, "Bob", "marker")
        for connection in (bob_on_a, bob_on_b):
            await assert_next_message(connection, marker, "marker")


@every_target
async def test_carol_gets_only_what_is_sent_while_she_is_connected(target: Target) -> None:
    async with ready_instances(target) as (a, b), httpx.AsyncClient() as http:
        # Offline: 404 where the broker can tell, 202 accepted where it cannot.
        for instance in (a, b):
            await assert_offline_answer(http, target, instance.base_url, "Carol")

        async with open_events(b.base_url, user="Carol") as carol:
            # What was sent while she was offline is never delivered later:
            # the first frame she gets is the one sent after she came.
            message_id = await send_confirmed(http, target, a.base_url, "Carol", "hello!")
            await assert_next_message(carol, message_id, "hello!")

        if target.offline_is_404:
            # The server unbinds once it has seen the close: wait for that, bounded.
            await wait_until_offline(http, a.base_url, "Carol")
        await assert_offline_answer(http, target, b.base_url, "Carol")


@every_target
async def test_2000_messages_from_anne_reach_bob_across_instances_complete_in_order(
    target: Target,
) -> None:
    count = 2000
    # Bob's bounded queue must hold what can be in flight to him while the test
    # also reads Anne's acks; overflowing it is another test's subject.
    env = {"TRIOWS_SEND_QUEUE": str(count)}
    async with (
        ready_instances(target, env=env) as (a, b),
        open_events(b.base_url, user="Bob") as bob,
        open_events(a.base_url, user="Anne") as anne,
    ):
        received: list[dict[str, Any]] = []
        acks: list[dict[str, Any]] = []
        with trio.fail_after(LONG_TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(collect_frames, bob, count, "message", received)
                nursery.start_soon(collect_frames, anne, count, "ack", acks)
                for n in range(count):
                    await anne.send("Bob", n, ref=str(n))

        assert [ack["status"] for ack in acks] == [target.confirmed_as] * count
        assert {frame["from"] for frame in received} == {"Anne"}
        assert [frame["message"] for frame in received] == list(range(count))


@targets_with_an_outage
async def test_broker_outage_gives_503_keeps_sockets_open_and_resumes_without_restart(
    target: Target,
) -> None:
    assert target.outage is not None
    async with (
        ready_instances(target) as (a, b),
        httpx.AsyncClient() as http,
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
            await send_confirmed(http, target, a.base_url, "Bob", "before")
            async with trio.open_nursery() as traffic:
                traffic.start_soon(keep_sending)
                traffic.start_soon(drain_bob)
                async with broker_outage(target.outage):
                    await outage_seen.wait()
                    for instance in (a, b):
                        await wait_for_status(f"{instance.base_url}/readyz", 503)
                    assert bob.close_code is None
                for instance in (a, b):
                    await wait_for_status(f"{instance.base_url}/readyz", 200, LONG_TIMEOUT)
                traffic.cancel_scope.cancel()
        assert {202, 503} <= statuses

        # Same processes, same socket: B restored Bob's subscription itself.
        assert a.process.returncode is None and b.process.returncode is None
        assert bob.close_code is None
        after = await send_confirmed(http, target, a.base_url, "Bob", "after the outage")
        with trio.fail_after(STEP_TIMEOUT):
            while (frame := await bob.receive())["message"] == "traffic":
                pass
        assert (frame["id"], frame["message"]) == (after, "after the outage")
