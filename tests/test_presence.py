"""Presence (docs/protocol.md#presence) on one instance, memory backend.

Across instances on every broker: tests/test_presence_instances.py.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from quart.typing import TestClientProtocol as QuartClient

from tests.conftest import close_normally, serving
from triows.auth import mint_token
from triows.metrics import Metrics
from triows.presence import EVENTS_KEY_PREFIX, PEERS_KEY, QUERY_KEY, REPLY_KEY_PREFIX
from triows.protocol import (
    InvalidSendFrame,
    PresenceRequest,
    parse_client_frame,
    presence_event_frame,
)
from triows.router import Router
from triows.settings import Settings

SECRET = "presence-secret-" + "x" * 64


async def receive(socket: Any) -> dict[str, Any]:
    frame: dict[str, Any] = json.loads(await socket.receive())
    return frame


async def join(socket: Any, room: str) -> None:
    await socket.send(json.dumps({"type": "join", "room": room}))
    assert (await receive(socket))["type"] == "joined"


async def presence(client: QuartClient, **query: str) -> tuple[int, dict[str, Any]]:
    response = await client.get("/presence", query_string=query)
    return response.status_code, await response.get_json()


async def next_event(socket: Any) -> dict[str, Any]:
    """The next presence event on ``socket`` (other frames before it are skipped)."""
    while True:
        frame = await receive(socket)
        if frame["type"] == "presence" and "ref" not in frame:
            return frame


async def answer_to(socket: Any, ref: str) -> dict[str, Any]:
    """The frame that answers ``ref`` (presence events before it are skipped)."""
    while True:
        frame = await receive(socket)
        if frame.get("ref") == ref:
            return frame


@asynccontextmanager
async def watching(client: QuartClient, room: str) -> AsyncIterator[Any]:
    """Anne's socket, with presence events, in ``room`` (her own ``joined`` read)."""
    async with client.websocket("/events?user=Anne&presence=1") as anne:
        await receive(anne)
        await join(anne, room)
        assert await next_event(anne) == {"type": "presence", "room": room, "joined": "Anne"}
        yield anne


# -- parsing ---------------------------------------------------------------------


def test_a_presence_frame_asks_about_a_user_or_a_room() -> None:
    assert parse_client_frame('{"type":"presence","user":"Bob","ref":"1"}') == PresenceRequest(
        "Bob", None, "1"
    )
    assert parse_client_frame('{"type":"presence","room":"general"}') == PresenceRequest(
        None, "general", None
    )


@pytest.mark.parametrize(
    "fields", ['"user":"Bob","room":"general"', '"ref":"r"', '"user":"a/b"', '"room":"#"']
)
def test_a_presence_frame_about_both_neither_or_a_bad_name_is_invalid(fields: str) -> None:
    with pytest.raises(InvalidSendFrame):
        parse_client_frame(f'{{"type":"presence",{fields}}}')


# -- HTTP ------------------------------------------------------------------------


async def test_a_user_is_online_while_a_connection_of_theirs_is_open(client: QuartClient) -> None:
    assert await presence(client, user="Bob") == (
        200,
        {"user": "Bob", "online": False, "connections": 0, "complete": True},
    )
    async with client.websocket("/events?user=Bob") as one, client.websocket("/events?user=Bob"):
        await receive(one)
        status, answer = await presence(client, user="Bob")
        assert (status, answer["online"], answer["connections"]) == (200, True, 2)
        await close_normally(one)
    assert (await presence(client, user="Bob"))[1]["online"] is False


async def test_a_room_lists_its_members_once_each(client: QuartClient) -> None:
    async with (
        client.websocket("/events?user=Bob") as bob,
        client.websocket("/events?user=Bob") as bob_again,
        client.websocket("/events?user=Anne") as anne,
    ):
        for socket in (bob, bob_again, anne):
            await receive(socket)
            await join(socket, "general")
        assert await presence(client, room="general") == (
            200,
            {"room": "general", "users": ["Anne", "Bob"], "complete": True, "truncated": False},
        )
        assert (await presence(client, room="other"))[1]["users"] == []


async def test_a_room_answer_lists_at_most_the_bound_and_says_it_is_cut() -> None:
    async with serving(presence_max_users=2) as client:
        sockets = [client.websocket(f"/events?user=U{n}") for n in range(3)]
        async with sockets[0] as a, sockets[1] as b, sockets[2] as c:
            for socket in (a, b, c):
                await receive(socket)
                await join(socket, "general")
            _, answer = await presence(client, room="general")
            assert (answer["users"], answer["truncated"]) == (["U0", "U1"], True)


@pytest.mark.parametrize(
    "query",
    [{}, {"user": "Bob", "room": "general"}, {"user": "a/b"}, {"room": "#"}],
    ids=["neither", "both", "bad-user", "bad-room"],
)
async def test_a_presence_query_about_both_neither_or_a_bad_name_is_400(
    client: QuartClient, query: dict[str, str]
) -> None:
    status, problem = await presence(client, **query)
    assert status == 400 and problem["status"] == 400


async def test_presence_takes_the_credentials_of_send_and_the_room_claim() -> None:
    only_team = mint_token(SECRET, "Anne", rooms=("team",))
    headers = {"Authorization": f"Bearer {only_team}"}
    async with serving(secret=SECRET) as client:
        response = await client.get("/presence", query_string={"user": "Bob"})
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        response = await client.get("/presence", query_string={"room": "team"}, headers=headers)
        assert response.status_code == 200
        response = await client.get("/presence", query_string={"room": "other"}, headers=headers)
        assert response.status_code == 403
        assert (await response.get_json())["type"].endswith("/forbidden")


async def test_presence_queries_are_paced_per_user_http_and_websocket_together() -> None:
    token = mint_token(SECRET, "Anne")
    headers = {"Authorization": f"Bearer {token}"}
    async with serving(secret=SECRET, presence_rate=0.1, presence_burst=2) as client:
        response = await client.get("/presence", query_string={"user": "Bob"}, headers=headers)
        assert response.status_code == 200
        async with client.websocket(f"/events?token={token}") as anne:
            await receive(anne)
            await anne.send(json.dumps({"type": "presence", "user": "Bob", "ref": "p"}))
            assert (await answer_to(anne, "p"))["online"] is False
            await anne.send(json.dumps({"type": "presence", "user": "Bob", "ref": "q"}))
            refused = await answer_to(anne, "q")
            assert (refused["type"], refused["ref"], refused["code"]) == (
                "error",
                "q",
                "rate_limited",
            )
        response = await client.get("/presence", query_string={"user": "Bob"}, headers=headers)
        assert response.status_code == 429 and int(response.headers["retry-after"]) >= 1


async def test_presence_is_get_only(client: QuartClient) -> None:
    response = await client.post("/presence", query_string={"user": "Bob"})
    assert response.status_code == 405 and response.headers["allow"] == "GET"


# -- WebSocket frames and events ---------------------------------------------------


async def test_a_presence_frame_is_answered_with_ref_like_the_http_answer(
    client: QuartClient,
) -> None:
    async with client.websocket("/events?user=Anne") as anne:
        await receive(anne)
        await join(anne, "general")
        await anne.send(json.dumps({"type": "presence", "room": "general", "ref": "7"}))
        answer = await answer_to(anne, "7")
        assert answer == {
            "type": "presence",
            "ref": "7",
            "room": "general",
            "users": ["Anne"],
            "complete": True,
            "truncated": False,
        }


async def test_members_get_joined_on_a_users_first_connection_and_left_on_its_last(
    client: QuartClient,
) -> None:
    async with client.websocket("/events?user=Anne&presence=1") as anne:
        await receive(anne)
        await join(anne, "general")
        assert await next_event(anne) == {"type": "presence", "room": "general", "joined": "Anne"}
        async with client.websocket("/events?user=Bob") as bob:
            await receive(bob)
            await join(bob, "general")
            assert (await next_event(anne))["joined"] == "Bob"
            async with client.websocket("/events?user=Bob") as bob_again:
                await receive(bob_again)
                await join(bob_again, "general")  # not Bob's first: no event
                await bob_again.send(json.dumps({"type": "leave", "room": "general"}))
                assert (await receive(bob_again))["type"] == "left"  # not Bob's last: none
            await close_normally(bob)
        assert await next_event(anne) == {"type": "presence", "room": "general", "left": "Bob"}
        # Nothing else came after it: the next frame answers Anne's question.
        await anne.send(json.dumps({"type": "presence", "user": "Bob", "ref": "after"}))
        assert (await receive(anne))["ref"] == "after"


async def test_a_dropped_connection_whose_session_resumes_is_neither_a_leave_nor_a_join(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with serving(resume_window=30) as client:
        async with watching(client, "general") as anne:
            async with client.websocket("/events?user=Bob") as bob:
                token = (await receive(bob))["session"]
                await join(bob, "general")
                assert (await next_event(anne))["joined"] == "Bob"
            # Gone without a close frame: Bob's session waits, still in the room.
            assert (await presence(client, room="general"))[1]["users"] == ["Anne", "Bob"]
            assert (await presence(client, user="Bob"))[1]["online"] is False
            await trio.sleep(20)
            async with client.websocket(f"/events?user=Bob&session={token}") as bob:
                assert (await receive(bob))["resumed"] is True
                await trio.sleep(5)
                assert (await presence(client, room="general"))[1]["users"] == ["Anne", "Bob"]
                await close_normally(bob)
            # At once: the resume took the rooms over from the first connection's hold.
            with trio.fail_after(1):
                assert await next_event(anne) == {
                    "type": "presence",
                    "room": "general",
                    "left": "Bob",
                }


async def test_a_session_not_resumed_within_the_window_is_a_leave(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with serving(resume_window=30) as client:
        async with watching(client, "general") as anne:
            async with client.websocket("/events?user=Bob") as bob:
                await receive(bob)
                await join(bob, "general")
                await next_event(anne)
            with trio.move_on_after(25):
                pytest.fail(f"a left before the window ended: {await next_event(anne)}")
            assert await next_event(anne) == {"type": "presence", "room": "general", "left": "Bob"}
            assert (await presence(client, room="general"))[1]["users"] == ["Anne"]


async def test_events_can_be_turned_off() -> None:
    async with serving(presence_events=False) as client:
        async with (
            client.websocket("/events?user=Anne&presence=1") as anne,
            client.websocket("/events?user=Bob") as bob,
        ):
            await receive(anne)
            await receive(bob)
            await join(anne, "general")
            await join(bob, "general")
            await anne.send(json.dumps({"type": "presence", "room": "general", "ref": "1"}))
            assert (await receive(anne))["users"] == ["Anne", "Bob"]  # nothing came before it


# -- what the broker hands over -------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "body"),
    [
        (EVENTS_KEY_PREFIX + "general", b"not json"),
        (EVENTS_KEY_PREFIX + "general", presence_event_frame("other", "Bob", joined=True).encode()),
        (EVENTS_KEY_PREFIX + "general", b'{"type":"presence","room":"general","joined":"a/b"}'),
        (EVENTS_KEY_PREFIX + "general", b'{"type":"message","room":"general","joined":"Bob"}'),
        (QUERY_KEY, b'{"q":"x","reply":"presence.reply.0000000000000000","from":"i","user":"B"}'),
        (QUERY_KEY, b'{"q":"0000000000000000","reply":"user.Bob","from":"i","user":"Bob"}'),
        (REPLY_KEY_PREFIX + "0", b"[]"),
        (PEERS_KEY, json.dumps({"instance": "i" * 257, "up": True}).encode()),
    ],
    ids=[
        "not-json",
        "other-room",
        "bad-user",
        "not-presence",
        "bad-id",
        "reply-elsewhere",
        "array",
        "long-instance",
    ],
)
async def test_a_forged_presence_delivery_is_dropped_and_counted(key: str, body: bytes) -> None:
    metrics = Metrics()
    router = Router(_NoBackend(), metrics, Settings())
    router.deliver(key, body)
    assert metrics.messages_dropped.labels("invalid")._value.get() == 1


class _NoBackend:
    """Never asked: a forged delivery is dropped before anything is published."""

    ready = True
    sessions = None

    async def publish(self, key: str, body: bytes) -> Any:  # pragma: no cover - not called
        raise AssertionError(key)


async def test_only_connections_that_ask_get_events_and_a_bad_flag_is_refused(
    client: QuartClient,
) -> None:
    async with (
        client.websocket("/events?user=Anne") as anne,
        client.websocket("/events?user=Carol&presence=1") as carol,
    ):
        for socket in (anne, carol):
            await receive(socket)
            await join(socket, "general")
        async with client.websocket("/events?user=Bob") as bob:
            await receive(bob)
            await join(bob, "general")
            assert await next_event(carol) == {
                "type": "presence",
                "room": "general",
                "joined": "Carol",
            }
            assert (await next_event(carol))["joined"] == "Bob"
        await anne.send(json.dumps({"type": "presence", "user": "Bob", "ref": "1"}))
        assert (await receive(anne))["ref"] == "1"  # no event came before the answer
    response = await client.get(
        "/events",
        query_string={"user": "Bob", "presence": "yes"},
        headers={"Accept": "text/event-stream"},
    )
    assert response.status_code == 400
