"""Real ``triows serve`` processes routing through each real broker (docs/reliability.md).

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
from triows.auth import mint_token
from triows.client import EventsClient, open_events, post_send
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
async def test_thousands_of_messages_from_anne_reach_bob_across_instances_complete_in_order(
    target: Target,
) -> None:
    # Anne's socket has one send in flight at a time, and GarageMQ confirms
    # each about 20 ms late: fewer there.
    count = 500 if target.broker == "garagemq" else 2000
    env = {
        # Bob's bounded queue must hold what can be in flight to him while the
        # test also reads Anne's acks; overflowing it is another test's subject.
        "TRIOWS_SEND_QUEUE": str(count),
        # Not paced at the default 100 a second: pacing is another test's subject.
        "TRIOWS_SEND_RATE": "100000",
    }
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
        if target.offline_is_404:
            # amqp091: the sessions are consumed (and bound) again before /readyz.
            after = await send_confirmed(http, target, a.base_url, "Bob", "after the outage")
            with trio.fail_after(STEP_TIMEOUT):
                while (frame := await bob.receive())["message"] == "traffic":
                    pass
            assert (frame["id"], frame["message"]) == (after, "after the outage")
        else:
            # STOMP and AMQP 1.0 sessions have connections of their own, which
            # bind their queues again after a broker restart (the exchange went
            # with it) on their own time, and their sends answer "accepted"
            # whether routed or not: delivery resumes, soon after /readyz.
            with trio.fail_after(LONG_TIMEOUT):
                arrived = False
                while not arrived:
                    await send_confirmed(http, target, a.base_url, "Bob", "after")
                    with trio.move_on_after(1):
                        while (await bob.receive())["message"] != "after":
                            pass
                        arrived = True


# Rooms (docs/protocol.md): a room's members spread over the instances.

ROOM_SECRET = "rooms-e2e-secret-" + "x" * 48


async def join(client: EventsClient, room: str) -> None:
    """Join ``room`` and wait for ``joined`` (sent once the subscription is in place)."""
    await client.join(room, ref=f"join-{room}")
    with trio.fail_after(STEP_TIMEOUT):
        answer = await client.receive()
    assert answer == {"type": "joined", "ref": f"join-{room}", "room": room}, answer


async def send_to_room_confirmed(
    http: httpx.AsyncClient, target: Target, base_url: str, room: str, message: Any
) -> str:
    """Anne's ``POST /send`` to ``room``; assert the confirmed 202; return the message id."""
    response = await post_send(http, base_url, None, message, sender="Anne", room=room)
    assert response.status_code == 202, response.text
    assert response.json()["status"] == target.confirmed_as
    message_id: str = response.json()["id"]
    return message_id


async def assert_next_room_message(
    client: EventsClient, message_id: str, room: str, message: Any
) -> None:
    with trio.fail_after(STEP_TIMEOUT):
        frame = await client.receive()
    assert (frame["type"], frame["id"], frame["room"], frame["to"], frame["message"]) == (
        "message",
        message_id,
        room,
        None,
        message,
    ), frame


@every_target
async def test_room_members_on_a_and_b_get_each_room_message_once_on_each_socket(
    target: Target,
) -> None:
    async with (
        ready_instances(target) as (a, b),
        httpx.AsyncClient() as http,
        open_events(a.base_url, user="Anne") as anne_on_a,
        open_events(a.base_url, user="Bob") as bob_on_a,
        open_events(b.base_url, user="Bob") as bob_on_b,
        open_events(b.base_url, user="Carol") as carol_on_b,
    ):
        members = (anne_on_a, bob_on_a, bob_on_b)
        for member in members:
            await join(member, "general")
        ids = [
            await send_to_room_confirmed(http, target, via.base_url, "general", n)
            for n, via in enumerate((a, b, a))
        ]
        for member in members:
            for n, message_id in enumerate(ids):
                await assert_next_room_message(member, message_id, "general", n)

        # A member sending over its socket: acked as for users, and it gets its own message.
        await anne_on_a.send(None, "from Anne", ref="s", room="general")
        with trio.fail_after(STEP_TIMEOUT):
            frames = [await anne_on_a.receive(), await anne_on_a.receive()]
        ack = next(frame for frame in frames if frame["type"] == "ack")
        assert ack["status"] == target.confirmed_as
        assert [frame["id"] for frame in frames if frame["type"] == "message"] == [ack["id"]]
        for member in (bob_on_a, bob_on_b):
            await assert_next_room_message(member, ack["id"], "general", "from Anne")

        # Once: the next frame is the next message, not a second copy; Carol
        # (in no room) gets only her own.
        marker = await send_to_room_confirmed(http, target, b.base_url, "general", "marker")
        for member in members:
            await assert_next_room_message(member, marker, "general", "marker")
        direct = await send_confirmed(http, target, a.base_url, "Carol", "direct")
        await assert_next_message(carol_on_b, direct, "direct")


@every_target
async def test_leaving_or_closing_stops_room_delivery_and_an_empty_room_is_offline(
    target: Target,
) -> None:
    async with ready_instances(target) as (a, b), httpx.AsyncClient() as http:
        async with open_events(b.base_url, user="Bob") as bob:
            async with open_events(b.base_url, user="Carol") as carol:
                await join(bob, "general")
                await join(carol, "general")
                first = await send_to_room_confirmed(http, target, a.base_url, "general", 1)
                for member in (bob, carol):
                    await assert_next_room_message(member, first, "general", 1)

                await bob.leave("general", ref="l")
                with trio.fail_after(STEP_TIMEOUT):
                    assert await bob.receive() == {"type": "left", "ref": "l", "room": "general"}
                second = await send_to_room_confirmed(http, target, a.base_url, "general", 2)
                await assert_next_room_message(carol, second, "general", 2)
                # Bob left: the next frame he gets is a direct message sent after the room's.
                direct = await send_confirmed(http, target, a.base_url, "Bob", "direct")
                await assert_next_message(bob, direct, "direct")

            # Carol's socket closed: the room has no member anywhere.
            response = await post_send(http, a.base_url, None, 3, sender="Anne", room="general")
            if target.offline_is_404:
                with trio.fail_after(STEP_TIMEOUT):
                    # The server leaves the room once it has seen the close: wait for that.
                    while response.status_code != 404:
                        await trio.sleep(POLL_INTERVAL)
                        response = await post_send(
                            http, a.base_url, None, 3, sender="Anne", room="general"
                        )
                assert "room general" in response.json()["detail"]
            else:
                assert response.json()["status"] == "accepted"
            direct = await send_confirmed(http, target, a.base_url, "Bob", "still here")
            await assert_next_message(bob, direct, "still here")


@every_target
async def test_a_token_without_the_room_cannot_join_or_send_to_it(target: Target) -> None:
    env = {"TRIOWS_SECRET": ROOM_SECRET}
    anne_token = mint_token(ROOM_SECRET, "Anne", rooms=("team-*",))
    mallory_token = mint_token(ROOM_SECRET, "Mallory", rooms=("general",))
    async with (
        ready_instances(target, env=env) as (a, b),
        httpx.AsyncClient() as http,
        open_events(a.base_url, token=anne_token) as anne,
        open_events(b.base_url, token=mallory_token) as mallory,
    ):
        await join(anne, "team-a")
        await mallory.join("team-a", ref="j")
        with trio.fail_after(STEP_TIMEOUT):
            refused = await mallory.receive()
        assert (refused["type"], refused["code"], refused["ref"]) == ("error", "forbidden", "j")
        await mallory.send(None, "let me in", ref="s", room="team-a")
        with trio.fail_after(STEP_TIMEOUT):
            refused = await mallory.receive()
        assert (refused["type"], refused["code"], refused["ref"]) == ("error", "forbidden", "s")
        response = await post_send(http, b.base_url, None, "x", token=mallory_token, room="team-a")
        assert response.status_code == 403, response.text

        # What Anne gets next is the message she sent herself, over the other instance.
        response = await post_send(http, b.base_url, None, "ok", token=anne_token, room="team-a")
        assert response.status_code == 202, response.text
        assert response.json()["status"] == target.confirmed_as
        await assert_next_room_message(anne, response.json()["id"], "team-a", "ok")
