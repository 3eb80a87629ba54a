"""``triows.client.open_client``: the reconnecting client, on real ``triows serve`` processes."""

from __future__ import annotations

import json
import logging
import secrets
import signal
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

from tests.brokers import require_broker
from tests.e2e import STEP_TIMEOUT, TARGETS_BY_NAME, ready_instances
from tests.tcp_proxy import open_tcp_proxy
from triows.auth import mint_token
from triows.client import (
    ClientClosed,
    ConnectionLost,
    RequestRefused,
    TriowsClient,
    client_logger,
    open_client,
    open_events,
    post_send,
)
from triows.process import free_port, serve_instance

SECRET = secrets.token_urlsafe(48)


async def next_of_type(client: TriowsClient, kind: str) -> dict[str, Any]:
    """The next frame of type ``kind`` (a hang guard bounds the wait)."""
    with trio.fail_after(STEP_TIMEOUT):
        async for frame in client:
            if frame["type"] == kind:
                return frame
    raise AssertionError(f"the client ended before a {kind!r} frame")


async def test_the_client_surfaces_hello_and_receives_a_message_posted_to_it() -> None:
    async with serve_instance("memory") as server, httpx.AsyncClient() as http:
        async with open_client(server.base_url, user="Bob") as bob:
            assert bob.hello["type"] == "hello"
            assert bob.hello["user"] == "Bob"
            assert bob.instance == bob.hello["instance"]
            response = await post_send(http, server.base_url, "Bob", {"n": 1}, sender="Anne")
            assert response.status_code == 202
            frame = await next_of_type(bob, "message")
            assert (frame["from"], frame["message"]) == ("Anne", {"n": 1})
            assert frame["id"] == response.json()["id"]


async def test_send_returns_the_ack_and_the_message_reaches_the_recipient() -> None:
    async with serve_instance("memory") as server:
        async with (
            open_events(server.base_url, user="Bob") as bob,
            open_client(server.base_url, user="Anne") as anne,
        ):
            ack = await anne.send(to="Bob", message="hi Bob")
            assert ack["type"] == "ack"
            assert ack["status"] == "routed"
            frame = await bob.receive()
            assert (frame["from"], frame["message"], frame["id"]) == ("Anne", "hi Bob", ack["id"])


async def test_concurrent_sends_each_get_their_own_ack() -> None:
    async with serve_instance("memory") as server:
        async with (
            open_events(server.base_url, user="Bob") as bob,
            open_client(server.base_url, user="Anne") as anne,
        ):
            acks: dict[int, str] = {}

            async def send(number: int) -> None:
                acks[number] = (await anne.send(to="Bob", message=number))["id"]

            async with trio.open_nursery() as nursery:
                for number in range(10):
                    nursery.start_soon(send, number)
            received = {}
            for _ in range(10):
                frame = await bob.receive()
                received[frame["message"]] = frame["id"]
            assert received == acks


@pytest.mark.parametrize(
    ("to", "code"), [("Nobody", "offline"), ("not a name!", "invalid")], ids=["offline", "invalid"]
)
async def test_an_error_frame_raises_request_refused_with_its_code(to: str, code: str) -> None:
    async with serve_instance("memory") as server:
        async with open_client(server.base_url, user="Anne") as anne:
            with pytest.raises(RequestRefused) as refused:
                await anne.send(to=to, message="hello?")
            assert refused.value.code == code
            # The connection stays usable after a refused request.
            ack = await anne.send(to="Anne", message="still here")
            assert ack["status"] == "routed"


async def test_a_message_whose_encoded_frame_is_over_the_limit_raises_too_large() -> None:
    # The send frame is under the limit; the message frame the server would
    # publish (with id, from, ts) is over it.
    env = {"TRIOWS_MAX_MESSAGE_BYTES": "1024"}
    async with serve_instance("memory", env=env) as server:
        async with open_client(server.base_url, user="Anne") as anne:
            with pytest.raises(RequestRefused) as refused:
                await anne.send(to="Anne", message="x" * 950)
            assert refused.value.code == "too_large"


async def test_a_frame_over_the_limit_fails_its_send_and_the_client_reconnects() -> None:
    env = {"TRIOWS_MAX_MESSAGE_BYTES": "1024"}
    async with serve_instance("memory", env=env) as server:
        async with open_client(server.base_url, user="Anne") as anne:
            with pytest.raises(ConnectionLost, match="1009"):
                await anne.send(to="Anne", message="x" * 1500)
            event = await next_of_type(anne, "reconnected")
            assert event["instance"] == event["previous_instance"]
            assert (await anne.send(to="Anne", message="small"))["status"] == "routed"


async def test_send_takes_exactly_one_of_to_or_room() -> None:
    async with serve_instance("memory") as server:
        async with open_client(server.base_url, user="Anne") as anne:
            with pytest.raises(ValueError, match="exactly one"):
                await anne.send(to="Bob", room="general", message="x")
            with pytest.raises(ValueError, match="exactly one"):
                await anne.send(message="x")


async def test_bad_credentials_stop_the_client_at_once_with_the_handshake_status() -> None:
    async with serve_instance("memory", env={"TRIOWS_SECRET": SECRET}) as server:
        with pytest.raises(ClientClosed) as closed:
            async with open_client(server.base_url, token="not-a-token"):
                pass
        assert closed.value.code == 401


async def test_an_expired_token_ends_the_iteration_with_4401_and_no_reconnect() -> None:
    async with serve_instance("memory", env={"TRIOWS_SECRET": SECRET}) as server:
        token = mint_token(SECRET, "Bob", ttl=2)
        async with open_client(server.base_url, token=token) as bob:
            assert bob.hello["user"] == "Bob"
            with pytest.raises(ClientClosed) as closed, trio.fail_after(STEP_TIMEOUT):
                async for _ in bob:
                    pass
            assert closed.value.code == 4401
            with pytest.raises(ClientClosed):
                await bob.send(to="Bob", message="after the end")


async def test_an_unreachable_url_is_skipped_for_the_next_one() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    async with serve_instance("memory") as server:
        async with open_client([dead, server.base_url], user="Anne") as anne:
            assert anne.url == server.base_url
            assert (await anne.send(to="Anne", message="hi"))["status"] == "routed"


async def test_after_its_instance_is_killed_the_client_reconnects_to_another() -> None:
    # SIGKILL: the TCP connection drops without a close frame (1006).
    async with (
        serve_instance("memory") as first,
        serve_instance("memory") as second,
        httpx.AsyncClient() as http,
    ):
        async with open_client([first.base_url, second.base_url], user="Bob") as bob:
            lost = bob.instance
            first.process.send_signal(signal.SIGKILL)
            event = await next_of_type(bob, "reconnected")
            assert event["previous_instance"] == lost
            assert event["instance"] == bob.instance != lost
            assert event["url"] == second.base_url
            response = await post_send(http, second.base_url, "Bob", "after", sender="Anne")
            assert response.json()["status"] == "routed"
            frame = await next_of_type(bob, "message")
            assert frame["message"] == "after"


async def test_a_drained_instance_sends_the_client_to_the_other_and_messages_keep_arriving() -> (
    None
):
    target = TARGETS_BY_NAME["amqp091-rabbitmq"]
    await require_broker(target.broker)
    async with ready_instances(target, 2) as (first, second), httpx.AsyncClient() as http:
        async with (
            open_client([first.base_url, second.base_url], user="Bob") as bob,
            open_client(second.base_url, user="Anne") as anne,
        ):
            assert bob.url == first.base_url
            drained = bob.instance
            ack = await anne.send(to="Bob", message="before")
            assert ack["status"] == "routed"
            assert (await next_of_type(bob, "message"))["message"] == "before"
            # SIGTERM drains: 1012 to Bob, who reconnects to the other instance.
            first.terminate()
            event = await next_of_type(bob, "reconnected")
            assert event["previous_instance"] == drained
            assert event["instance"] == bob.instance != drained
            assert bob.url == second.base_url
            ack = await anne.send(to="Bob", message="after")
            assert ack["status"] == "routed"
            assert (await next_of_type(bob, "message"))["message"] == "after"
            # And Bob's own sends go out on the new connection.
            ack = await bob.send(to="Anne", message="back to you")
            frame = await next_of_type(anne, "message")
            assert (frame["from"], frame["id"]) == ("Bob", ack["id"])
            with trio.fail_after(STEP_TIMEOUT):
                await first.process.wait()
        del http


async def test_a_request_after_the_client_was_closed_raises_client_closed() -> None:
    async with serve_instance("memory") as server:
        async with open_client(server.base_url, user="Anne") as anne:
            pass
        with pytest.raises(ClientClosed):
            await anne.send(to="Anne", message="too late")


class RefusalSeen(logging.Handler):
    """Sets ``seen`` when the client logs a refused handshake."""

    def __init__(self, status: int) -> None:
        super().__init__()
        self.seen = trio.Event()
        self._text = f"handshake {status}"

    def emit(self, record: logging.LogRecord) -> None:
        if self._text in record.getMessage():
            self.seen.set()


async def test_a_full_instance_refusing_the_handshake_is_retried_until_it_has_room() -> None:
    refusal = RefusalSeen(503)
    client_logger.addHandler(refusal)
    try:
        async with serve_instance("memory", env={"TRIOWS_MAX_CONNECTIONS": "1"}) as server:
            connected = trio.Event()

            async def anne() -> None:
                async with open_client(server.base_url, user="Anne", reconnect_max=0.2) as client:
                    assert client.hello["user"] == "Anne"
                    connected.set()

            async with trio.open_nursery() as nursery:
                async with open_events(server.base_url, user="Bob"):
                    nursery.start_soon(anne)
                    with trio.fail_after(STEP_TIMEOUT):
                        await refusal.seen.wait()
                    assert not connected.is_set()
                # Bob's socket is closed: the instance has room, and Anne gets in.
                with trio.fail_after(STEP_TIMEOUT):
                    await connected.wait()
    finally:
        client_logger.removeHandler(refusal)


async def test_join_send_to_the_room_and_leave_against_the_server() -> None:
    async with serve_instance("memory") as server:
        async with (
            open_client(server.base_url, user="Anne") as anne,
            open_client(server.base_url, user="Bob") as bob,
        ):
            for member in (anne, bob):
                joined = await member.join("general")
                assert (joined["type"], joined["room"]) == ("joined", "general")
                assert member.rooms == {"general"}
            ack = await anne.send(room="general", message="hi all")
            assert ack["status"] == "routed"
            for member in (anne, bob):
                frame = await next_of_type(member, "message")
                assert (frame["id"], frame["from"], frame["room"], frame["to"]) == (
                    ack["id"],
                    "Anne",
                    "general",
                    None,
                )
            for member in (anne, bob):
                assert (await member.leave("general"))["type"] == "left"
                assert member.rooms == frozenset()
            with pytest.raises(RequestRefused) as refused:
                await anne.send(room="general", message="anyone?")
            assert refused.value.code == "offline"


async def test_a_join_the_token_does_not_allow_raises_forbidden() -> None:
    async with serve_instance("memory", env={"TRIOWS_SECRET": SECRET}) as server:
        token = mint_token(SECRET, "Anne", rooms=("team-*",))
        async with open_client(server.base_url, token=token) as anne:
            assert (await anne.join("team-a"))["type"] == "joined"
            with pytest.raises(RequestRefused) as refused:
                await anne.join("general")
            assert refused.value.code == "forbidden"
            assert anne.rooms == {"team-a"}


async def test_after_a_reconnect_the_client_is_in_its_rooms_again() -> None:
    async with (
        serve_instance("memory") as first,
        serve_instance("memory") as second,
        httpx.AsyncClient() as http,
    ):
        async with open_client([first.base_url, second.base_url], user="Bob") as bob:
            await bob.join("general")
            first.process.send_signal(signal.SIGKILL)
            event = await next_of_type(bob, "reconnected")
            assert event["rooms"] == ["general"] and event["rooms_failed"] == {}
            response = await post_send(
                http, second.base_url, None, "again", sender="Anne", room="general"
            )
            assert response.json()["status"] == "routed"
            frame = await next_of_type(bob, "message")
            assert (frame["room"], frame["message"]) == ("general", "again")


async def test_messages_sent_while_the_clients_instance_drains_arrive_once_after_it_resumes() -> (
    None
):
    # Bob's URLs: B, then a gate in front of A that stays shut until the test
    # has sent while he is away, so that the gap is certain, not a race.
    target = TARGETS_BY_NAME["amqp091-rabbitmq"]
    await require_broker(target.broker)
    gate = free_port()
    gate_url = f"http://127.0.0.1:{gate}"
    async with ready_instances(target, 2) as (a, b), httpx.AsyncClient() as http:
        async with open_client([b.base_url, gate_url], user="Bob", reconnect_max=0.2) as bob:
            await bob.join("general")
            before = await post_send(http, a.base_url, "Bob", "before", sender="Anne")
            assert before.json()["status"] == "routed"
            assert (await next_of_type(bob, "message"))["id"] == before.json()["id"]
            drained = bob.instance
            b.terminate()
            with trio.fail_after(STEP_TIMEOUT):
                await b.process.wait()
            # B closed Bob's socket with 1012 and exited: his session waits at the broker.
            sent = []
            for n in range(3):
                response = await post_send(http, a.base_url, "Bob", f"away {n}", sender="Anne")
                assert (response.status_code, response.json()["status"]) == (202, "queued")
                sent.append(response.json()["id"])
            response = await post_send(
                http, a.base_url, None, "general, away", sender="Anne", room="general"
            )
            assert response.status_code == 202
            sent.append(response.json()["id"])
            async with open_client(a.base_url, user="Anne") as anne:
                ack = await anne.send(to="Bob", message="from Anne's client, away")
                assert ack["status"] == "queued"
                sent.append(ack["id"])
            async with open_tcp_proxy(urlsplit(a.base_url).port or 80, port=gate):
                event = await next_of_type(bob, "reconnected")
                assert (event["previous_instance"], event["url"]) == (drained, gate_url)
                assert (event["resumed"], event["missed"]) == (True, len(sent))
                assert (event["rooms"], event["rooms_failed"]) == (["general"], {})
                live = await post_send(http, a.base_url, "Bob", "live", sender="Anne")
                assert live.json()["status"] == "routed"
                frames = [await next_of_type(bob, "message") for _ in range(len(sent) + 1)]
                # The missed ones first, in order, none seen before; then the live one.
                assert [frame["id"] for frame in frames] == [*sent, live.json()["id"]]
                # The server joined the room again: the client did not ask.
                room = await post_send(
                    http, a.base_url, None, "general, live", sender="Anne", room="general"
                )
                assert room.json()["status"] == "routed"
                frame = await next_of_type(bob, "message")
                assert (frame["id"], frame["room"]) == (room.json()["id"], "general")
                assert bob.reconnects == 1
                await bob.aclose()


async def test_a_client_that_cannot_resume_says_so_and_joins_its_rooms_itself() -> None:
    # Two memory instances share nothing: the session of the killed one is unknown to the other.
    async with serve_instance("memory") as first, serve_instance("memory") as second:
        async with open_client([first.base_url, second.base_url], user="Bob") as bob:
            await bob.join("general")
            first_session = bob.session
            assert first_session is not None
            first.process.send_signal(signal.SIGKILL)
            event = await next_of_type(bob, "reconnected")
            assert (event["resumed"], event["missed"]) == (False, 0)
            assert (event["rooms"], event["rooms_failed"]) == (["general"], {})
            assert bob.session not in (None, first_session)
            assert bob.cursor is None


async def test_aclose_closes_with_1000_which_ends_the_session_at_the_server() -> None:
    # The server is played here, so that the close code the client sends is what is read.
    close_codes: list[int] = []
    closed = trio.Event()

    async def server(request: WebSocketRequest) -> None:
        websocket = await request.accept()
        hello = {"type": "hello", "user": "Bob", "instance": "i", "protocol": 1}
        await websocket.send_message(json.dumps({**hello, "session": "s" * 22, "resumed": False}))
        try:
            while True:
                await websocket.get_message()
        except ConnectionClosed as connection_closed:
            assert connection_closed.reason is not None
            close_codes.append(connection_closed.reason.code)
            closed.set()

    port = free_port()
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_websocket, server, "127.0.0.1", port, None)
        async with open_client(f"http://127.0.0.1:{port}", user="Bob") as bob:
            await bob.aclose()
            await bob.aclose()
            with trio.fail_after(STEP_TIMEOUT):
                await closed.wait()
            assert close_codes == [1000]
            with pytest.raises(StopAsyncIteration):
                await bob.receive()
            with pytest.raises(ClientClosed):
                await bob.send(to="Anne", message="after aclose")
        nursery.cancel_scope.cancel()
