"""``open_client`` and ``post_send`` under asyncio and under Trio, against real ``triows serve``.

Each test runs its client code with ``anyio.run`` on the event loop it is
given. The servers run in a Trio loop of their own (an AnyIO blocking portal
in a thread), so that the loop under test runs nothing but the client.
"""

from __future__ import annotations

import logging
import secrets
import signal
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any
from urllib.parse import urlsplit

import anyio
import anyio.to_thread
import httpx
import pytest
import trio
from anyio.from_thread import BlockingPortal, start_blocking_portal

from tests.brokers import require_broker
from tests.e2e import STEP_TIMEOUT, TARGETS_BY_NAME, ready_instances
from tests.tcp_proxy import open_tcp_proxy
from triows.auth import mint_token
from triows.client import (
    ClientClosed,
    RequestRefused,
    RequestTimeout,
    TriowsClient,
    open_client,
    post_send,
)
from triows.process import Instance, free_port, serve_instance

EVENT_LOOPS = pytest.mark.parametrize("event_loop", ["asyncio", "trio"])
SECRET = secrets.token_urlsafe(48)


@contextmanager
def instances(count: int, env: dict[str, str] | None = None) -> Iterator[list[Instance]]:
    """``count`` instances on the memory backend, served from a Trio loop in another thread."""
    with start_blocking_portal(backend="trio") as portal, ExitStack() as stack:
        yield [
            stack.enter_context(
                portal.wrap_async_context_manager(serve_instance("memory", env=env))
            )
            for _ in range(count)
        ]


async def next_of_type(client: TriowsClient, kind: str) -> dict[str, Any]:
    """The next frame of type ``kind`` (a hang guard bounds the wait)."""
    with anyio.fail_after(STEP_TIMEOUT):
        async for frame in client:
            if frame["type"] == kind:
                return frame
    raise AssertionError(f"the client ended before a {kind!r} frame")


@EVENT_LOOPS
def test_the_client_connects_and_receives_a_message_posted_over_http(event_loop: str) -> None:
    async def scenario(base_url: str) -> None:
        async with open_client(base_url, user="Bob") as bob, httpx.AsyncClient() as http:
            assert (bob.hello["type"], bob.hello["user"]) == ("hello", "Bob")
            response = await post_send(http, base_url, "Bob", {"n": 1}, sender="Anne")
            assert response.status_code == 202
            frame = await next_of_type(bob, "message")
            assert (frame["from"], frame["message"]) == ("Anne", {"n": 1})
            assert frame["id"] == response.json()["id"]

    with instances(1) as (server,):
        anyio.run(scenario, server.base_url, backend=event_loop)


@EVENT_LOOPS
def test_send_returns_the_ack_and_a_refusal_raises_request_refused(event_loop: str) -> None:
    async def scenario(base_url: str) -> None:
        async with (
            open_client(base_url, user="Bob") as bob,
            open_client(base_url, user="Anne") as anne,
        ):
            ack = await anne.send(to="Bob", message="hi Bob")
            assert (ack["type"], ack["status"]) == ("ack", "routed")
            frame = await next_of_type(bob, "message")
            assert (frame["from"], frame["message"], frame["id"]) == ("Anne", "hi Bob", ack["id"])
            with pytest.raises(RequestRefused) as refused:
                await anne.send(to="Nobody", message="anyone?")
            assert refused.value.code == "offline"

    with instances(1) as (server,):
        anyio.run(scenario, server.base_url, backend=event_loop)


@EVENT_LOOPS
def test_concurrent_sends_from_one_client_each_get_their_own_ack(event_loop: str) -> None:
    async def scenario(base_url: str) -> None:
        async with (
            open_client(base_url, user="Bob") as bob,
            open_client(base_url, user="Anne") as anne,
        ):
            acks: dict[int, str] = {}

            async def send(number: int) -> None:
                acks[number] = (await anne.send(to="Bob", message=number))["id"]

            async with anyio.create_task_group() as tasks:
                for number in range(10):
                    tasks.start_soon(send, number)
            received = {}
            for _ in range(10):
                frame = await next_of_type(bob, "message")
                received[frame["message"]] = frame["id"]
            assert received == acks

    with instances(1) as (server,):
        anyio.run(scenario, server.base_url, backend=event_loop)


@EVENT_LOOPS
def test_join_send_to_the_room_and_leave(event_loop: str) -> None:
    async def scenario(base_url: str) -> None:
        async with (
            open_client(base_url, user="Anne") as anne,
            open_client(base_url, user="Bob") as bob,
        ):
            for member in (anne, bob):
                assert (await member.join("general"))["type"] == "joined"
            ack = await anne.send(room="general", message="hi all")
            for member in (anne, bob):
                frame = await next_of_type(member, "message")
                assert (frame["id"], frame["from"], frame["room"]) == (ack["id"], "Anne", "general")
            for member in (anne, bob):
                assert (await member.leave("general"))["type"] == "left"
                assert member.rooms == frozenset()
            with pytest.raises(RequestRefused) as refused:
                await anne.send(room="general", message="anyone?")
            assert refused.value.code == "offline"

    with instances(1) as (server,):
        anyio.run(scenario, server.base_url, backend=event_loop)


@EVENT_LOOPS
def test_a_refused_token_stops_the_client_with_401_and_the_servers_reason(event_loop: str) -> None:
    async def scenario(base_url: str) -> None:
        with pytest.raises(ClientClosed) as closed:
            async with open_client(base_url, token="not-a-token"):
                pass
        assert closed.value.code == 401
        # The body of the refusal says why, for the log of whoever holds the token.
        assert "token" in closed.value.reason.lower()
        token = mint_token(SECRET, "Bob")
        async with open_client(base_url, token=token) as bob:
            assert bob.hello["user"] == "Bob"

    with instances(1, env={"TRIOWS_SECRET": SECRET}) as (server,):
        anyio.run(scenario, server.base_url, backend=event_loop)


@EVENT_LOOPS
def test_after_a_drain_the_client_reconnects_to_the_next_url_and_rejoins_its_rooms(
    event_loop: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="triows.client")

    async def scenario(first: Instance, second: Instance) -> None:
        async with open_client([first.base_url, second.base_url], user="Bob") as bob:
            await bob.join("general")
            drained = bob.instance
            # SIGTERM drains the instance: it closes Bob's socket with 1012.
            first.terminate()
            event = await next_of_type(bob, "reconnected")
            assert (event["previous_instance"], event["url"]) == (drained, second.base_url)
            assert event["instance"] == bob.instance != drained
            assert (event["rooms"], event["rooms_failed"]) == (["general"], {})
            async with httpx.AsyncClient() as http:
                response = await post_send(
                    http, second.base_url, None, "again", sender="Anne", room="general"
                )
            assert response.json()["status"] == "routed"
            frame = await next_of_type(bob, "message")
            assert (frame["room"], frame["message"]) == ("general", "again")
            ack = await bob.send(to="Bob", message="a note to self")
            assert ack["status"] == "routed"

    with instances(2) as (first, second):
        anyio.run(scenario, first, second, backend=event_loop)
    assert "triows client disconnected (1012)" in caplog.text


@EVENT_LOOPS
def test_a_message_over_max_message_size_closes_with_1009_and_the_client_reconnects(
    event_loop: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="triows.client")

    async def scenario(base_url: str) -> None:
        async with open_client(base_url, user="Bob", max_message_size=1024) as bob:
            async with httpx.AsyncClient() as http:
                await post_send(http, base_url, "Bob", "x" * 2048, sender="Anne")
                event = await next_of_type(bob, "reconnected")
                assert event["previous_instance"] == event["instance"]
                await post_send(http, base_url, "Bob", "small", sender="Anne")
            assert (await next_of_type(bob, "message"))["message"] == "small"

    with instances(1) as (server,):
        anyio.run(scenario, server.base_url, backend=event_loop)
    assert "triows client disconnected (1009)" in caplog.text


@EVENT_LOOPS
def test_a_request_the_server_does_not_answer_raises_a_timeout_error(event_loop: str) -> None:
    async def scenario(server: Instance) -> None:
        async with open_client(server.base_url, user="Anne", request_timeout=0.5) as anne:
            # A stopped process holds the socket open and answers nothing.
            server.process.send_signal(signal.SIGSTOP)
            try:
                with pytest.raises(RequestTimeout) as timed_out:
                    await anne.send(to="Anne", message="anyone?")
            finally:
                server.process.send_signal(signal.SIGCONT)
            # What asyncio code catches, and what Trio code written for trio.fail_after catches.
            assert isinstance(timed_out.value, TimeoutError)
            assert isinstance(timed_out.value, trio.TooSlowError)
            assert (await anne.send(to="Anne", message="back"))["status"] == "routed"

    with instances(1) as (server,):
        anyio.run(scenario, server, backend=event_loop)


@EVENT_LOOPS
def test_messages_sent_while_the_client_was_away_arrive_once_after_it_resumes(
    event_loop: str,
) -> None:
    # Two amqp091 instances; Bob's URLs are B, then a gate in front of A that the
    # test opens only once it has sent while he is away.
    target = TARGETS_BY_NAME["amqp091-rabbitmq"]
    gate = free_port()

    async def scenario(a: Instance, b: Instance, portal: BlockingPortal, stack: ExitStack) -> None:
        gate_url = f"http://127.0.0.1:{gate}"
        async with (
            open_client([b.base_url, gate_url], user="Bob", reconnect_max=0.2) as bob,
            httpx.AsyncClient() as http,
        ):
            drained = bob.instance
            b.terminate()
            await anyio.to_thread.run_sync(portal.call, b.process.wait)
            sent = []
            for n in range(3):
                response = await post_send(http, a.base_url, "Bob", n, sender="Anne")
                assert response.json()["status"] == "queued"
                sent.append(response.json()["id"])
            gate_to_a = portal.wrap_async_context_manager(
                open_tcp_proxy(urlsplit(a.base_url).port or 80, port=gate)
            )
            await anyio.to_thread.run_sync(stack.enter_context, gate_to_a)
            event = await next_of_type(bob, "reconnected")
            assert (event["previous_instance"], event["url"]) == (drained, gate_url)
            assert (event["resumed"], event["missed"]) == (True, len(sent))
            live = await post_send(http, a.base_url, "Bob", "live", sender="Anne")
            frames = [await next_of_type(bob, "message") for _ in range(len(sent) + 1)]
            assert [frame["id"] for frame in frames] == [*sent, live.json()["id"]]

    with start_blocking_portal(backend="trio") as portal, ExitStack() as stack:
        portal.call(require_broker, target.broker)
        a, b = stack.enter_context(portal.wrap_async_context_manager(ready_instances(target, 2)))
        anyio.run(scenario, a, b, portal, stack, backend=event_loop)
