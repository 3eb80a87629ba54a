"""Sessions held by a real broker (amqp091 on RabbitMQ), through real ``triows serve`` processes.

The window (the queue's ``x-expires``), the bounds (``x-max-length``,
``reject-publish``), another user's token, and an event stream resumed by
``Last-Event-ID``. Drain and SIGKILL under traffic: tests/test_session_resume.py.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import open_websocket_url

from tests.brokers import BROKERS, require_broker
from tests.e2e import (
    TARGETS_BY_NAME,
    Target,
    ready_instances,
    serve_target,
    unique_exchange,
    wait_until_offline,
)
from tests.tcp_proxy import open_tcp_proxy
from tests.test_session_resume import Received, events_url, sender
from triows.auth import mint_token

TARGET = TARGETS_BY_NAME["amqp091-rabbitmq"]
# Where the broker-independent behaviours are checked on every backend that holds sessions.
SESSION_TARGETS = ["amqp091-rabbitmq", "amqp10-rabbitmq", "stomp-rabbitmq"]
STEP_TIMEOUT = 30
SECRET = "session-broker-secret-" + "x" * 48


def held(target: Target) -> set[str]:
    """What a send to a user whose session is held answers: routed or queued where the
    broker tells (amqp091), accepted where it cannot (RabbitMQ 3.x's AMQP 1.0 and STOMP)."""
    return {"routed", "queued"} if target.confirmed_as == "routed" else {target.confirmed_as}


async def hello_of(url: str, headers: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    """Connect, read the hello, and go away without a close frame (the session stays)."""
    async with open_websocket_url(url, extra_headers=headers) as socket:
        hello: dict[str, Any] = json.loads(await socket.get_message())
        # Gone without a close frame, as over a lost network.
        await socket._stream.aclose()  # type: ignore[attr-defined]
    return hello


async def test_a_session_left_unused_past_its_window_is_deleted_by_the_broker() -> None:
    await require_broker(TARGET.broker)
    env = {"TRIOWS_RESUME_WINDOW": "1"}
    async with ready_instances(TARGET, 1, env=env) as (a,), httpx.AsyncClient() as http:
        with trio.fail_after(STEP_TIMEOUT):
            token = (await hello_of(events_url(a.base_url, "Bob")))["session"]
            # Held while inside the window (202), gone (x-expires) once past it (404).
            assert (await send(http, a.base_url, "Bob", 1)).status_code == 202
            await wait_until_offline(http, a.base_url, "Bob")
            hello = await hello_of(events_url(a.base_url, "Bob", token))
            assert (hello["resumed"], hello["session"] != token) == (False, True)


async def test_a_client_that_closes_normally_ends_its_session_at_once() -> None:
    await require_broker(TARGET.broker)
    async with ready_instances(TARGET, 1) as (a,), httpx.AsyncClient() as http:
        with trio.fail_after(STEP_TIMEOUT):
            async with open_websocket_url(events_url(a.base_url, "Bob")) as socket:
                token = json.loads(await socket.get_message())["session"]
            # The session goes with the close frame (1000), long before its window (120 s).
            await wait_until_offline(http, a.base_url, "Bob")
            hello = await hello_of(events_url(a.base_url, "Bob", token))
            assert hello["resumed"] is False


async def test_a_full_session_makes_the_broker_refuse_and_the_sender_hears_so() -> None:
    await require_broker(TARGET.broker)
    env = {"TRIOWS_SESSION_MAX_MESSAGES": "2"}
    async with ready_instances(TARGET, 1, env=env) as (a,), httpx.AsyncClient() as http:
        with trio.fail_after(STEP_TIMEOUT):
            token = (await hello_of(events_url(a.base_url, "Bob")))["session"]
            answers = [(await send(http, a.base_url, "Bob", n)) for n in range(3)]
            assert [answer.status_code for answer in answers] == [202, 202, 503]
            # "routed" until the instance noticed the socket went, then "queued": held either way.
            assert {answer.json()["status"] for answer in answers[:2]} <= {"routed", "queued"}
            assert answers[2].json()["type"].endswith("/recipient-full")
            async with open_websocket_url(events_url(a.base_url, "Bob", token)) as socket:
                hello = json.loads(await socket.get_message())
                assert (hello["resumed"], hello["missed"]) == (True, 2)
                held = [json.loads(await socket.get_message())["message"] for _ in range(2)]
                assert held == [0, 1]


@pytest.mark.parametrize("name", SESSION_TARGETS)
async def test_another_users_token_resumes_nothing_of_theirs_on_the_broker(name: str) -> None:
    target = TARGETS_BY_NAME[name]
    await require_broker(target.broker)
    env = {"TRIOWS_SECRET": SECRET}
    anne, mallory = mint_token(SECRET, "Anne"), mint_token(SECRET, "Mallory")
    carol = {"Authorization": f"Bearer {mint_token(SECRET, 'Carol')}"}
    async with ready_instances(target, 2, env=env) as (a, b), httpx.AsyncClient() as http:
        with trio.fail_after(STEP_TIMEOUT):
            ws_a, ws_b = (i.base_url.replace("http", "ws") for i in (a, b))
            token = (await hello_of(f"{ws_a}/events?token={anne}"))["session"]
            sent = await http.post(
                f"{a.base_url}/send", json={"to": "Anne", "message": "secret"}, headers=carol
            )
            assert sent.json()["status"] in held(target)
            hello = await hello_of(f"{ws_b}/events?token={mallory}&session={token}")
            assert (hello["user"], hello["resumed"]) == ("Mallory", False)
            async with open_websocket_url(f"{ws_b}/events?token={anne}&session={token}") as socket:
                assert json.loads(await socket.get_message())["resumed"] is True
                assert json.loads(await socket.get_message())["message"] == "secret"


@pytest.mark.parametrize("name", SESSION_TARGETS)
async def test_an_event_stream_resumes_by_its_last_event_id_on_another_instance(name: str) -> None:
    target = TARGETS_BY_NAME[name]
    await require_broker(target.broker)
    async with ready_instances(target, 2) as (a, b), httpx.AsyncClient(timeout=30) as http:
        with trio.fail_after(STEP_TIMEOUT):
            headers = {"Accept": "text/event-stream"}
            last_id = None
            async with http.stream(
                "GET", f"{b.base_url}/events?user=Bob", headers=headers
            ) as stream:
                events = stream.aiter_lines()
                async for line in events:
                    if line.startswith("id: "):
                        last_id = line[4:]  # the hello's: <session>:0
                        break
                sent = await send(http, a.base_url, "Bob", "first")
                assert sent.json()["status"] in {"routed", target.confirmed_as}
                async for line in events:
                    if line.startswith("id: "):
                        last_id = line[4:]
                        break
            assert last_id is not None
            # The stream is cut; what is sent now waits in the session for the resume.
            answer = await send(http, a.base_url, "Bob", "gap")
            assert answer.status_code == 202
            resumed = {**headers, "Last-Event-ID": last_id}
            url = f"{a.base_url}/events?user=Bob"  # what EventSource asks for again
            async with http.stream("GET", url, headers=resumed) as stream:
                frames = [
                    json.loads(line[6:])
                    async for line in _data_lines(stream.aiter_lines(), count=2)
                ]
    hello, gap = frames
    assert (hello["resumed"], hello["user"]) == (True, "Bob")
    assert (gap["message"], gap["id"]) == ("gap", answer.json()["id"])


async def _data_lines(lines: Any, count: int) -> Any:
    seen = 0
    async for line in lines:
        if line.startswith("data: "):
            yield line
            seen += 1
            if seen == count:
                return


async def send(http: httpx.AsyncClient, base_url: str, to: str, message: object) -> httpx.Response:
    return await http.post(f"{base_url}/send", json={"to": to, "message": message})


async def test_on_garagemq_which_cannot_expire_a_queue_the_hello_says_not_resumable() -> None:
    garagemq = TARGETS_BY_NAME["amqp091-garagemq"]
    await require_broker(garagemq.broker)
    async with ready_instances(garagemq, 1) as (a,):
        with trio.fail_after(STEP_TIMEOUT):
            async with open_websocket_url(events_url(a.base_url, "Bob")) as socket:
                hello = json.loads(await socket.get_message())
    assert (hello["session"], hello["resumable"]) == (None, False)


async def test_a_session_rides_through_its_instance_losing_the_broker_with_nothing_twice() -> None:
    await require_broker(TARGET.broker)
    exchange = unique_exchange()
    received = Received()
    async with (
        open_tcp_proxy(BROKERS[TARGET.broker].port) as proxy,
        serve_target(TARGET, exchange) as a,
        serve_target(TARGET, exchange, broker_url=via(proxy.port)) as b,
        httpx.AsyncClient(timeout=30) as http,
    ):
        done = trio.Event()
        with trio.fail_after(STEP_TIMEOUT * 2):
            for instance in (a, b):
                await instance.wait_ready()
            async with (
                open_websocket_url(events_url(b.base_url, "Bob")) as socket,
                trio.open_nursery() as nursery,
            ):
                nursery.start_soon(received.read, socket)
                await received.until(lambda: bool(received.hellos))
                nursery.start_soon(sender, http, a.base_url, received, done)
                await received.until(lambda: len(received.frames) >= 50)
                proxy.cut()  # B's broker connection; it reconnects through the proxy
                await received.until(lambda: len(received.outcomes) >= 400)
                done.set()
                wanted = {message_id for _, message_id in received.outcomes}
                await received.until(lambda: wanted <= {f["id"] for f in received.frames})
                await trio.sleep(0.5)  # a duplicate would come now
                nursery.cancel_scope.cancel()
    assert [status for status, _ in received.outcomes if status != 202] == []
    ids = [frame["id"] for frame in received.frames]
    assert ids == [message_id for _, message_id in received.outcomes]
    assert [frame["seq"] for frame in received.frames] == list(range(1, len(ids) + 1))


def via(port: int) -> str:
    return TARGET.broker_url.replace(f":{BROKERS[TARGET.broker].port}", f":{port}")
